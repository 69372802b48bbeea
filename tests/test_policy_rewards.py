"""Per-token rewards: bandit, token-level and segment placements and METHODS.md's dense rule
against a hand-computed example (engine ops and eager references alike), KL estimators against
their formulas, the fixed and adaptive KL controllers, whitening, clipping, the EOS penalty,
and the reward sources applied to a real rollout."""

from __future__ import annotations

import math

import pytest
import torch

from rlengine.ops.reference import SIGMA_FLOOR
from rlengine.policy import (
    AdaptiveKLController,
    FixedKLController,
    FunctionRewards,
    RewardModelRewards,
    SamplingConfig,
    apply_eos_penalty,
    bandit_rewards,
    clip_rewards,
    generate_rollout,
    kl_estimate,
    kl_shaped_rewards,
    make_kl_controller,
    next_token_entropy,
    response_logprobs,
    segment_dense_rewards,
    sequence_rewards_at_last_token,
    token_level_rewards,
    whiten_rewards,
)
from rlengine.policy.job import synthetic_task
from rlengine.reward import RewardModel

torch.set_num_threads(1)
KERNELS = ["engine", "reference"]

# Two rows, T = 10. Row 0: prompt in columns 0-2, content tokens 3-8, EOS at 9.
# Row 1: prompt 0-4, content 5-7, no EOS (cut at the length limit), padding at 8-9.
RESPONSE = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)
CONTENT = RESPONSE.clone()
CONTENT[0, 9] = False
VALUES = torch.arange(20, dtype=torch.float32).view(2, 10) / 10 - 0.5
# next-token entropies: above c = 1.0 at columns 4 and 7 of row 0 and column 5 of row 1
ENTROPY = torch.full((2, 10), 0.5)
ENTROPY[0, 4] = ENTROPY[0, 7] = ENTROPY[1, 5] = 2.0


def test_bandit_and_gold_rewards_sit_at_the_last_token():
    dense, scores = bandit_rewards(VALUES, RESPONSE)
    assert scores.tolist() == pytest.approx([VALUES[0, 9].item(), VALUES[1, 7].item()])
    expected = torch.zeros(2, 10)
    expected[0, 9], expected[1, 7] = scores
    assert torch.equal(dense, expected)
    placed = sequence_rewards_at_last_token(torch.tensor([2.5, -1.0]), RESPONSE)
    assert placed[0, 9] == 2.5 and placed[1, 7] == -1.0 and placed.abs().sum() == 3.5


@pytest.mark.parametrize("kernels", KERNELS)
def test_token_level_rewards_are_values_at_content_tokens(kernels):
    dense = token_level_rewards(VALUES, CONTENT, kernels=kernels)
    assert torch.equal(dense, torch.where(CONTENT, VALUES, 0.0))
    assert dense[0, 9] == 0  # EOS gets nothing
    normalizer = (0.5, 0.1, 0.2, 2.0)
    normalized = token_level_rewards(VALUES, CONTENT, normalizer=normalizer, kernels=kernels)
    # row 1: 3 tokens at locations 1/3, 2/3, 1
    for k, column in enumerate((5, 6, 7)):
        p = (k + 1) / 3
        mu, sigma = 0.5 * math.log(p) + 0.1, 0.2 * math.log(p) + 2.0
        assert normalized[1, column].item() == pytest.approx((VALUES[1, column].item() - mu)
                                                             / sigma, rel=1e-5)


