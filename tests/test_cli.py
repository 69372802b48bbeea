"""The `rlengine` command: the live kernel demo (`rlengine kernels`, also the quickstart's first
stage) runs every fused op on a real (tiny, random) transformers model and reports results that
agree with the eager equivalents."""

import subprocess
import sys

from rlengine import cli, kernel_demo

OPS = ("token_logprobs + entropy", "token_logprobs forward+backward",
       "sequence_scores + rrhf_rank_loss", "bt_loss", "gae", "entropy_segments",
       "segment_reduce", "segment_rewards_to_dense", "masked_whiten")


def test_kernel_demo_checks_every_op_against_eager():
    rows = kernel_demo.run(batch=4, seq_len=24, vocab_size=101, repeats=1)
    names = [r.op for r in rows]
    for op in OPS:
        assert any(name.startswith(op) for name in names), f"{op} missing from {names}"
    for row in rows:
        assert row.rlengine_ms > 0 and row.eager_ms > 0
        assert row.max_abs_diff < 1e-4, f"{row.op} differs from eager by {row.max_abs_diff}"


def test_kernels_command_prints_the_table(capsys):
    assert cli.main(["kernels", "--batch", "4", "--seq-len", "16", "--vocab", "64",
                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "token_logprobs + entropy" in out and "masked_whiten" in out


def test_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "rlengine.cli", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "quickstart" in result.stdout and "kernels" in result.stdout


def test_bad_option_values_are_named():
    for argv, message in ((["--batch", "0"], "--batch: must be >= 1, got 0"),
                          (["--seq-len", "2"], "--seq-len: must be >= 3, got 2"),
                          (["--vocab", "many"], "--vocab: expected an integer, got 'many'")):
        result = subprocess.run([sys.executable, "-m", "rlengine.cli", "kernels", *argv],
                                capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr
