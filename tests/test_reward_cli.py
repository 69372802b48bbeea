"""`rlengine train-rm` end to end: options from YAML and flags, exact resume after SIGKILL, a
2-process torchrun run that matches one process, real HH-RLHF text, MetaRM meta sets (sampled
from the SFT policy, or read from a file of unlabeled samples) and segment scores.

The runs are small (a few hundred synthetic pairs, tens of steps, one thread each). Runs that
must be separate processes (SIGKILL, torchrun) are subprocesses; the others call the command's
entry point in this process, which saves the start-up time of torch and transformers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    REPO,
    cli_env,
    free_port,
    kill_after_checkpoint,
    main_exit,
    run_cli,
    untimed,
)
from safetensors.torch import load_file

from rlengine import cli
from rlengine.data import DataFormatError, load_samples
from rlengine.reward import RewardModel, RewardTrainerConfig
from rlengine.reward.job import RewardJobConfig
from rlengine.synthetic import SyntheticTask
from rlengine.training.metrics import read_metrics

# The real HH-RLHF harmless test split lives in shared/, beside the checkout (never copied in).
HH_FILE = Path(os.environ.get(
    "RLENGINE_HH_FILE", REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"))

# A small synthetic run: a random-init backbone (no SFT), 40 steps of 32 pairs.
SMALL = ["--synthetic-pairs", "300", "--synthetic-eval-pairs", "200", "--synthetic-init",
         "random", "--steps", "40", "--save-every", "5", "--threads", "1", "--progress", "false"]
def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model = run_dir / "model"
    return {**load_file(model / "model.safetensors"),
            **{f"value_head.{k}": v for k, v in load_file(model / "value_head.safetensors").items()}}


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final_metrics.json").read_text())


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    """`rlengine train-rm <argv>` in this process: (exit code, stdout, stderr)."""
    return main_exit(["train-rm", *argv], capsys)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted single-process run the resume and torchrun tests compare with."""
    out = tmp_path_factory.mktemp("reference")
    run_cli("train-rm", *SMALL, "--output-dir", str(out))
    return out


# ---- options: --help, YAML, flags, --print-config -------------------------------------------

def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train-rm", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    squeezed = "".join(text.split())  # argparse wraps lines (and breaks at hyphens)
    for cls in (RewardJobConfig, RewardTrainerConfig):
        for f in dataclasses.fields(cls):
            flag = f"--{f.name.replace('_', '-')}"
            assert f"{flag} " in text, f"{flag} ({cls.__name__}.{f.name}) missing from --help"
            assert "".join(f.metadata["help"].split()) in squeezed, \
                f"help text of {flag} missing"
    for flag in ("--config", "--print-config"):
        assert flag in text


def test_yaml_sets_options_and_flags_override_them(tmp_path, capsys):
    config = tmp_path / "rm.yaml"
    config.write_text("steps: 7\nscore-mode: token_mean\nlr: 0.01\nbatch_size: 8\n"
                      "eval:\n  extra: pairs.jsonl\nmax_grad_norm: null\n")
    code, out, err = _main(["--config", str(config), "--steps", "9", "--lr", "3e-4",
                            "--print-config"], capsys)
    assert code == 0, err
    merged = yaml.safe_load(out)
    assert merged["steps"] == 9 and merged["lr"] == 3e-4          # flags win
    assert merged["score_mode"] == "token_mean" and merged["batch_size"] == 8  # YAML stands
    assert merged["eval"] == {"extra": "pairs.jsonl"} and merged["max_grad_norm"] is None
    assert merged["seed"] == 0 and merged["train"] == "synthetic"  # defaults fill the rest
    fields = {f.name for cls in (RewardJobConfig, RewardTrainerConfig)
              for f in dataclasses.fields(cls)}
    assert set(merged) == fields
    # the printed configuration is itself a config file that resolves to the same thing
    config.write_text(out)
    code, again, err = _main(["--config", str(config), "--print-config"], capsys)
    assert code == 0 and again == out, err


