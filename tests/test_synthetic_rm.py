"""The synthetic task is learnable by a tiny reward model, but not perfectly, and flipped labels
hurt it: the calibration the reward-modeling methods rely on (plain BT, the probe reward model
of rlengine.synthetic.training, on the SFT policy's backbone)."""

from __future__ import annotations

import pytest
import torch

from rlengine.synthetic import SyntheticTask, pair_accuracy, score_pairs, train_probe_reward_model

TASK = SyntheticTask(seed=0)


@pytest.fixture(scope="module")
def sft_policy():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_synthetic.one_thread
    yield TASK.sft_policy()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def validation():
    return TASK.clean_pairs(1000, seed=100)


def _accuracy(policy, pairs, validation, *, steps, seed):
    result = train_probe_reward_model(TASK.make_reward_backbone(from_policy=policy),
                                      TASK.tokenizer, pairs, steps=steps, seed=seed)
    chosen, rejected = score_pairs(result.model, TASK.tokenizer, validation)
    return pair_accuracy(chosen, rejected, validation), result


@pytest.mark.slow
def test_reward_model_learns_clean_labels_but_not_perfectly(sft_policy, validation):
    train = TASK.preference_pairs(2000, flip_fraction=0.0, seed=1)
    accuracy, result = _accuracy(sft_policy, train, validation, steps=150, seed=0)
    assert sum(result.losses[-20:]) / 20 < 0.6
    assert 0.75 <= accuracy <= 0.93, accuracy


@pytest.mark.slow
def test_flipped_labels_hurt_but_do_not_destroy(sft_policy, validation):
    clean = TASK.preference_pairs(2000, flip_fraction=0.0, seed=1)
    noisy = TASK.preference_pairs(2000, flip_fraction=0.2, seed=1)
    # Same comparisons, same seed: only the labels differ.
    clean_accuracy, _ = _accuracy(sft_policy, clean, validation, steps=300, seed=3)
    noisy_accuracy, _ = _accuracy(sft_policy, noisy, validation, steps=300, seed=3)
    assert 0.55 < noisy_accuracy < clean_accuracy - 0.02, (noisy_accuracy, clean_accuracy)