def _hand_dense(spread: str, normalizer, clamp):
    """METHODS.md section 3 by hand for the module's example at c = 1.0."""
    # row 0 segments: {3, 4} (4 ends: entropy 2.0), {5, 6, 7}, {8} (last content token)
    # row 1 segments: {5}, {6, 7}
    segments = {0: [[3, 4], [5, 6, 7], [8]], 1: [[5], [6, 7]]}
    dense = torch.zeros(2, 10)
    for row, parts in segments.items():
        for k, columns in enumerate(parts):
            reward = VALUES[row, columns[-1]].item()
            if normalizer is not None:
                a_mu, b_mu, a_sigma, b_sigma = normalizer
                p = (k + 1) / len(parts)
                sigma = max(a_sigma * math.log(p) + b_sigma, SIGMA_FLOOR)  # the op's floor
                reward = (reward - (a_mu * math.log(p) + b_mu)) / sigma
            for column in columns:
                if spread == "even":
                    dense[row, column] = reward / len(columns)
                elif spread == "repeat":
                    dense[row, column] = reward
                elif column == columns[-1]:
                    dense[row, column] = reward
    return dense.clamp(-clamp, clamp) if clamp is not None else dense


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("spread", ["even", "repeat", "end"])
@pytest.mark.parametrize("normalizer, clamp", [(None, 10.0), ((0.7668, 0.4705, 0.2569, 2.8339),
                                                               10.0),
                                               ((0.7668, 2.0, 0.2569, 0.05), 10.0),
                                               ((1.0, -0.5, 0.1, 1.0), None)])
def test_segment_dense_rewards_match_the_rule_by_hand(kernels, spread, normalizer, clamp):
    dense, segments = segment_dense_rewards(VALUES, ENTROPY, CONTENT, threshold=1.0,
                                            normalizer=normalizer, spread=spread, clamp=clamp,
                                            kernels=kernels)
    assert segments.counts.tolist() == [3, 2]
    assert segments.segment_ids[0].tolist() == [-1, -1, -1, 0, 0, 1, 1, 1, 2, -1]
    assert segments.segment_ids[1].tolist() == [-1] * 5 + [0, 1, 1, -1, -1]
    torch.testing.assert_close(segments.rewards[0], VALUES[0, [4, 7, 8]])
    torch.testing.assert_close(dense, _hand_dense(spread, normalizer, clamp))
    assert (dense[~CONTENT] == 0).all()
    p, r = segments.locations()
    assert p.tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5, 1.0])
    if normalizer == (0.7668, 2.0, 0.2569, 0.05):
        assert dense.abs().max() == pytest.approx(10.0)  # the clamp bites: sigma is tiny


def test_threshold_extremes_give_token_level_and_bandit_segments():
    _, token = segment_dense_rewards(VALUES, ENTROPY, CONTENT, threshold=0.0)
    assert token.counts.tolist() == CONTENT.sum(-1).tolist()
    dense, one = segment_dense_rewards(VALUES, ENTROPY, CONTENT, threshold=1e9, spread="end")
    assert one.counts.tolist() == [1, 1]
    assert dense[0, 8] == VALUES[0, 8] and dense[1, 7] == VALUES[1, 7]


