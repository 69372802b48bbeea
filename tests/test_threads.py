"""rlengine.threads: the one rule for how many CPU threads a command uses (--threads, then
OMP_NUM_THREADS, then the CPUs that other work leaves free), what the command prints, and the
process settings the `rlengine` command makes before torch loads. How the default behaves on
a busy machine is measured by bench/quickstart_threads.py and bench/ops_threads.py, not
asserted here."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO

from rlengine import threads
from rlengine.configs import ConfigError


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_requested_threads_win(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    choice = threads.configure(2)
    assert (choice.threads, choice.reason) == (2, "--threads")
    assert torch.get_num_threads() == 2
    assert str(choice) == "2 CPU threads (--threads)"


def test_omp_num_threads_is_kept(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    choice = threads.configure(0)
    assert str(choice) == "1 CPU thread (OMP_NUM_THREADS)" and torch.get_num_threads() == 1


def test_a_library_caller_keeps_torch_s_setting(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_automatic", False)
    torch.set_num_threads(1)
    assert str(threads.configure(0)) == "1 CPU thread (torch's setting)"


def test_negative_threads_are_a_config_error():
    with pytest.raises(ConfigError, match=r"threads must be >= 0 \(0: automatic\), got -3"):
        threads.choose(-3)


def test_usable_cpus_are_the_affinity_mask_capped_by_a_cgroup_quota(monkeypatch):
    mask = len(os.sched_getaffinity(0))
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: None)
    assert threads.usable_cpus() == mask
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: 0.5)  # half a CPU: still one
    assert threads.usable_cpus() == 1
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: mask + 4.0)
    assert threads.usable_cpus() == mask


def _spinner() -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # running, not starting
    return process


def test_a_busy_cpu_is_seen_and_left_free():
    """A process that spins on one CPU counts as one busy CPU (at least: other work may run
    too), and the automatic choice leaves that CPU to it."""
    spinner = _spinner()
    try:
        busy = threads.busy_cpus()
        threads.automatic_threads.cache_clear()
        choice = threads.automatic_threads()
    finally:
        spinner.kill()
        spinner.wait()
        threads.automatic_threads.cache_clear()
    assert busy is not None and busy >= 1.0
    usable = threads.usable_cpus()
    assert 1 <= choice.threads <= max(1, usable - 1)
    if choice.threads < usable:
        assert "busy with other work" in choice.reason


def test_the_command_sets_a_short_spin_before_torch_loads():
    """`python -m rlengine.cli` (the console script runs the same entry point): OpenMP's spin
    count must be in the environment before libgomp loads with torch; a wait policy or spin
    count the environment sets is kept."""
    code = ("import os, sys\n"
            "from rlengine import cli\n"
            "sys.argv = ['rlengine', 'kernels', '--help']\n"
            "try:\n    cli.entry_point()\n"
            "except SystemExit:\n    pass\n"
            "print('WAIT', os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'),"
            " os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, env=env, check=True).stdout
    assert "WAIT None 10000 1" in out
    for given, expected in (({"OMP_WAIT_POLICY": "PASSIVE"}, "WAIT PASSIVE None 1"),
                            ({"GOMP_SPINCOUNT": "0"}, "WAIT None 0 1")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=REPO, env={**env, **given}, check=True).stdout
        assert expected in out, out


def test_the_command_prints_its_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-m", "rlengine.cli", "kernels", "--batch", "2",
                             "--seq-len", "8", "--vocab", "32", "--repeats", "1"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("rlengine kernels on ") and "usable CPU" in first, first
