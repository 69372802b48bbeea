"""The built-in synthetic task: determinism, the gold reward, the simulated annotator, the
tokenizer and the tiny models."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM, LlamaModel

from rlengine.data.types import PreferencePair, PromptExample, RankedExample
from rlengine.synthetic import (
    Demonstration,
    ModelConfig,
    SyntheticTask,
    TaskConfig,
    pair_accuracy,
)
from rlengine.synthetic.vocabulary import ANSWER_MARKER, FILLERS

TASK = SyntheticTask(seed=0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tiny models are dominated by per-op overhead; on shared cores a second intra-op
    # thread mostly adds contention (measured: 53 ms against 475 ms per reward-model step
    # under load, and 10 s against 0.5 s for the generate test).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- determinism ------------------------------------------------------------------------------

def test_same_seed_same_data():
    a, b = SyntheticTask(seed=3), SyntheticTask(seed=3)
    assert a.prompts(20, seed=1) == b.prompts(20, seed=1)
    assert a.preference_pairs(30, seed=2) == b.preference_pairs(30, seed=2)
    assert a.ranked_examples(10, k=4, seed=2) == b.ranked_examples(10, k=4, seed=2)
    assert a.demonstrations(10, 0.3, seed=2) == b.demonstrations(10, 0.3, seed=2)
    assert a.prompt_examples(5, seed=2) == b.prompt_examples(5, seed=2)


def test_different_seeds_different_data():
    assert TASK.prompts(20, seed=1) != TASK.prompts(20, seed=2)
    assert TASK.prompts(20, seed=1) != SyntheticTask(seed=1).prompts(20, seed=1)
    # Independent streams: different kinds of data from one seed are not copies of each other.
    assert TASK.prompts(20, seed=1) != [d.prompt for d in TASK.demonstrations(20, 0.0, seed=1)]


def test_same_seed_same_weights():
    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.manual_seed(1)
    first = weights(TASK.make_policy(5))
    torch.manual_seed(2)  # the global RNG state must not matter
    assert torch.equal(first, weights(TASK.make_policy(5)))
    assert not torch.equal(first, weights(TASK.make_policy(6)))
    assert torch.equal(weights(TASK.make_reward_backbone(5)), weights(TASK.make_reward_backbone(5)))


def test_model_construction_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    TASK.make_policy(0)
    assert torch.equal(torch.rand(3), expected)


def test_pairs_share_responses_across_noise_settings():
    # One seed gives the same comparisons whatever the labels: clean and noisy versions of one
    # data set can be compared pair by pair.
    noisy = TASK.preference_pairs(50, flip_fraction=0.3, temperature=1.0, seed=4)
    clean = TASK.clean_pairs(50, seed=4)
    for n, c in zip(noisy, clean):
        assert n.prompt == c.prompt
        assert {n.chosen, n.rejected} == {c.chosen, c.rejected}


# ---- the language and the gold reward -----------------------------------------------------

def test_prompt_format_and_targets():
    task = SyntheticTask(seed=0)
    assert task.target("copy cat ant owl =") == "cat ant owl"
    assert task.target("reverse cat ant owl =") == "owl ant cat"
    assert task.target("sort cat ant owl =") == "ant cat owl"
    for prompt in task.prompts(200, seed=0):
        op, symbols = task.parse_prompt(prompt)
        words = prompt.split()
        assert words[-1] == ANSWER_MARKER and op in task.config.ops
        assert task.config.min_symbols <= len(symbols) <= task.config.max_symbols
        assert len(set(symbols)) == len(symbols)


@pytest.mark.parametrize("bad", ["", "copy =", "dance cat =", "copy cat owl", "copy cat um =",
                                 "copy cat dragon ="])
def test_malformed_prompt_is_an_error(bad):
    with pytest.raises(ValueError, match="prompt"):
        TASK.gold_reward(bad, "cat")


def test_perfect_response_gets_the_maximum():
    for prompt in TASK.prompts(100, seed=5):
        target = TASK.target(prompt)
        gold = TASK.gold(prompt, target)
        assert gold.total == TASK.max_gold_reward(prompt)
        assert all(r == TASK.config.correct_reward for r in gold.token_rewards)
        assert gold.global_reward == TASK.config.length_bonus


def test_each_injected_error_lowers_the_token_reward_at_its_position():
    c = TASK.config
    rng = random.Random(0)
    seen = set()
    for prompt in TASK.prompts(300, seed=6):
        response, errors = TASK.expert_response(prompt, 0.4, rng)
        perfect = TASK.gold_token_rewards(prompt, TASK.target(prompt))
        rewards = TASK.gold_token_rewards(prompt, response)
        wrong = set()
        for position, kind in errors:
            seen.add(kind)
            if kind == "filler":
                assert rewards[position] == c.forbidden_reward < perfect[position]
                wrong.add(position)
            elif kind == "symbol":
                assert rewards[position] == c.wrong_symbol_reward < perfect[position]
                wrong.add(position)
            elif kind == "ramble":
                assert all(r == c.extra_reward for r in rewards[position:])
                assert len(rewards) > len(perfect)
            else:  # stop
                assert len(rewards) == position < len(perfect)
        # Positions without an injected error keep their perfect score: the reward is local.
        for position in range(min(len(rewards), len(perfect))):
            if position not in wrong:
                assert rewards[position] == perfect[position]
        if errors:
            assert TASK.gold_reward(prompt, response) < TASK.max_gold_reward(prompt)
        else:
            assert response == TASK.target(prompt)
    assert seen == {"filler", "symbol", "ramble", "stop"}


def test_gold_reward_parts():
    c = TASK.config
    prompt = "copy cat ant owl ="
    assert TASK.gold_token_rewards(prompt, "cat um owl") == [c.correct_reward, c.forbidden_reward,
                                                           c.correct_reward]
    assert TASK.gold_token_rewards(prompt, "ant ant owl bear") == [
        c.wrong_symbol_reward, c.correct_reward, c.correct_reward, c.extra_reward]
    assert TASK.gold(prompt, "cat ant owl bear").global_reward == 0.0  # wrong length
    assert TASK.gold_reward(prompt, "") == 0.0
    assert TASK.gold_reward(prompt, "cat ant owl", terminated=False) == (
        TASK.max_gold_reward(prompt) - c.unterminated_penalty)
    # Non-symbols, including the task's own op words and unknown words, are forbidden.
    assert TASK.gold_token_rewards(prompt, "copy = dragon") == [c.forbidden_reward] * 3


@given(st.integers(0, 10_000), st.lists(st.sampled_from(TASK.words[4:]), max_size=12))
def test_gold_reward_is_maximal_only_for_the_target(prompt_seed, words):
    prompt = TASK.prompts(1, seed=prompt_seed)[0]
    response = " ".join(words)
    gold = TASK.gold(prompt, response)
    assert len(gold.token_rewards) == len(words)
    assert gold.total == math.fsum(gold.token_rewards) + gold.global_reward
    if response == TASK.target(prompt):
        assert gold.total == TASK.max_gold_reward(prompt)
    else:
        assert gold.total < TASK.max_gold_reward(prompt)


def test_noisy_expert_error_rate():
    rng = random.Random(1)
    prompts = TASK.prompts(2000, seed=7)
    for rate in (0.0, 0.1, 0.3):
        token_errors = words = 0
        for p in prompts:
            _, errors = TASK.expert_response(p, rate, rng)
            token_errors += sum(kind in ("filler", "symbol") for _, kind in errors)
            words += len(TASK.target(p).split())
        # Binomial: 4 standard errors (stop errors remove a few counted errors: bias < 2%).
        tolerance = 4 * math.sqrt(rate * (1 - rate) / words) + 0.02 * rate
        assert abs(token_errors / words - rate) <= tolerance, rate


def test_demonstrations():
    perfect = TASK.demonstrations(50, error_rate=0.0, seed=1)
    assert all(isinstance(d, Demonstration) for d in perfect)
    assert all(d.response == TASK.target(d.prompt) for d in perfect)
    noisy = TASK.demonstrations(300, error_rate=0.3, seed=1)
    mean = sum(d.extra["gold_reward"] for d in noisy) / len(noisy)
    assert mean < sum(TASK.max_gold_reward(d.prompt) for d in noisy) / len(noisy) - 1
    assert all(d.extra["gold_reward"] == TASK.gold_reward(d.prompt, d.response) for d in noisy)


# ---- the annotator ----------------------------------------------------------------------------

def test_flip_fraction_is_exact_and_flags_are_kept():
    for fraction in (0.0, 0.2, 0.5):
        pairs = TASK.preference_pairs(301, flip_fraction=fraction, temperature=0.0, seed=8)
        assert all(isinstance(p, PreferencePair) for p in pairs)
        flipped = [p.extra["flipped"] for p in pairs]
        assert sum(flipped) == round(fraction * 301)
        # Temperature 0: unflipped labels are the gold preference, flipped ones its opposite.
        for p in pairs:
            assert p.extra["gold_prefers_chosen"] is (not p.extra["flipped"])
            assert (p.extra["gold_chosen"] > p.extra["gold_rejected"]) is p.extra[
                "gold_prefers_chosen"]
            assert p.extra["gold_chosen"] == TASK.gold_reward(p.prompt, p.chosen)
            assert p.extra["gold_rejected"] == TASK.gold_reward(p.prompt, p.rejected)


def test_pairs_have_distinct_gold_rewards():
    pairs = TASK.preference_pairs(500, seed=9)
    assert all(p.extra["gold_chosen"] != p.extra["gold_rejected"] for p in pairs)
    assert all(isinstance(p.prompt, str) and isinstance(p.chosen, str) for p in pairs)
    assert len({p.source.row for p in pairs}) == 500


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_bradley_terry_temperature(temperature):
    # Without flips, the annotator prefers the better response with probability
    # sigmoid(|gap| / T): the observed rate must match the mean of those probabilities, overall
    # and per reward gap.
    pairs = TASK.preference_pairs(4000, flip_fraction=0.0, temperature=temperature, seed=10)
    agrees = [bool(p.extra["gold_prefers_chosen"]) for p in pairs]
    expected = [1 / (1 + math.exp(-abs(p.extra["gold_chosen"] - p.extra["gold_rejected"])
                                  / temperature)) for p in pairs]
    for p, e in zip(pairs, expected):
        assert p.extra["p_chosen"] == pytest.approx(e if p.extra["gold_prefers_chosen"] else 1 - e)
    n = len(pairs)
    mean_expected = sum(expected) / n
    se = math.sqrt(sum(e * (1 - e) for e in expected)) / n
    assert abs(sum(agrees) / n - mean_expected) < 4 * se
    for gap in (1.0, 2.0):
        idx = [i for i, p in enumerate(pairs)
               if abs(p.extra["gold_chosen"] - p.extra["gold_rejected"]) == gap]
        q = 1 / (1 + math.exp(-gap / temperature))
        rate = sum(agrees[i] for i in idx) / len(idx)
        assert abs(rate - q) < 4 * math.sqrt(q * (1 - q) / len(idx)) + 1e-9, gap
    if temperature == 2.0:  # a hot annotator is visibly noisy
        assert sum(agrees) / n < 0.85


def test_annotate_policy_responses_with_termination():
    prompts = ["copy cat ant owl ="] * 2
    pairs = TASK.annotate(prompts, ["cat ant owl", "cat ant owl"], ["cat ant", "cat ant owl"],
                          temperature=0.0, terminated_b=[True, False])
    assert [p.chosen for p in pairs] == ["cat ant owl", "cat ant owl"]
    assert pairs[1].extra["gold_rejected"] == TASK.max_gold_reward(prompts[1]) - (
        TASK.config.unterminated_penalty)


def test_clean_validation_labels_are_gold():
    pairs = TASK.clean_pairs(300, seed=11)
    assert all(p.extra["gold_prefers_chosen"] for p in pairs)
    assert not any(p.extra["flipped"] for p in pairs)
    gold_c = [p.extra["gold_chosen"] for p in pairs]
    gold_r = [p.extra["gold_rejected"] for p in pairs]
    assert pair_accuracy(gold_c, gold_r, pairs) == 1.0
    assert pair_accuracy(gold_r, gold_c, pairs) == 0.0
    assert pair_accuracy(gold_c, gold_c, pairs) == 0.5


def test_pair_difficulty_is_varied():
    # Both easy (large gold gap) and hard (gap 1) comparisons, so strength has a spread.
    gaps = [abs(p.extra["gold_chosen"] - p.extra["gold_rejected"])
            for p in TASK.preference_pairs(1000, seed=12)]
    assert 0.2 < sum(g <= 1 for g in gaps) / 1000 < 0.5
    assert sum(g >= 3 for g in gaps) / 1000 > 0.25


def test_ranked_and_prompt_examples():
    ranked = TASK.ranked_examples(40, k=5, seed=13)
    assert all(isinstance(r, RankedExample) and len(r.responses) == len(r.scores) == 5
               for r in ranked)
    for r in ranked:
        assert r.scores == [TASK.gold_reward(r.prompt, x) for x in r.responses]
    assert len({s for r in ranked for s in r.scores}) > 5
    prompts = TASK.prompt_examples(10, seed=13)
    assert all(isinstance(p, PromptExample) for p in prompts)
    assert all(p.extra["target"] == TASK.target(p.prompt) for p in prompts)
    with pytest.raises(ValueError, match="k"):
        TASK.ranked_examples(1, k=1)


def test_pairs_need_error_rates_that_differ():
    with pytest.raises(ValueError, match="error rates"):
        TASK.preference_pairs(3, error_rates=(0.0, 0.0))


def test_config_validation():
    with pytest.raises(TypeError, match="unknown"):
        SyntheticTask(seed=0, n_symbol=3)
    with pytest.raises(ValueError, match="ops"):
        TaskConfig(ops=("copy", "dance"))
    with pytest.raises(ValueError, match="correct_reward"):
        TaskConfig(wrong_symbol_reward=2.0)
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(architecture="mamba")
    small = SyntheticTask(seed=0, ops=("copy",), n_symbols=5, max_symbols=4)
    assert all(p.startswith("copy ") for p in small.prompts(20))
    assert len(small.tokenizer) == 4 + 1 + 1 + 5 + len(FILLERS)


# ---- the tokenizer ----------------------------------------------------------------------------

def test_tokenizer_round_trip(tmp_path):
    tok = TASK.tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == len(TASK.words)
    for pair in TASK.preference_pairs(50, seed=14):
        for text in (pair.prompt, pair.chosen, pair.rejected):
            ids = tok(text)["input_ids"]
            assert len(ids) == len(text.split())  # no specials added, one id per word
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
        # Separately tokenized prompt and response concatenate to the joined text's ids.
        assert TASK.encode(pair.prompt, pair.chosen) == tok(
            pair.prompt + " " + pair.chosen)["input_ids"] + [tok.eos_token_id]
    assert tok("cat dragon")["input_ids"] == [tok.convert_tokens_to_ids("cat"), tok.unk_token_id]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "sort cat ant owl = ant cat owl"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token == "<eos>" and again.pad_token_id == 0
    assert again.chat_template == tok.chat_template


def test_chat_template_prefix_property():
    tok = TASK.tokenizer
    prompt, response = "reverse cat ant owl =", "owl ant cat"
    messages = [{"role": "user", "content": prompt}]
    head = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                   tokenize=False)
    assert full.startswith(head)
    head_ids = tok(head)["input_ids"]
    full_ids = tok(full)["input_ids"]
    assert full_ids[:len(head_ids)] == head_ids
    assert full_ids == TASK.encode(prompt, response)


# ---- the models -------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_model_forward_shapes(architecture, tmp_path):
    task = SyntheticTask(seed=0, model=ModelConfig(architecture=architecture))
    policy = task.make_policy(0)
    assert isinstance(policy, LlamaForCausalLM if architecture == "llama" else GPT2LMHeadModel)
    assert sum(p.numel() for p in policy.parameters()) < 200_000
    rows = [task.encode(p, task.target(p)) for p in task.prompts(3, seed=0)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    logits = policy(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (3, width, len(task.tokenizer))
    backbone = task.make_reward_backbone(0)
    hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hidden.shape == (3, width, task.config.model.hidden_size)
    policy.save_pretrained(tmp_path)
    loaded = type(policy).from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits)


def test_reward_backbone_from_policy_is_a_copy():
    policy = TASK.make_policy(0)
    backbone = TASK.make_reward_backbone(from_policy=policy)
    assert isinstance(backbone, LlamaModel)
    for (name, a), b in zip(backbone.named_parameters(), policy.base_model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_generate_is_deterministic_and_well_formed(architecture):
    task = SyntheticTask(seed=0, model=ModelConfig(architecture=architecture))
    policy = task.make_policy(0)
    prompts = task.prompts(40, seed=15)
    texts, terminated = task.generate(policy, prompts, seed=3, max_new_tokens=6,
                                      return_terminated=True)
    # A prompt's sample depends on the seed and its index only, not on the batching.
    assert texts == task.generate(policy, prompts, seed=3, max_new_tokens=6, batch_size=7)
    assert texts != task.generate(policy, prompts, seed=4, max_new_tokens=6)
    specials = {"<pad>", "<bos>", "<eos>", "<unk>"}
    for text, ended in zip(texts, terminated):
        words = text.split()
        assert len(words) <= 6 and not specials & set(words)
        assert ended or len(words) == 6
    # Left padding must not change a prompt's greedy answer.
    alone = [task.generate(policy, [p], greedy=True)[0] for p in prompts[:5]]
    assert alone == task.generate(policy, prompts[:5], greedy=True)


# ---- training ---------------------------------------------------------------------------------

def test_sft_raises_gold_reward():
    policy = TASK.make_policy(0)
    prompts = TASK.prompts(200, seed=16)
    before = TASK.evaluate_policy(policy, prompts, greedy=True)
    losses = TASK.sft(policy, TASK.demonstrations(2000, error_rate=0.1, seed=16), steps=300)
    after = TASK.evaluate_policy(policy, prompts, greedy=True)
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:20]) / 20
    # Untrained: long unterminated junk (mean reward < 0). Measured after 300 steps: about +3.4
    # of a mean maximum of 6.5, all terminated, a minority of answers perfect.
    assert before["mean_gold_reward"] < 0
    assert after["mean_gold_reward"] > before["mean_gold_reward"] + 3
    assert after["terminated"] > 0.9
    assert after["perfect"] < 0.9  # imperfect: PPO and RRHF have room to improve
