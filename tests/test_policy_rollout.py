"""Rollouts: generation's layout (left-padded prompts, right-padded responses, EOS and masks) for
sampling, greedy decoding and diverse beam search; response log-probs and entropies through
the fused ops against log_softmax of the model's logits on each row unpadded (float64); the
critic and its values under left padding (GPT-2's absolute positions)."""

from __future__ import annotations

import pytest
import torch

from rlengine.data import PromptExample
from rlengine.policy import (
    Rollout,
    SamplingConfig,
    critic_values,
    diverse_beam_search,
    generate_rollout,
    make_critic,
    next_token_entropy,
    response_logprobs,
)
from rlengine.policy.job import synthetic_task
from rlengine.policy.rollout import fusable_head, position_ids
from rlengine.reward import RewardModel
from rlengine.synthetic import SyntheticTask

torch.set_num_threads(1)
TASK = synthetic_task(0)
GPT2_TASK = SyntheticTask(0, model={"architecture": "gpt2"})


@pytest.fixture(scope="module")
def policy():
    return TASK.sft_policy()


def _prompts(n=5, seed=1):
    prompts = TASK.prompts(n, seed=seed)
    lengths = {len(p.split()) for p in prompts}
    assert len(lengths) > 1  # ragged prompts: left padding is exercised
    return prompts


def _check_layout(rollout: Rollout, prompts, n: int, tokenizer) -> None:
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert len(rollout) == len(prompts) * n
    assert rollout.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(n)]
    assert rollout.prompts == [p for p in prompts for _ in range(n)]
    width = rollout.prompt_length
    for row in range(len(rollout)):
        ids = rollout.input_ids[row]
        prompt_ids = tokenizer(rollout.prompts[row], add_special_tokens=False)["input_ids"]
        # the prompt ends at column P - 1, left padding before it is masked out
        assert ids[width - len(prompt_ids):width].tolist() == prompt_ids
        assert rollout.attention_mask[row, :width].tolist() == \
            [0] * (width - len(prompt_ids)) + [1] * len(prompt_ids)
        assert (ids[:width - len(prompt_ids)] == pad).all()
        # the response starts at column P, contiguous; EOS is its last token iff terminated
        response = rollout.response_mask[row]
        length = int(response.sum())
        assert length >= 1 and response[width:width + length].all() and not response[:width].any()
        assert not response[width + length:].any()
        assert (rollout.attention_mask[row, width:] == response[width:].long()).all()
        tokens = ids[width:width + length].tolist()
        assert (tokens[-1] == eos) == bool(rollout.terminated[row])
        assert eos not in tokens[:-1]
        assert (ids[width + length:] == pad).all()
        words = tokens[:-1] if rollout.terminated[row] else tokens
        assert rollout.responses[row] == " ".join(tokenizer.convert_ids_to_tokens(words))
    assert (rollout.last_index == width + rollout.response_lengths - 1).all()
    content = rollout.content_mask
    assert (content.sum(-1) == rollout.response_lengths - rollout.terminated.long()).all()


@pytest.mark.parametrize("strategy, n", [("sample", 3), ("greedy", 1), ("diverse_beam", 4)])
def test_generation_layout_masks_and_eos(policy, strategy, n):
    prompts = _prompts()
    config = SamplingConfig(max_new_tokens=10, strategy=strategy, num_return_sequences=n,
                            batch_size=2)
    rollout = generate_rollout(policy, TASK.tokenizer, prompts, config, seed=3)
    _check_layout(rollout, prompts, n, TASK.tokenizer)
    assert rollout.terminated.any()
    again = generate_rollout(policy, TASK.tokenizer, [PromptExample(p) for p in prompts], config,
                             seed=3)
    assert torch.equal(rollout.input_ids, again.input_ids)  # seeded, whatever ran between


def test_length_limit_leaves_responses_unterminated(policy):
    prompts = _prompts()
    rollout = generate_rollout(policy, TASK.tokenizer, prompts,
                               SamplingConfig(max_new_tokens=2, strategy="greedy"))
    _check_layout(rollout, prompts, 1, TASK.tokenizer)
    assert not rollout.terminated.all() and (rollout.response_lengths <= 2).all()


def test_greedy_matches_the_task_decoder_and_diverse_beams_differ(policy):
    prompts = _prompts(6)
    rollout = generate_rollout(policy, TASK.tokenizer, prompts,
                               SamplingConfig(max_new_tokens=12, strategy="greedy"))
    assert rollout.responses == TASK.generate(policy, prompts, greedy=True, max_new_tokens=12)
    beams = generate_rollout(policy, TASK.tokenizer, prompts, SamplingConfig(
        max_new_tokens=12, strategy="diverse_beam", num_return_sequences=4,
        diversity_penalty=5.0))
    for i in range(len(prompts)):
        group = beams.responses[4 * i:4 * i + 4]
        assert len(set(group)) == 4, group  # each group chose another first token