def test_kl_estimators_match_their_formulas():
    logprobs = torch.tensor([[-1.0, -0.2, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -0.1, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    r = (logprobs - ref)[0, :3].tolist()
    k1 = kl_estimate(logprobs, ref, mask, estimator="k1")
    k2 = kl_estimate(logprobs, ref, mask, estimator="k2")
    k3 = kl_estimate(logprobs, ref, mask, estimator="k3")
    assert k1[0, :3].tolist() == pytest.approx(r)
    assert k2[0, :3].tolist() == pytest.approx([x * x / 2 for x in r])
    assert k3[0, :3].tolist() == pytest.approx([math.exp(-x) - 1 + x for x in r])
    assert k1[0, 3] == k2[0, 3] == k3[0, 3] == 0 and (k3 >= 0).all()
    shaped, kl = kl_shaped_rewards(torch.ones(1, 4), logprobs, ref, mask, beta=0.1)
    assert torch.equal(kl, k1)
    assert shaped[0].tolist() == pytest.approx([1 - 0.1 * x for x in r] + [0.0])
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_estimate(logprobs, ref, mask, estimator="k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=generator), 0)
    q = torch.softmax(torch.randn(6, generator=generator), 0)
    true_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=generator).view(1, -1)
    logp, logq = p.log()[samples], q.log()[samples]
    mask = torch.ones_like(samples, dtype=torch.bool)
    for estimator in ("k1", "k3"):
        mean = float(kl_estimate(logp, logq, mask, estimator=estimator).mean())
        assert mean == pytest.approx(true_kl, abs=0.01), estimator


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    assert fixed.update(10.0, 256) == 0.05
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 is 50% over target: the error is clipped to +0.2
    assert adaptive.update(9.0, 1000) == pytest.approx(0.1 * (1 + 0.2 * 1000 / 10000))
    value = adaptive.value
    # KL 5.4 is 10% under target
    assert adaptive.update(5.4, 500) == pytest.approx(value * (1 - 0.1 * 500 / 10000))
    # round trip through a checkpoint
    restored = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
    assert isinstance(make_kl_controller(0.1), FixedKLController)
    assert isinstance(make_kl_controller(0.1, target=6.0), AdaptiveKLController)
    with pytest.raises(ValueError, match="target KL must be > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


@pytest.mark.parametrize("kernels", KERNELS)
def test_whitening_clipping_and_eos_penalty(kernels):
    rewards = torch.where(RESPONSE, VALUES * 3 + 1, 0.0)
    white = whiten_rewards(rewards, RESPONSE, kernels=kernels)
    kept = white[RESPONSE]
    assert kept.var().item() == pytest.approx(1.0, rel=1e-4)
    assert kept.mean().item() == pytest.approx(rewards[RESPONSE].mean().item(), rel=1e-4)
    assert (white[~RESPONSE] == 0).all()
    centred = whiten_rewards(rewards, RESPONSE, shift_mean=True, kernels=kernels)
    assert centred[RESPONSE].mean().abs() < 1e-5
    assert clip_rewards(torch.tensor([-5.0, 0.5, 5.0]), 2.0).tolist() == [-2.0, 0.5, 2.0]
    penalized = apply_eos_penalty(rewards, RESPONSE, torch.tensor([True, False]), 1.5)
    difference = penalized - rewards
    assert difference[1, 7] == -1.5 and difference.abs().sum() == 1.5


@pytest.fixture(scope="module")
def rollout_and_models():
    task = synthetic_task(0)
    policy = task.sft_policy()
    rollout = generate_rollout(policy, task.tokenizer, task.prompts(6, seed=4),
                               SamplingConfig(max_new_tokens=10, num_return_sequences=2), seed=4)
    reward_model = RewardModel(task.make_reward_backbone(from_policy=policy)).eval()
    return task, policy, rollout, reward_model


def test_reward_sources_on_a_rollout(rollout_and_models):
    task, policy, rollout, reward_model = rollout_and_models
    values = reward_model(rollout.input_ids, rollout.attention_mask,
                          rollout.position_ids).values.detach()
    bandit = RewardModelRewards(reward_model, kind="bandit")(rollout)
    rows = torch.arange(len(rollout))
    torch.testing.assert_close(bandit.scores, values[rows, rollout.last_index])
    token = RewardModelRewards(reward_model, kind="token")(rollout)
    torch.testing.assert_close(token.token_rewards, torch.where(rollout.content_mask, values, 0.0))
    with torch.no_grad():
        _, entropy = response_logprobs(policy, rollout, with_entropy=True)
    segment = RewardModelRewards(reward_model, kind="segment", threshold=1.0,
                                 normalizer=(0.1, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="segment rewards need next_entropy"):
        segment(rollout)
    result = segment(rollout, next_entropy=next_token_entropy(entropy))
    assert (result.segments.counts >= 1).all()
    assert (result.token_rewards[~rollout.content_mask] == 0).all()
    torch.testing.assert_close(result.scores, result.token_rewards.sum(-1))
    gold = FunctionRewards(lambda p, r, t: task.gold_reward(p, r, terminated=t))(rollout)
    expected = task.gold_rewards(rollout.prompts, rollout.responses, rollout.terminated.tolist())
    assert gold.scores.tolist() == pytest.approx(expected)
    torch.testing.assert_close(gold.token_rewards[rows, rollout.last_index], gold.scores)


def test_reward_source_errors(rollout_and_models):
    _, _, rollout, reward_model = rollout_and_models
    with pytest.raises(ValueError, match="kind must be one of"):
        RewardModelRewards(reward_model, kind="sentence")
    with pytest.raises(ValueError, match="not to bandit rewards"):
        RewardModelRewards(reward_model, kind="bandit", normalizer=(1, 0, 0, 1))
    with pytest.raises(ValueError, match="returned nan for row 0"):
        FunctionRewards(lambda p, r, t: float("nan"))(rollout)
