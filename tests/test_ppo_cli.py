"""`rlengine ppo` end to end: options from YAML and flags, clear errors, exact resume after
SIGKILL, a 2-process torchrun run that matches one process, and segment rewards from a reward
model folder with a normalizer written by `rlengine fit-normalizer`.

Runs start from the synthetic task's SFT policy saved once as a checkpoint folder, so that the
subprocesses load it instead of training it again."""

from __future__ import annotations

import dataclasses
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
from rlengine.policy import PPOConfig
from rlengine.policy.job import PPOJobConfig, synthetic_task
from rlengine.reward import RewardModel
from rlengine.training.metrics import read_metrics

torch.set_num_threads(1)
TASK = synthetic_task(0)
ITERATIONS = 6


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    return save_sft_policy(TASK, tmp_path_factory.mktemp("sft") / "policy")


def _small(policy_dir: Path) -> list[str]:
    # 6 iterations of 16 prompts x 2 samples in 2 generation chunks; a checkpoint after each
    return ["--model", str(policy_dir), "--synthetic-prompts", "128",
            "--synthetic-eval-prompts", "40", "--iterations", str(ITERATIONS),
            "--prompts-per-iteration", "16", "--samples-per-prompt", "2",
            "--generation-batch-size", "8", "--mini-batch-size", "8", "--actor-lr", "2e-4",
            "--critic-lr", "1e-3", "--max-new-tokens", "10", "--evaluate-every", "3",
            "--save-every", "1", "--keep-checkpoints", "0", "--threads", "1",
            "--progress", "false"]


def _main(argv: list[str], capsys, command: str = "ppo") -> tuple[int, str, str]:
    return main_exit([command, *argv], capsys)


@pytest.fixture(scope="module")
def reference_run(policy_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_cli("ppo", *_small(policy_dir), "--output-dir", str(out))
    return out


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ppo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for cls in (PPOJobConfig, PPOConfig):
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')} " in text, f.name


def test_yaml_flags_and_synthetic_defaults(tmp_path, capsys):
    config = tmp_path / "ppo.yaml"
    config.write_text("iterations: 5\nreward_kind: segment\nvalue_clip: 0.25\nreward: train\n")
    code, out, err = _main(["--config", str(config), "--iterations", "7", "--print-config"],
                           capsys)
    assert code == 0, err
    merged = yaml.safe_load(out)
    assert merged["iterations"] == 7 and merged["reward_kind"] == "segment"  # flag wins
    assert merged["value_clip"] == 0.25 and merged["reward"] == "train"
    assert merged["actor_lr"] == 2e-4 and merged["samples_per_prompt"] == 4  # synthetic's
    code, out, _ = _main(["--model", "some/folder", "--print-config"], capsys)
    assert yaml.safe_load(out)["actor_lr"] == 1e-6  # the default for real models


@pytest.mark.parametrize("flags, message", [
    (["--iterations", "0"], "iterations must be >= 1, got 0"),
    (["--reward-kind", "dense"], "--reward-kind: must be one of bandit, token, segment"),
    (["--mini-batch-size", "48"], "mini_batch_size (48) must divide the rollout batch"),
    (["--iterationz", "2"], "unrecognized arguments"),
    (["--model", "{tmp}/none"], "local checkpoint folder"),
    (["--data", "{tmp}/none.jsonl"], "neither 'synthetic' nor an existing file"),
    (["--reward", "model"], "reward 'model' needs reward_model"),
    (["--reward-model", "{tmp}"], "reward_model: "),
    (["--reward-kind", "segment"], "reward 'gold' is one number per response"),
    (["--reward", "train", "--normalizer", "{tmp}/n.json", "--reward-kind", "token"],
     "is neither auto, fit, none nor an existing JSON file"),
    (["--reward", "train", "--normalizer", "fit"], "reward_kind is 'bandit'"),
    (["--critic", "reward_model"], "critic 'reward_model' needs a reward model"),
    (["--synthetic-prompts", "8", "--prompts-per-iteration", "16", "--mini-batch-size", "16"],
     "prompts_per_iteration (16) is larger than the number of prompts (8)"),
])
def test_bad_options_exit_2_with_a_clear_message(tmp_path, capsys, flags, message):
    code, _, err = _main([a.format(tmp=tmp_path) for a in flags] + ["--threads", "1"], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(policy_dir, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = ["ppo", *_small(policy_dir), "--output-dir", str(out)]
    kill_after_checkpoint(args, out, 2, unit="iteration")
    assert max(checkpoint_steps(out)) < ITERATIONS

    resumed = run_cli(*args)
    assert "resumed from" in resumed.stdout
    assert_same_run(out, reference_run, models=("model", "critic"))


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(policy_dir, reference_run, tmp_path):
    out = tmp_path / "ddp"
    result = run_two_process_torchrun(["ppo", *_small(policy_dir), "--save-every", "0",
                                       "--output-dir", str(out)])
    assert "2 process(es)" in result.stdout and result.stdout.count("policy: ") == 1
    assert_close_run(out, reference_run, metrics_tol=2e-3, atol=2e-4, rtol=2e-3,
                     models=("model", "critic"))


def test_segment_rewards_from_a_reward_model_folder_and_a_fitted_normalizer(
        policy_dir, tmp_path, capsys):
    """A RewardModel folder (here untrained: the rewards' source, not their quality, is under
    test), its normalizer from `rlengine fit-normalizer`, segment-dense PPO with the critic
    started from the reward model."""
    reward_dir = RewardModel(TASK.make_reward_backbone(from_policy=TASK.sft_policy())) \
        .save_pretrained(tmp_path / "rm", TASK.tokenizer)
    normalizer = tmp_path / "normalizer.json"
    code, _, err = _main(["--reward-model", str(reward_dir), "--output", str(normalizer),
                          "--synthetic-pairs", "100", "--threshold", "1.5", "--threads", "1"],
                         capsys, command="fit-normalizer")
    assert code == 0, err
    out = tmp_path / "run"
    code, stdout, err = _main([
        "--model", str(policy_dir), "--reward-model", str(reward_dir), "--reward-kind",
        "segment", "--segment-threshold", "1.5", "--normalizer", str(normalizer), "--critic",
        "reward_model", "--iterations", "2", "--prompts-per-iteration", "8",
        "--samples-per-prompt", "2", "--mini-batch-size", "8", "--max-new-tokens", "8",
        "--synthetic-eval-prompts", "20", "--threads", "1", "--progress", "false",
        "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert "reward: model (segment); normalizer mu(p) = " in stdout
    assert "segment rewards of a reward model" in stdout
    records = [r for r in read_metrics(out) if "rollout/segments" in r]
    assert len(records) == 2 and all(r["rollout/segments"] >= 1 for r in records)
    assert all(math_finite(r["train/value"]) for r in records)
    saved = RewardModel.load(out / "critic")
    assert isinstance(saved, RewardModel)


def math_finite(value) -> bool:
    return isinstance(value, float) and value == value and abs(value) != float("inf")
