"""`rlengine ppo` end to end: options from YAML and flags, clear errors, exact resume after
SIGKILL, a 2-process torchrun run that matches one process, and segment rewards from a reward
model folder with a normalizer written by `rlengine fit-normalizer`.

Runs start from the synthetic task's SFT policy saved once as a checkpoint folder, so that the
subprocesses load it instead of training it again."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port
from safetensors.torch import load_file

from rlengine import cli
from rlengine.policy import PPOConfig
from rlengine.policy.job import PPOJobConfig, synthetic_task
from rlengine.reward import RewardModel
from rlengine.training.metrics import read_metrics

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TASK = synthetic_task(0)
TIMED_KEYS = ("train/tokens_per_second",)
ITERATIONS = 6


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sft") / "policy"
    TASK.sft_policy().save_pretrained(path)
    TASK.tokenizer.save_pretrained(path)
    return path


def _small(policy_dir: Path) -> list[str]:
    # 6 iterations of 16 prompts x 2 samples in 2 generation chunks; a checkpoint after each
    return ["--model", str(policy_dir), "--synthetic-prompts", "128",
            "--synthetic-eval-prompts", "40", "--iterations", str(ITERATIONS),
            "--prompts-per-iteration", "16", "--samples-per-prompt", "2",
            "--generation-batch-size", "8", "--mini-batch-size", "8", "--actor-lr", "2e-4",
            "--critic-lr", "1e-3", "--max-new-tokens", "10", "--evaluate-every", "3",
            "--save-every", "1", "--keep-checkpoints", "0", "--threads", "1",
            "--progress", "false"]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlengine.cli", "ppo", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(*args), capture_output=True, text=True, cwd=REPO,
                            env=_env(), timeout=300)
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMED_KEYS} for r in records]


def _weights(run_dir: Path, what: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run_dir / what / "model.safetensors")


def _main(argv: list[str], capsys, command: str = "ppo") -> tuple[int, str, str]:
    try:
        code = cli.main([command, *argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reference_run(policy_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    _run([*_small(policy_dir), "--output-dir", str(out)])
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


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")]


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(policy_dir, reference_run, tmp_path):
    out = tmp_path / "killed"
    args = [*_small(policy_dir), "--output-dir", str(out)]
    process = subprocess.Popen(_command(*args), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not [step for step in _checkpoint_steps(out) if step >= 2]:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint beyond iteration 2 appeared"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "final_metrics.json").exists(), "the run finished before the kill"
    assert max(_checkpoint_steps(out)) < ITERATIONS

    resumed = _run(args)
    assert "resumed from" in resumed.stdout
    assert json.loads((out / "final_metrics.json").read_text()) == \
        json.loads((reference_run / "final_metrics.json").read_text())
    assert _untimed(read_metrics(out)) == _untimed(read_metrics(reference_run))
    for what in ("model", "critic"):
        expected = _weights(reference_run, what)
        for name, tensor in _weights(out, what).items():
            assert torch.equal(tensor, expected[name]), (what, name)


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(policy_dir, reference_run, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "rlengine.cli", "ppo", *_small(policy_dir), "--save-every", "0",
               "--output-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(),
                            timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "2 process(es)" in result.stdout and result.stdout.count("policy: ") == 1
    records, expected = _untimed(read_metrics(out)), _untimed(read_metrics(reference_run))
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for got, want in zip(records, expected):
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=2e-3, abs=2e-3), (got["step"], key)
    for what in ("model", "critic"):
        expected_weights = _weights(reference_run, what)
        for name, tensor in _weights(out, what).items():
            torch.testing.assert_close(tensor, expected_weights[name], atol=2e-4, rtol=2e-3,
                                       msg=lambda m, name=name: f"{what} {name}: {m}")


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
