"""`rlengine sft` and the README's real-text path: demonstrations from every format (prompt /
completion rows, pairs, HH-RLHF transcripts, conversations), the loss on response tokens only
(against a full log-softmax by hand), the same gradient however a step is split, the CLI
(YAML + flags, errors, exact resume after SIGKILL), and HH-RLHF end to end: a reward model
with a trained tokenizer, an SFT policy on that tokenizer, then RRHF and PPO with both."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    REPO,
    assert_close_run,
    assert_same_run,
    checkpoint_steps,
    kill_after_checkpoint,
    main_exit,
    run_cli,
    run_two_process_torchrun,
)

from rlengine import cli
from rlengine.configs import ConfigError
from rlengine.data import (
    DataFormatError,
    Demonstration,
    DemonstrationDataset,
    load_demonstrations,
    load_tokenizer,
    tokenize_prompt,
    train_text_tokenizer,
)
from rlengine.data.types import PromptExample
from rlengine.policy import SFTConfig, SFTTrainer
from rlengine.policy.job import (
    SFTJobConfig,
    check_reward_model_tokenizer,
    load_queries,
    synthetic_task,
)
from rlengine.policy.rollout import learned_position_limit
from rlengine.reward import RewardModel
from rlengine.synthetic.models import ModelConfig, make_base_model, make_causal_lm
from rlengine.training.checkpoint import CheckpointManager
from rlengine.training.metrics import read_metrics

torch.set_num_threads(1)

# The real HH-RLHF harmless test split lives in shared/, beside the checkout (never copied in).
HH_FILE = Path(os.environ.get(
    "RLENGINE_HH_FILE", REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"))
needs_hh = pytest.mark.skipif(not HH_FILE.is_file(), reason=f"no HH-RLHF file at {HH_FILE} "
                                                            f"(set RLENGINE_HH_FILE to its path)")
TASK = synthetic_task(0)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(argv: list[str], capsys) -> tuple[int, str, str]:
    return main_exit(["sft", *argv], capsys)


# ---- data ---------------------------------------------------------------------------------------

def test_demonstrations_from_every_format(tmp_path):
    hh_chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: no"
    hh_rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: ok then"
    chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    rows = [{"prompt": "Q1", "response": " A1", "id": 7},
            {"prompt": "Q2", "completion": " A2"},
            {"prompt": "Q3", "chosen": " good", "rejected": " bad"},
            {"chosen": hh_chosen, "rejected": hh_rejected},
            {"messages": chat},
            {"text": hh_chosen},
            {"text": "just some text"}]
    examples = load_demonstrations(_write_jsonl(tmp_path / "demos.jsonl", rows))
    got = [(e.prompt, e.response) for e in examples]
    hh_prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant:"
    assert got == [("Q1", " A1"), ("Q2", " A2"), ("Q3", " good"), (hh_prompt, " no"),
                   (chat[:1], chat[1:]), (hh_prompt, " no"), (None, "just some text")]
    assert examples[0].extra == {"id": 7} and str(examples[1].source).endswith("demos.jsonl:2")

    bad = _write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "Q", "answer": "A"}])
    with pytest.raises(DataFormatError, match=r"bad\.jsonl, line 2: no response to train on: "
                                              r"expected one of the fields 'response', "
                                              r"'completion', 'chosen', 'messages', 'text'"):
        load_demonstrations(bad)
    with pytest.raises(DataFormatError, match=r"line 1: the conversation does not end with an "
                                              r"assistant message"):
        load_demonstrations(_write_jsonl(tmp_path / "c.jsonl", [{"messages": chat[:1]}]))


def test_tokenized_demonstrations_mask_the_prompt_and_keep_it_an_exact_prefix():
    tokenizer = train_text_tokenizer(["the cat sat on the mat", "a dog ran"] * 5, vocab_size=300)
    data = DemonstrationDataset([Demonstration("the cat", " sat on the mat"),
                                 Demonstration(None, "a dog ran")], tokenizer,
                                max_length=6, max_prompt_length=2)
    first, whole = data[0].sequence, data[1].sequence
    prompt_ids = tokenize_prompt(PromptExample("the cat"), tokenizer).input_ids
    assert first.input_ids[:first.response_start] == prompt_ids[-first.response_start:]
    assert len(first.input_ids) == 6 and first.response_tokens_cut > 0  # cut from the right
    # no prompt: the tokenizer's BOS is the context, every text token and EOS are labels
    assert whole.input_ids[0] == tokenizer.bos_token_id and whole.response_start == 1
    batch = data.collate([data[0], data[1]])
    assert batch["response_mask"][0].tolist() == [i >= first.response_start for i in range(6)]
    assert data.truncation.truncated == 1 and whole.response_tokens_cut == 0


def _tiny_policy(tokenizer, *, architecture: str = "llama", seed: int = 0):
    config = ModelConfig(architecture=architecture, hidden_size=32, num_layers=1, num_heads=2,
                         intermediate_size=64, max_positions=64)
    return make_causal_lm(config, tokenizer, seed)


def test_the_loss_is_the_mean_response_token_nll_and_splitting_a_step_changes_nothing():
    demos = TASK.demonstrations(24, seed=3)
    config = SFTConfig(batch_size=8, steps=1, lr=1e-2, schedule="constant", log_every=1,
                       progress=False, max_length=None)
    runs = {}
    for name, kernels, grad_accum in (("engine", "engine", 1), ("accumulated", "engine", 4),
                                      ("reference", "reference", 1)):
        policy = _tiny_policy(TASK.tokenizer)
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        trainer = SFTTrainer(policy, TASK.tokenizer, demos,
                             dataclasses.replace(config, grad_accum=grad_accum),
                             kernels=kernels, log=lambda *_: None)
        indices = trainer._step_indices(0)
        result = trainer.train()
        runs[name] = (result.history[0]["train/loss"], policy.state_dict())

    # by hand: the full log-softmax, response tokens only (prompt masked), mean over them
    model = _tiny_policy(TASK.tokenizer)
    model.load_state_dict(before)
    rows = [trainer.train_data[i].sequence for i in indices]
    nll, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        picked = logp[torch.arange(len(targets)), targets][row.response_start - 1:]
        nll -= float(picked.sum())
        count += len(picked)
    assert runs["engine"][0] == pytest.approx(nll / count, rel=1e-5)
    assert runs["reference"][0] == pytest.approx(nll / count, rel=1e-5)
    for other in ("accumulated", "reference"):
        for key, tensor in runs["engine"][1].items():
            torch.testing.assert_close(runs[other][1][key], tensor, atol=2e-6, rtol=1e-4)


def test_the_trainer_refuses_a_tokenizer_the_model_cannot_embed_and_too_long_texts():
    small = train_text_tokenizer(["ab cd"] * 4, vocab_size=270)
    big = train_text_tokenizer(["the quick brown fox jumps over the lazy dog"] * 5,
                               vocab_size=320)
    demos = [Demonstration("the quick", " brown fox jumps")] * 4
    with pytest.raises(ValueError, match=r"token id \d+, but the policy's embedding table has "
                                         r"\d+ rows"):
        SFTTrainer(_tiny_policy(small), big, demos, SFTConfig(batch_size=2, progress=False))
    long_demos = [Demonstration("the quick brown fox " * 10, " jumps over the lazy dog " * 10)]
    gpt2 = _tiny_policy(big, architecture="gpt2")
    assert learned_position_limit(gpt2) == 64 and learned_position_limit(_tiny_policy(big)) is None
    with pytest.raises(ValueError, match=r"reach \d+ tokens, but the policy has learned position "
                                         r"embeddings for 64 only; set max_length"):
        SFTTrainer(gpt2, big, long_demos, SFTConfig(batch_size=1, max_length=None,
                                                    progress=False))
    SFTTrainer(gpt2, big, long_demos, SFTConfig(batch_size=1, max_length=64, progress=False))


def test_a_policy_and_a_reward_model_with_different_tokenizers_are_refused(tmp_path):
    ours = train_text_tokenizer(["hello there, general kenobi"] * 4, vocab_size=280)
    theirs = train_text_tokenizer(["a completely different corpus of words"] * 4,
                                  vocab_size=290)
    config = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    rm_dir = RewardModel(make_base_model(config, theirs, 0)).save_pretrained(
        tmp_path / "rm" / "model", theirs)
    with pytest.raises(ConfigError) as error:
        check_reward_model_tokenizer(ours, "the tokenizer in sft/model",
                                     RewardModel.load(rm_dir), tmp_path / "rm")
    message = str(error.value)
    assert "the policy's tokenizer (the tokenizer in sft/model) is not the reward model's (the " \
           f"tokenizer in {rm_dir})" in message and f"rlengine sft --tokenizer {rm_dir}" in message
    check_reward_model_tokenizer(load_tokenizer(tmp_path / "rm"), "the same",
                                 RewardModel.load(rm_dir), tmp_path / "rm")  # a run directory


# ---- the command -----------------------------------------------------------------------------

def test_help_lists_every_option_and_yaml_flags_and_defaults_combine(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["sft", "--help"])
    text = capsys.readouterr().out
    for cls in (SFTJobConfig, SFTConfig):
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')} " in text, f.name
    config = _write_jsonl(tmp_path / "c.yaml", [])
    config.write_text("batch_size: 8\nwarmup_steps: 5\nlr: 0.01\n")
    code, out, err = _sft(["--config", str(config), "--lr", "0.002", "--print-config"], capsys)
    merged = yaml.safe_load(out)
    assert code == 0 and merged["lr"] == 0.002 and merged["warmup_steps"] == 5, err
    assert merged["batch_size"] == 8 and merged["steps"] == 700  # the synthetic default stands
    code, out, _ = _sft(["--model", "tiny-gpt2", "--print-config"], capsys)
    assert yaml.safe_load(out)["lr"] == 1e-3  # a fresh tiny model
    code, out, _ = _sft(["--model", "some/folder", "--print-config"], capsys)
    assert yaml.safe_load(out)["lr"] == 2e-5 and yaml.safe_load(out)["steps"] is None


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--data", "{tmp}/none.jsonl"], "neither 'synthetic' nor an existing file"),
    (["--model", "tiny-llama"], "model 'tiny-llama' is built for a tokenizer"),
    (["--model", "{tmp}", "--tokenizer", "train"], "tokenizer 'train' makes new token ids"),
    (["--model", "{tmp}"], "no config.json there"),
    (["--tokenizer", "{tmp}"], "model 'synthetic' has its own tokenizer"),
    (["--max-prompt-length", "10", "--max-length", "none"], "max_prompt_length is the prompt's"),
    (["--synthetic-demonstrations", "8", "--batch-size", "16"],
     "batch_size (16) is larger than the training set (8 examples)"),
])
def test_bad_options_exit_2_with_a_clear_message(tmp_path, capsys, flags, message):
    code, _, err = _sft([a.format(tmp=tmp_path) for a in flags] + ["--threads", "1"], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def _small_synthetic() -> list[str]:
    # 40 steps of 16 on 512 demonstrations; a checkpoint after every step; the greedy gold
    # reward on 64 held-out prompts (16 left its rise within the noise of some seeds)
    return ["--synthetic-demonstrations", "512", "--eval-fraction", "0.1",
            "--synthetic-eval-prompts", "64", "--steps", "40", "--batch-size", "16",
            "--eval-every", "20", "--log-every", "1", "--save-every", "1",
            "--keep-checkpoints", "0", "--threads", "1", "--progress", "false"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("reference")
    return out, run_cli("sft", *_small_synthetic(), "--output-dir", str(out)).stdout


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(reference_run, tmp_path):
    reference, stdout = reference_run
    assert "heldout/loss:" in stdout and "policy/gold_reward_greedy:" in stdout
    final = json.loads((reference / "final_metrics.json").read_text())
    assert final["steps"] == 40 and len(final["evaluations"]) == 3
    before, after = final["evaluations"][0], final["evaluations"][-1]
    # Over 12 seeds x 4 CPU code paths: the held-out loss falls by 0.593 to 0.729 (mean 0.674,
    # sd 0.038), the greedy gold reward rises by 1.65 to 9.35 (mean 6.0, sd 2.4);
    # bench/results/outcome-spread-2026-12-07.md
    assert after["eval/heldout/loss"] < before["eval/heldout/loss"] - 0.45
    assert after["eval/policy/gold_reward_greedy"] > before["eval/policy/gold_reward_greedy"] + 0.5

    out = tmp_path / "killed"
    args = ["sft", *_small_synthetic(), "--output-dir", str(out)]
    kill_after_checkpoint(args, out, 3)
    assert max(checkpoint_steps(out)) < 40
    assert "resumed from" in run_cli(*args).stdout
    assert_same_run(out, reference)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(reference_run, tmp_path):
    out = tmp_path / "ddp"
    result = run_two_process_torchrun(["sft", *_small_synthetic(), "--save-every", "0",
                                       "--output-dir", str(out)])
    assert "2 process(es)" in result.stdout and result.stdout.count("policy: ") == 1
    assert_close_run(out, reference_run[0], metrics_tol=1e-3, atol=1e-4, rtol=1e-3)


# ---- HH-RLHF end to end ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hh_pairs(tmp_path_factory) -> Path:
    """The first 200 HH-RLHF pairs (a smaller file makes every command's loading quick)."""
    path = tmp_path_factory.mktemp("hh") / "hh-200.jsonl"
    with gzip.open(HH_FILE, "rt") as handle:
        path.write_text("".join(next(handle) for _ in range(200)))
    return path


@pytest.mark.slow
@needs_hh
def test_hh_rlhf_reward_model_then_sft_then_rrhf_and_ppo_through_the_cli(hh_pairs, tmp_path,
                                                                       capsys):
    common = ["--threads", "1", "--progress", "false"]
    rm = tmp_path / "rm"
    code, _, err = main_exit(
        ["train-rm", "--train", str(hh_pairs), "--eval-fraction", "0.2", "--model", "tiny-llama",
         "--tokenizer", "train", "--max-length", "256", "--batch-size", "16", "--lr", "1e-3",
         "--output-dir", str(rm), *common], capsys)
    assert code == 0, err

    # the policy on the reward model's tokenizer: its train-rm output directory
    sft = tmp_path / "sft"
    code, out, err = _sft(["--data", str(hh_pairs), "--eval-fraction", "0.2", "--model",
                           "tiny-llama", "--tokenizer", str(rm), "--max-length", "256",
                           "--batch-size", "16", "--epochs", "2", "--log-every", "1",
                           "--output-dir", str(sft), *common], capsys)
    assert code == 0, err
    assert "SFT on 160 examples" in out and f"policy: {sft / 'model'}" in out
    losses = [r["train/loss"] for r in read_metrics(sft) if "train/loss" in r]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    # falling on its training data: by 0.999-1.049 (mean 1.021, sd 0.015) over 10 seeds x 4
    # CPU code paths; bench/results/outcome-spread-2026-12-07.md
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.9
    final = json.loads((sft / "final_metrics.json").read_text())["metrics"]["heldout"]
    assert final["examples"] == 40 and final["loss"] < losses[0]
    assert load_tokenizer(sft / "model").get_vocab() == load_tokenizer(rm).get_vocab()

    rrhf = tmp_path / "rrhf"
    code, out, err = main_exit(
        ["rrhf", "--model", str(sft / "model"), "--data", str(hh_pairs), "--limit", "16",
         "--reward-model", str(rm), "--rounds", "1", "--queries-per-step", "8",
         "--policy-samples", "2", "--max-new-tokens", "12", "--max-prompt-length", "128",
         "--max-response-length", "48", "--lr", "1e-3", "--output-dir", str(rrhf), *common],
        capsys)
    assert code == 0, err
    assert "policy samples' reward by round: 0: " in out and f"policy: {rrhf / 'model'}" in out
    assert (rrhf / "model" / "model.safetensors").is_file()
    records = [r for r in read_metrics(rrhf) if "train/loss" in r]
    assert len(records) == 2 and all(math.isfinite(r["train/loss"]) for r in records)

    # every candidate's reward is the reward model's score of prompt + response, and the best
    # (the SFT term's target) is the candidate it scores highest
    state = CheckpointManager.load(CheckpointManager(rrhf).latest())
    tokenizer = load_tokenizer(rm)
    reward_model = RewardModel.load(rm / "model").eval()
    queries = load_queries(str(hh_pairs), "auto", limit=16)
    best_rewards = []
    for query, candidates in zip(queries, state["candidates"], strict=True):
        assert [c["source"] for c in candidates] == ["policy", "policy", "chosen", "rejected"]
        prompt_ids = tokenize_prompt(PromptExample(query.prompt), tokenizer,
                                     max_length=128).input_ids
        with torch.no_grad():
            scores = [float(reward_model(torch.tensor([prompt_ids + c["response_ids"]]))
                            .values[0, -1]) for c in candidates]
        assert [c["reward"] for c in candidates] == pytest.approx(scores, abs=1e-4)
        best_rewards.append(max(scores))
    assert records[0]["round/best_reward_mean"] == pytest.approx(
        sum(best_rewards) / len(best_rewards), abs=1e-4)

    ppo = tmp_path / "ppo"
    code, out, err = main_exit(
        ["ppo", "--model", str(sft), "--data", str(hh_pairs), "--limit", "16",
         "--reward-model", str(rm), "--iterations", "2", "--prompts-per-iteration", "8",
         "--mini-batch-size", "8", "--max-new-tokens", "12", "--max-prompt-length", "128",
         "--actor-lr", "1e-4", "--critic-lr", "1e-3", "--output-dir", str(ppo), *common], capsys)
    assert code == 0, err
    assert "rollout reward: " in out and "over iteration(s) 2" in out
    rollouts = [r for r in read_metrics(ppo) if "rollout/reward" in r]
    assert len(rollouts) == 2 and all(math.isfinite(r["rollout/reward"]) for r in rollouts)
    assert (ppo / "model" / "model.safetensors").is_file()

    # a policy trained on its own tokenizer cannot be scored by this reward model
    own = tmp_path / "own"
    code, _, err = _sft(["--data", str(hh_pairs), "--limit", "32", "--model", "tiny-llama",
                         "--tokenizer", "train", "--tokenizer-vocab", "1000", "--max-length",
                         "128", "--steps", "1", "--batch-size", "16", "--output-dir", str(own),
                         *common], capsys)
    assert code == 0, err
    code, _, err = main_exit(["rrhf", "--model", str(own), "--data", str(hh_pairs), "--limit",
                              "8", "--reward-model", str(rm), *common], capsys)
    assert code == 2 and "is not the reward model's" in err and str(rm / "model") in err, err
