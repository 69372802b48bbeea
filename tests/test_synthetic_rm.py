"""The synthetic task is learnable by a tiny reward model, but not perfectly; flipped labels hurt
it; and the votes of a few reward models find the flipped pairs. The calibration the
reward-modeling methods rely on, with the probe reward model of rlengine.synthetic.training
(plain BT) on the SFT policy's backbone. Numbers measured on 2 shared cores are in the
comments; `python -m rlengine.synthetic.calibrate` reproduces them."""

from __future__ import annotations

import pytest
import torch

from rlengine.reward.strength import roc_auc
from rlengine.synthetic import (
    ProbeRewardModel,
    SyntheticTask,
    pair_accuracy,
    score_pairs,
    train_probe_reward_model,
)
from rlengine.synthetic.training import batch_scored, encode_scored

TASK = SyntheticTask(seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_synthetic.one_thread
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sft_policy(one_thread):
    return TASK.sft_policy()


@pytest.fixture(scope="module")
def validation():
    return TASK.clean_pairs(1000, seed=100)


def _train(policy, pairs, *, steps, seed):
    return train_probe_reward_model(TASK.make_reward_backbone(from_policy=policy),
                                    TASK.tokenizer, pairs, steps=steps, seed=seed)


def _accuracy(model, validation):
    chosen, rejected = score_pairs(model, TASK.tokenizer, validation)
    return pair_accuracy(chosen, rejected, validation)


def test_probe_readouts():
    model = ProbeRewardModel(TASK.make_reward_backbone(0), seed=1, readout="token_sum")
    prompts = TASK.prompts(4, seed=0)
    rows = [encode_scored(TASK.tokenizer, p, TASK.target(p)) for p in prompts]
    ids, mask, response = batch_scored(rows, TASK.tokenizer.pad_token_id)
    for i, p in enumerate(prompts):
        words = len(TASK.target(p).split())
        start = len(p.split())
        assert response[i].nonzero().flatten().tolist() == list(range(start, start + words))
        assert ids[i, start + words] == TASK.tokenizer.eos_token_id
    values = model.token_values(ids, mask)
    torch.testing.assert_close(model(ids, mask, response), (values * response).sum(-1))
    model.readout = "last"
    torch.testing.assert_close(model(ids, mask), values[torch.arange(4), mask.sum(-1) - 1])
    with pytest.raises(ValueError, match="readout"):
        ProbeRewardModel(TASK.make_reward_backbone(0), readout="first")


def test_roc_auc():
    labels = torch.tensor([True, False, True, False])
    assert roc_auc(torch.tensor([4.0, 1.0, 3.0, 2.0]), labels) == 1.0
    assert roc_auc(torch.tensor([1.0, 4.0, 2.0, 3.0]), labels) == 0.0
    assert roc_auc(torch.tensor([1.0, 1.0, 3.0, 2.0]), labels) == 0.625


@pytest.mark.slow
def test_reward_model_learns_clean_labels_but_not_perfectly(sft_policy, validation):
    # About 0.82 after these 150 steps (3 s); a random-init backbone reaches 0.78-0.80 in 400
    # steps (8 s). Over 15 seeds x 4 CPU code paths: accuracy 0.771-0.858 (mean 0.819, sd
    # 0.016), loss of the last 20 steps at most 0.383; bench/results/outcome-spread-2026-12-07.md
    result = _train(sft_policy, TASK.preference_pairs(2000, flip_fraction=0.0, seed=1),
                    steps=150, seed=0)
    assert sum(result.losses[-20:]) / 20 < 0.6
    assert 0.72 <= _accuracy(result.model, validation) <= 0.93


@pytest.mark.slow
def test_flipped_labels_hurt_and_votes_find_them(sft_policy, validation):
    clean = TASK.preference_pairs(1000, flip_fraction=0.0, seed=1)
    noisy = TASK.preference_pairs(1000, flip_fraction=0.2, seed=1)
    # Same comparisons, same seed, only the labels differ (30% flipped here). Ten epochs over
    # 1000 pairs: plain BT memorises the flips. Over 8 seeds x 4 CPU code paths: 0.60-0.70
    # against 0.77-0.85 on clean labels, 0.078-0.218 lower (mean 0.157, sd 0.033); with 20%
    # flipped, only 0.032-0.149 lower (mean 0.088, sd 0.029), under the former margin of 0.04
    # once; bench/results/outcome-spread-2026-12-07.md
    flipped_30 = TASK.preference_pairs(1000, flip_fraction=0.3, seed=1)
    clean_accuracy = _accuracy(_train(sft_policy, clean, steps=300, seed=3).model, validation)
    noisy_accuracy = _accuracy(_train(sft_policy, flipped_30, steps=300, seed=3).model,
                               validation)
    assert 0.5 < noisy_accuracy < clean_accuracy - 0.02, (noisy_accuracy, clean_accuracy)
    # Preference strength: mean score difference of a few voters trained on the noisy pairs
    # (5 voters on 2000 pairs: 0.90-0.91, see rlengine/synthetic/calibrate.py). Over 8 seeds x
    # 4 CPU code paths: ROC AUC 0.821-0.877 (mean 0.856, sd 0.016), the lowest decile 70-88%
    # flipped (mean 79%, sd 4.6%) against 20% overall; bench/results/outcome-spread-2026-12-07.md
    differences = []
    for seed in range(3):
        voter = _train(sft_policy, noisy, steps=100, seed=10 + seed).model
        chosen, rejected = score_pairs(voter, TASK.tokenizer, noisy)
        differences.append(chosen - rejected)
    mu = torch.stack(differences).mean(0)
    flipped = torch.tensor([p.extra["flipped"] for p in noisy])
    assert roc_auc(-mu, flipped) > 0.75
    lowest = mu.argsort()[:100]
    assert flipped[lowest].double().mean() > 0.5
