"""`rlengine rrhf` end to end: options from YAML and flags, clear errors, exact resume after
SIGKILL, a 2-process torchrun run that matches one process, and data files (pairs, ranked
responses, other models' response files) with a reward model.

Runs start from the synthetic task's SFT policy saved once as a checkpoint folder, so that the
subprocesses load it instead of training it again."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    assert_close_run,
    assert_same_run,
    checkpoint_steps,
    kill_after_checkpoint,
    main_exit,
    run_cli,
    run_two_process_torchrun,
    save_sft_policy,
)

from rlengine import cli
from rlengine.policy import RRHFConfig
from rlengine.policy.job import RRHFJobConfig, synthetic_task
from rlengine.reward import RewardModel
from rlengine.training.metrics import read_metrics

torch.set_num_threads(1)
TASK = synthetic_task(0)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return save_sft_policy(TASK, tmp_path_factory.mktemp("sft") / "policy")


def _small(policy_dir: Path) -> list[str]:
    # 128 queries, 2 rounds of 16 steps; a checkpoint after every step
    return ["--model", str(policy_dir), "--synthetic-queries", "128", "--synthetic-eval-prompts",
            "40", "--rounds", "2", "--queries-per-step", "8", "--lr", "1e-3",
            "--max-new-tokens", "10", "--save-every", "1", "--keep-checkpoints", "0",
            "--threads", "1", "--progress", "false"]


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    return main_exit(["rrhf", *argv], capsys)


@pytest.fixture(scope="module")
def reference_run(policy_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_cli("rrhf", *_small(policy_dir), "--output-dir", str(out))
    return out


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["rrhf", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for cls in (RRHFJobConfig, RRHFConfig):
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')} " in text, f.name


def test_yaml_flags_and_synthetic_defaults(tmp_path, capsys):
    config = tmp_path / "rrhf.yaml"
    config.write_text("rounds: 5\nrank_weight: 0\nsampling: diverse_beam\n")
    code, out, err = _main(["--config", str(config), "--rounds", "2", "--print-config"], capsys)
    assert code == 0, err
    merged = yaml.safe_load(out)
    assert merged["rounds"] == 2 and merged["rank_weight"] == 0  # flag wins, YAML stands
    assert merged["sampling"] == "diverse_beam"
    assert merged["lr"] == 1e-3 and merged["max_new_tokens"] == 12  # the synthetic defaults
    code, out, _ = _main(["--model", "some/folder", "--print-config"], capsys)
    assert yaml.safe_load(out)["lr"] == 2e-5  # the paper's, for real models


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "0"], "rounds must be >= 1, got 0"),
    (["--sampling", "beam"], "command line: --sampling: must be one of sample, diverse_beam"),
    (["--roundz", "2"], "unrecognized arguments"),
    (["--model", "{tmp}/none"], "local checkpoint folder"),
    (["--data", "{tmp}/none.jsonl"], "neither 'synthetic' nor an existing file"),
    (["--reward", "model"], "reward 'model' needs reward_model"),
    (["--reward", "dataset"], "reward 'dataset' scores only the data's own responses"),
    (["--synthetic-queries", "8", "--queries-per-step", "16"],
     "queries_per_step (16) is larger than the number of queries (8)"),
])
def test_bad_options_exit_2_with_a_clear_message(tmp_path, capsys, flags, message):
    code, _, err = _main([a.format(tmp=tmp_path) for a in flags] + ["--threads", "1"], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(policy_dir, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = ["rrhf", *_small(policy_dir), "--output-dir", str(out)]
    kill_after_checkpoint(args, out, 3)
    killed_at = max(checkpoint_steps(out))
    assert killed_at < 32

    resumed = run_cli(*args)
    assert "resumed from" in resumed.stdout
    assert_same_run(out, reference_run)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(policy_dir, reference_run, tmp_path):
    out = tmp_path / "ddp"
    result = run_two_process_torchrun(["rrhf", *_small(policy_dir), "--save-every", "0",
                                       "--output-dir", str(out)])
    assert "2 process(es)" in result.stdout and result.stdout.count("policy: ") == 1
    assert_close_run(out, reference_run, metrics_tol=1e-3, atol=1e-4, rtol=1e-3)


def test_data_files_response_files_and_a_reward_model(policy_dir, tmp_path, capsys):
    """Pairs as queries (chosen and rejected are candidates), another model's responses added
    by prompt, a reward model scoring every candidate; then offline RRHF on ranked data."""
    examples = [e for e in TASK.ranked_examples(24, k=3, seed=8)
                if all(r.strip() for r in e.responses)][:16]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.responses[0],
                                         "rejected": e.responses[1]}) + "\n" for e in examples))
    other = tmp_path / "other_model.jsonl"
    other.write_text("".join(json.dumps({"prompt": e.prompt, "responses": [e.responses[2]]})
                             + "\n" for e in examples[:10])
                     + json.dumps({"prompt": "unknown =", "responses": ["x"]}) + "\n")
    reward_dir = RewardModel(TASK.make_reward_backbone(from_policy=TASK.sft_policy())) \
        .save_pretrained(tmp_path / "rm", TASK.tokenizer)
    out = tmp_path / "run"
    code, stdout, err = _main(["--model", str(policy_dir), "--data", str(pairs),
                               "--response-files", str(other), "--reward-model", str(reward_dir),
                               "--rounds", "1", "--queries-per-step", "8", "--policy-samples",
                               "2", "--max-new-tokens", "8", "--lr", "1e-3", "--threads", "1",
                               "--progress", "false", "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert f"{other}: responses for 10 prompt(s); 1 row(s) match no query" in stdout
    records = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(records) == 2 and all(r["train/loss"] == r["train/loss"] for r in records)
    assert (out / "model" / "model.safetensors").is_file()

    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(json.dumps({"prompt": e.prompt, "responses": e.responses,
                                          "scores": e.scores}) + "\n" for e in examples))
    code, stdout, err = _main(["--model", str(policy_dir), "--data", str(ranked),
                               "--policy-samples", "0", "--rounds", "1", "--queries-per-step",
                               "8", "--lr", "1e-3", "--threads", "1", "--progress", "false"],
                              capsys)
    assert code == 0, err
    ranked.write_text(ranked.read_text() + json.dumps({"prompt": "p", "responses": ["a"],
                                                       "scores": [1, 2]}) + "\n")
    code, _, err = _main(["--model", str(policy_dir), "--data", str(ranked), "--policy-samples",
                          "0", "--threads", "1"], capsys)
    assert code == 2 and f"{ranked}, line 17" in err and "1 responses but 2 scores" in err, err
