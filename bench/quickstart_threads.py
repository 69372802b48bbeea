"""`rlengine quickstart --fast`, wall time, with the old and the new default thread setting, on a
quiet machine and while another process keeps one CPU busy, all in one run, one after another.

    python bench/quickstart_threads.py --old /path/to/old-venv/bin/python:/path/to/old-checkout

Configurations (each a fresh process writing a fresh report folder):
- old: the earlier checkout (``--old``): torch's default threads (all CPUs), libgomp's default
  waiting (spin about 300,000 times, then sleep);
- new, default: this checkout, no options: the CPUs other work leaves free, a short spin
  (GOMP_SPINCOUNT=10000) before sleeping;
- new, 2 threads with libgomp's default spin (the old setting), passive waiting, the short spin,
  and new, 1 thread: the parts of the new default, each on its own.
Results: bench/results/quickstart-threads-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from load import busy_cpu

RESULTS = Path(__file__).resolve().parent / "results"
SPIN_DEFAULT = "300000"  # libgomp's spin count when OMP_WAIT_POLICY is not set


def run(python: str, path: str | None, extra: list[str], env_extra: dict[str, str],
        out: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "PYTHONPATH")}
    env.update(env_extra)
    if path:
        env["PYTHONPATH"] = path
    command = [python, "-m", "rlengine.cli", "quickstart", "--fast", "--out", str(out),
               "--progress", "false", *extra]
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/")
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    said = re.search(r"rlengine quickstart \(fast\) -> .*?, (.*)", result.stdout)
    return {"seconds": seconds, "threads_line": said.group(1) if said else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=None, metavar="PYTHON:PATH")
    args = parser.parse_args()
    new = (sys.executable, None)
    configs = []
    if args.old:
        python, path = args.old.split(":", 1)
        configs.append(("old (torch's threads, default waiting)", (python, path), [], {}))
    configs += [
        ("new, default", new, [], {}),
        ("new, 2 threads, libgomp's default spin (the old setting)", new, ["--threads", "2"],
         {"GOMP_SPINCOUNT": SPIN_DEFAULT}),
        ("new, 2 threads, passive (OMP_WAIT_POLICY=PASSIVE)", new, ["--threads", "2"],
         {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("new, 2 threads, short spin (the new setting)", new, ["--threads", "2"], {}),
        ("new, 1 thread", new, ["--threads", "1"], {}),
    ]
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="quickstart-threads-"))
    try:
        for busy in (False, True):
            with busy_cpu(busy):
                for name, (python, path), extra, env_extra in configs:
                    out = scratch / f"{len(rows)}"
                    row = {"config": name, "busy": busy,
                           **run(python, path, extra, env_extra, out)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import torch

    from rlengine.machine import describe_cpu

    meta = {"date": datetime.date.today().isoformat(), "cpu": describe_cpu(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(), "old": args.old}
    stem = RESULTS / f"quickstart-threads-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": meta, "rows": rows}, indent=1)
                                         + "\n")
    lines = ["# `rlengine quickstart --fast`: the thread default, quiet and on a busy machine", "",
             f"{meta['date']}; {meta['cpu']}; ATen {meta['cpu_capability']}; torch "
             f"{meta['torch']}, Python {meta['python']}. Wall time of the whole command, one "
             f"run each, one after another; 'busy': another process spins on one of the "
             f"CPUs for the whole run. 'old': {args.old or 'not run'}. "
             f"`python bench/quickstart_threads.py`.", "",
             "| configuration | quiet: seconds | busy: seconds | busy / quiet | threads the "
             "command chose (quiet; busy) |", "|---|---|---|---|---|"]
    for name, *_ in configs:
        quiet = next(r for r in rows if r["config"] == name and not r["busy"])
        busy = next(r for r in rows if r["config"] == name and r["busy"])
        lines.append(f"| {name} | {quiet['seconds']:.1f} | {busy['seconds']:.1f} | "
                     f"{busy['seconds'] / quiet['seconds']:.2f}x | "
                     f"{quiet['threads_line'] or 'not printed'}; "
                     f"{busy['threads_line'] or 'not printed'} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