@pytest.mark.parametrize("text, flags, message", [
    ("stepz: 3\n", [], "{file}: unknown option 'stepz' (did you mean steps?)"),
    ("batch_size: many\n", [], "{file}: batch_size: expected an integer, got 'many'"),
    ("score_mode: best\n", [], "{file}: score_mode: must be one of last, segment, token_mean"),
    ("label_smoothing: 2\n", [], "{file}: label_smoothing must be in [0, 1], got 2.0"),
    ("- steps\n", [], "{file}: the top level must be a mapping"),
    ("steps: 3\n", ["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    ("steps: 3\n", ["--resume", "maybe"], "command line: --resume: expected true or false"),
    ("steps: 3\n", ["--score-mode", "best"], "command line: --score-mode: must be one of"),
])
def test_bad_options_exit_2_naming_key_and_source(tmp_path, capsys, text, flags, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, out, err = _main(["--config", str(config), *flags, "--print-config"], capsys)
    assert code == 2 and message.format(file=config) in err, err
    assert "Traceback" not in err


def test_missing_config_file_and_bad_model_exit_2(tmp_path, capsys):
    code, _, err = _main(["--config", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and f"config file {tmp_path / 'none.yaml'} does not exist" in err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}) + "\n")
    code, _, err = _main(["--train", str(pairs), "--model", str(tmp_path / "nowhere"),
                          "--tokenizer", "train", "--threads", "1"], capsys)
    assert code == 2 and "nowhere" in err and "local checkpoint folder" in err, err


def test_options_that_do_not_fit_the_data_exit_2(capsys):
    code, _, err = _main(["--synthetic-pairs", "20", "--synthetic-init", "random",
                          "--batch-size", "32", "--steps", "1", "--threads", "1"], capsys)
    assert code == 2 and "batch_size (32) is larger than the training set" in err, err
    assert "Traceback" not in err


# ---- resume after SIGKILL ---------------------------------------------------------------------

@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(reference_run, tmp_path):
    out = tmp_path / "killed"
    args = [*SMALL, "--output-dir", str(out)]
    # killed as soon as a checkpoint beyond step 5 exists: mid-run, with more to do
    kill_after_checkpoint(["train-rm", *args], out, 6)

    resumed = run_cli("train-rm", *args)
    assert "resumed from" in resumed.stdout
    # exactly the same numbers on the CPU: same data order, same updates, same evaluation
    assert _final(out) == _final(reference_run)
    assert untimed(read_metrics(out)) == untimed(read_metrics(reference_run))
    expected = _weights(reference_run)
    actual = _weights(out)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_run_killed_after_its_last_checkpoint_finishes_on_rerun(reference_run, tmp_path, capsys):
    """Killed between the final checkpoint and the end: the rerun trains no more, and writes
    the model and the final metrics the run would have."""
    out = tmp_path / "late"
    shutil.copytree(reference_run, out)
    shutil.rmtree(out / "model")
    (out / "final_metrics.json").unlink()
    code, stdout, err = _main([*SMALL, "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert "resumed from" in stdout and "step 40 of 40" in stdout
    assert _final(out) == _final(reference_run)
    assert read_metrics(out) == read_metrics(reference_run)
    expected = _weights(reference_run)
    for name, tensor in _weights(out).items():
        assert torch.equal(tensor, expected[name]), name


def test_metrics_record_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    from rlengine.training.metrics import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "train/loss": 0.5}\n'
                                            '{"step": 10, "train/loss": 0.4}\n{"step": 1')
    MetricsLogger(tmp_path, resume_step=5).log(6, {"train/loss": 0.45})
    assert read_metrics(tmp_path) == [{"step": 5, "train/loss": 0.5},
                                      {"step": 6, "train/loss": 0.45}]


# ---- torchrun ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_process_torchrun_matches_one_process(reference_run, tmp_path, grad_accum):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "rlengine.cli", "train-rm", *SMALL, "--grad-accum", str(grad_accum),
               "--output-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=cli_env(),
                            timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    # rank 0 alone speaks and writes: one summary, one record per step logged
    assert result.stdout.count("validation clean:") == 1, result.stdout
    assert "2 process(es)" in result.stdout
    records, expected_records = read_metrics(out), read_metrics(reference_run)
    assert [sorted(r) for r in records] == [sorted(r) for r in expected_records]
    assert [r["step"] for r in records] == [r["step"] for r in expected_records]
    # float sums run in another order, nothing else differs: training metrics (averaged over
    # both processes), the single evaluation and the weights agree closely
    for got, want in zip(untimed(records), untimed(expected_records)):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-4), (got["step"], key)
    final, expected = _final(out), _final(reference_run)
    assert final["steps"] == expected["steps"] == 40
    for key, value in expected["metrics"]["clean"].items():
        assert final["metrics"]["clean"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    expected_weights = _weights(reference_run)
    for name, tensor in _weights(out).items():
        torch.testing.assert_close(tensor, expected_weights[name], atol=2e-4, rtol=1e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ---- real text --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not HH_FILE.is_file(), reason=f"no HH-RLHF file at {HH_FILE} (set "
                                                   f"RLENGINE_HH_FILE to its path)")
def test_hh_rlhf_pairs_train_a_tiny_llama_with_a_trained_tokenizer(tmp_path, capsys):
    out = tmp_path / "hh"
    code, stdout, err = _main(
        ["--train", str(HH_FILE), "--limit", "200", "--eval-fraction", "0.2",
         "--model", "tiny-llama", "--tokenizer", "train", "--max-length", "256",
         "--batch-size", "16", "--epochs", "1", "--lr", "1e-3", "--threads", "1",
         "--progress", "false", "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert "training on 160 pairs" in stdout and "validation heldout: accuracy" in stdout
    final = _final(out)
    heldout = final["metrics"]["heldout"]
    assert final["steps"] == 10 and heldout["pairs"] == 40
    assert 0.0 <= heldout["accuracy"] <= 1.0 and heldout["loss"] > 0
    # the saved model scores text with its own (trained, saved) tokenizer
    from rlengine.data import load_tokenizer

    model = RewardModel.load(out / "model")
    tokenizer = load_tokenizer(out / "model")
    ids = tokenizer("\n\nHuman: hi\n\nAssistant: hello", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).values).all()


# ---- MetaRM meta sets and segment scores ----------------------------------------------------

def test_load_samples_reads_unlabeled_responses_and_names_bad_rows(tmp_path):
    path = tmp_path / "meta.jsonl"
    rows = [{"prompt": "p1", "responses": [" a", " b"]},
            {"prompt": "p2", "responses": [" c", " d", " e"], "scores": [1, 2, 3]},
            {"responses": ["\n\nHuman: hi\n\nAssistant: x", "\n\nHuman: hi\n\nAssistant: y"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_samples(path)
    assert [(s.prompt, s.responses) for s in samples] == [
        ("p1", [" a", " b"]), ("p2", [" c", " d", " e"]),
        ("\n\nHuman: hi\n\nAssistant:", [" x", " y"])]
    assert samples[1].extra == {"scores": [1, 2, 3]}
    path.write_text(path.read_text() + json.dumps({"prompt": "p", "responses": [" a"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"meta\.jsonl, line 4: .*1 response\(s\); at least 2"):
        load_samples(path)
    path.write_text(json.dumps({"prompt": "p", "answers": [" a", " b"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"meta\.jsonl, line 1: field 'responses' is missing"):
        load_samples(path)


@pytest.mark.slow
def test_segment_scores_and_metarm_on_the_synthetic_task(tmp_path, capsys):
    """Both read the SFT policy (trained once in the run): as the entropy model that places
    segment boundaries and as the sampler of MetaRM's meta set."""
    out = tmp_path / "sft"
    code, stdout, err = _main(
        ["--synthetic-pairs", "96", "--synthetic-eval-pairs", "64", "--steps", "4",
         "--batch-size", "16", "--log-every", "1", "--score-mode", "segment",
         "--metarm-eta", "0.05", "--meta-set", "synthetic", "--meta-prompts", "8",
         "--meta-k", "3", "--metarm-batch", "4", "--threads", "1", "--progress", "false",
         "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert "meta set: 8 prompts x 3 samples of the SFT policy" in stdout
    records = [r for r in read_metrics(out) if "train/loss" in r]
    assert len(records) == 4
    assert all(isinstance(r["train/metarm_objective"], float) for r in records)
    clean = _final(out)["metrics"]["clean"]
    assert clean["pairs"] == 64 and 0.0 <= clean["accuracy"] <= 1.0


@pytest.mark.slow
def test_data_files_with_an_entropy_model_folder_and_a_meta_set_file(tmp_path, capsys):
    """Real-data usage on files: pairs, a causal LM saved with save_pretrained (the entropy
    model, and here also the backbone, with its tokenizer), and a meta set of unlabeled
    samples."""
    task = SyntheticTask(0)
    # the task has some empty responses (a policy may stop at once); these files are kept to
    # non-empty ones
    pairs = tmp_path / "pairs.jsonl"
    kept = [p for p in task.preference_pairs(80, seed=3) if p.chosen.strip() and p.rejected.strip()]
    pairs.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen,
                                         "rejected": p.rejected}) + "\n" for p in kept[:64]))
    meta = tmp_path / "meta.jsonl"
    ranked = [e for e in task.ranked_examples(12, k=3, seed=4)
              if all(r.strip() for r in e.responses)][:6]
    meta.write_text("".join(json.dumps({"prompt": e.prompt, "responses": e.responses}) + "\n"
                            for e in ranked))
    policy = tmp_path / "policy"
    task.make_policy(0).save_pretrained(policy)
    task.tokenizer.save_pretrained(policy)
    out = tmp_path / "run"
    code, stdout, err = _main(
        ["--train", str(pairs), "--eval-fraction", "0.25", "--model", str(policy),
         "--score-mode", "segment", "--entropy-model", str(policy), "--metarm-eta", "0.05",
         "--meta-set", str(meta), "--metarm-batch", "3", "--steps", "3", "--batch-size", "16",
         "--log-every", "1", "--lr", "1e-3", "--threads", "1", "--progress", "false",
         "--output-dir", str(out)], capsys)
    assert code == 0, err
    assert f"meta set: 6 prompts from {meta}" in stdout
    assert isinstance(read_metrics(out)[0]["train/metarm_objective"], float)
    assert _final(out)["metrics"]["heldout"]["pairs"] == 16

    # a malformed meta set row is an error naming the file and line, with exit code 2
    meta.write_text(meta.read_text() + json.dumps({"prompt": "p", "responses": [" one"]}) + "\n")
    code, _, err = _main(["--train", str(pairs), "--model", str(policy), "--metarm-eta", "0.05",
                          "--meta-set", str(meta), "--steps", "1", "--threads", "1",
                          "--progress", "false"], capsys)
    assert code == 2 and f"{meta}, line 7" in err and "at least 2" in err, err
    # segment scores on a file need the entropy model named
    code, _, err = _main(["--train", str(pairs), "--model", str(policy), "--score-mode",
                          "segment", "--steps", "1", "--threads", "1", "--progress", "false"],
                         capsys)
    assert code == 2 and "entropy_model" in err, err


def test_defaults_that_need_the_synthetic_model_are_refused_for_other_models(tmp_path, capsys):
    """The SFT policy is the default entropy model and meta-set sampler only where its tokens
    are the reward model's (model synthetic) or its task is the data's (train synthetic)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": " yes", "rejected": " no"})
                             + "\n" for i in range(8)))
    code, _, err = _main(["--train", str(pairs), "--model", "tiny-llama", "--tokenizer", "train",
                          "--metarm-eta", "0.05", "--meta-set", "synthetic", "--threads", "1"],
                         capsys)
    assert code == 2 and "meta_set 'synthetic'" in err and "train or model 'synthetic'" in err, err
    code, _, err = _main(["--synthetic-pairs", "40", "--synthetic-eval-pairs", "10", "--model",
                          "tiny-llama", "--tokenizer", "train", "--score-mode", "segment",
                          "--threads", "1"], capsys)
    assert code == 2 and "needs entropy_model" in err and "reward model's tokenizer" in err, err