def test_one_beam_diverse_search_is_greedy(policy):
    prompts = _prompts(4)
    ids, mask = _left_padded(prompts)
    beams = diverse_beam_search(policy, ids, mask, num_beams=1, num_beam_groups=1,
                                diversity_penalty=1.0, max_new_tokens=8,
                                eos_token_id=TASK.tokenizer.eos_token_id,
                                pad_token_id=TASK.tokenizer.pad_token_id,
                                num_return_sequences=1)
    greedy = generate_rollout(policy, TASK.tokenizer, prompts,
                              SamplingConfig(max_new_tokens=8, strategy="greedy"))
    response = greedy.input_ids[:, greedy.prompt_length:]
    assert torch.equal(beams[:, :response.shape[1]], response)


def _left_padded(prompts):
    rows = [TASK.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), TASK.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _reference_logprobs(model, rollout: Rollout, temperature: float):
    """log_softmax of the model's logits, each row run alone without padding."""
    logprobs = torch.zeros(rollout.input_ids.shape, dtype=torch.float64)
    entropy = torch.zeros_like(logprobs)
    for row in range(len(rollout)):
        keep = rollout.attention_mask[row].bool()
        ids = rollout.input_ids[row, keep].unsqueeze(0)
        columns = keep.nonzero().squeeze(1)
        logits = model(input_ids=ids).logits[0].double() / temperature
        logp = torch.log_softmax(logits, -1)
        for j in range(1, ids.shape[1]):
            column = int(columns[j])
            if rollout.response_mask[row, column]:
                logprobs[row, column] = logp[j - 1, ids[0, j]]
                entropy[row, column] = -(logp[j - 1].exp() * logp[j - 1]).sum()
    return logprobs, entropy


@pytest.mark.parametrize("fused, kernels", [(None, "engine"), (False, "engine"),
                                            (None, "reference")])
def test_response_logprobs_equal_log_softmax_of_unpadded_rows(policy, fused, kernels):
    rollout = generate_rollout(policy, TASK.tokenizer, _prompts(4),
                               SamplingConfig(max_new_tokens=8, num_return_sequences=2), seed=0)
    model = policy.double()
    assert (fusable_head(model, fused) is not None) == (fused is None)
    with torch.no_grad():
        logprobs, entropy = response_logprobs(model, rollout, temperature=0.7,
                                              with_entropy=True, fused=fused, kernels=kernels)
        expected_logprobs, expected_entropy = _reference_logprobs(model, rollout, 0.7)
    policy.float()
    assert logprobs.dtype == torch.float32 and logprobs.shape == rollout.input_ids.shape
    torch.testing.assert_close(logprobs.double(), expected_logprobs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), expected_entropy, atol=1e-6, rtol=1e-6)
    assert (logprobs[~rollout.response_mask] == 0).all()
    # the segmentation alignment: column t holds the entropy that predicts token t + 1
    assert torch.equal(next_token_entropy(entropy)[:, :-1], entropy[:, 1:])


def test_response_logprobs_are_differentiable(policy):
    rollout = generate_rollout(policy, TASK.tokenizer, _prompts(3), SamplingConfig(
        max_new_tokens=6), seed=1)
    logprobs = response_logprobs(policy, rollout)
    logprobs.sum().backward()
    head = policy.get_output_embeddings().weight
    assert head.grad is not None and head.grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)


def test_critic_from_policy_and_from_reward_model(policy):
    critic = make_critic(policy=policy, head_init_std=0.0)
    assert isinstance(critic, RewardModel) and (critic.value_head.weight == 0).all()
    body = policy.base_model.state_dict()
    for name, tensor in critic.backbone.state_dict().items():
        assert torch.equal(tensor, body[name]), name
        assert tensor.data_ptr() != body[name].data_ptr()  # a copy: the policy trains apart
    reward_model = RewardModel(TASK.make_reward_backbone(3))
    copied = make_critic(reward_model=reward_model)
    assert copied is not reward_model
    assert torch.equal(copied.value_head.weight, reward_model.value_head.weight)
    with pytest.raises(ValueError, match="exactly one of policy= or reward_model="):
        make_critic()
    with pytest.raises(ValueError, match="exactly one"):
        make_critic(policy=policy, reward_model=reward_model)


def test_critic_values_under_left_padding_use_real_positions():
    """GPT-2 learns absolute positions: values of a left-padded row equal the unpadded row's
    only if the positions count real tokens."""
    policy = GPT2_TASK.make_policy(0)
    prompts = GPT2_TASK.prompts(4, seed=2)
    rollout = generate_rollout(policy, GPT2_TASK.tokenizer, prompts,
                               SamplingConfig(max_new_tokens=5), seed=2)
    critic = make_critic(policy=policy).eval()
    values = critic_values(critic, rollout)
    for row in range(len(rollout)):
        keep = rollout.attention_mask[row].bool()
        alone = critic(rollout.input_ids[row, keep].unsqueeze(0)).values[0]
        torch.testing.assert_close(values[row, keep], alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(rollout.position_ids, position_ids(rollout.attention_mask))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_beams .* must be a multiple of num_beam_groups"):
        SamplingConfig(strategy="diverse_beam", num_return_sequences=4, num_beam_groups=3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match="strategy must be one of"):
        SamplingConfig(strategy="beam")
    with pytest.raises(ValueError, match="no prompts"):
        generate_rollout(TASK.make_policy(0), TASK.tokenizer, [])
