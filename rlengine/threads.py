"""How many CPU threads torch, and rlengine's kernels (which share torch's OpenMP pool), use.

One rule for every command, in this order:
1. ``--threads N`` (the ``threads`` option of every command): N.
2. ``OMP_NUM_THREADS`` in the environment: torch has already read it; it is kept.
3. The ``rlengine`` command's default: the CPUs this process may run on that no other work is
   using now. On a quiet machine that is all of them; when other processes keep some of them
   busy, fewer, because every parallel region ends at a barrier that waits for its slowest
   thread, and a thread that shares its core with another process runs only part of the time
   (measured on 2 cores with one of them busy: ``rlengine quickstart --fast`` and the ops ran
   several times slower on 2 threads than on 1: bench/results/quickstart-threads-*.md and
   ops-threads-contention-*.md).
4. A library caller (no ``rlengine`` command): torch's own setting, untouched.

The command also shortens how long an idle OpenMP thread spins before it sleeps
(``GOMP_SPINCOUNT=10000``, about 0.1 ms, against libgomp's default of 300,000, unless the
environment sets a spin count or a wait policy): a spinning thread holds a core that another
thread, of this region or of another process, may be waiting for. Not sleeping at once
(``OMP_WAIT_POLICY=PASSIVE``), because waking a sleeping thread costs tens to hundreds of
microseconds, which made a 2-thread region slower than one thread below about a million
elements of work (bench/results/ops-threads-sweep-2026-12-07.md). It must be set before torch
is imported, which is why ``prepare_process`` is the first thing ``rlengine.cli`` runs.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

THREADS_HELP = ("CPU threads (0: automatic: the CPUs that other work leaves free, or "
                "OMP_NUM_THREADS where set)")

_automatic = False  # set by prepare_process: this process is the `rlengine` command

# libgomp's spin count before an idle thread sleeps, for the command (see the module docstring).
SPIN_COUNT = "10000"

# Runnable-task samples to average (the instantaneous count is noisy) and the time between them.
_LOAD_SAMPLES = 5
_LOAD_INTERVAL_S = 0.004


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def __str__(self) -> str:
        return f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} ({self.reason})"


def prepare_process() -> None:
    """For the ``rlengine`` command, before torch is imported: a short OpenMP spin (unless the
    environment chose a wait policy or spin count) and the load-aware default thread count for
    `configure`."""
    global _automatic
    _automatic = True
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-CPU host sees 64 in its mask)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        limit = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if limit <= 0 else limit / period
    except (OSError, ValueError):
        return None


def busy_cpus() -> float | None:
    """How many CPUs other work keeps busy now: the kernel's count of runnable tasks (the 4th
    field of /proc/loadavg, which counts this process too), averaged over a few samples. None
    where the system does not say."""
    counts = []
    for i in range(_LOAD_SAMPLES):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            counts.append(int(running) - 1)
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < _LOAD_SAMPLES:
            time.sleep(_LOAD_INTERVAL_S)
    return max(0.0, sum(counts) / len(counts))


@functools.cache
def automatic_threads() -> ThreadChoice:
    """The command's default: the usable CPUs that other work leaves free, at least one.
    Chosen once per process, so that every stage of a command runs with the same count."""
    usable = usable_cpus()
    busy = busy_cpus()
    if busy is None:
        return ThreadChoice(usable, f"{usable} usable CPUs")
    # runnable tasks are counted over the whole machine; the free CPUs are those of the
    # machine that nothing runs on, of which this process may use at most `usable`
    free = (os.cpu_count() or usable) - busy
    threads = max(1, min(usable, int(free + 0.5)))
    load = "none busy" if busy < 0.5 else f"{busy:.1f} busy with other work"
    return ThreadChoice(threads, f"{usable} usable CPUs, {load}")


def choose(requested: int = 0) -> ThreadChoice:
    """The thread count by the rule above, without applying it."""
    import torch

    if requested < 0:
        from rlengine.configs import ConfigError

        raise ConfigError(f"threads must be >= 0 (0: automatic), got {requested}")
    if requested:
        return ThreadChoice(requested, "--threads")
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return ThreadChoice(torch.get_num_threads(), "OMP_NUM_THREADS")
    if _automatic:
        return automatic_threads()
    return ThreadChoice(torch.get_num_threads(), "torch's setting")


def configure(requested: int = 0, *, log=None) -> ThreadChoice:
    """Choose (see `choose`), apply to torch, and say it through ``log`` if given."""
    import torch

    choice = choose(requested)
    if torch.get_num_threads() != choice.threads:
        torch.set_num_threads(choice.threads)
    if log is not None:
        log(f"using {choice}")
    return choice
