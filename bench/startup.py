"""How long the `rlengine` command takes to answer, and `import rlengine.ops` to load, with this
checkout and (``--old PYTHON:PATH``) an earlier one run by another Python with that checkout on
its path. Each is a fresh process; min and median of --runs, one build after the other in each
round. Results: bench/results/startup-<date>.{json,md}.

    python bench/startup.py --old /path/to/old-venv/bin/python:/path/to/old-checkout
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

COMMANDS = {
    "rlengine --help": ["-m", "rlengine.cli", "--help"],
    "rlengine train-rm --help": ["-m", "rlengine.cli", "train-rm", "--help"],
    "import rlengine.ops": ["-c", "import rlengine.ops"],
}


def _time(python: str, path: str | None, args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path:
        env["PYTHONPATH"] = path
    began = time.perf_counter()
    subprocess.run([python, *args], env=env, cwd="/", check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", default=None, metavar="PYTHON:PATH")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    builds = {"new": (sys.executable, None)}
    if args.old:
        python, path = args.old.split(":", 1)
        builds["old"] = (python, path)
    times: dict[str, dict[str, list[float]]] = {b: {c: [] for c in COMMANDS} for b in builds}
    for name, (python, path) in builds.items():  # warm the file cache
        for command in COMMANDS.values():
            _time(python, path, command)
    for _ in range(args.runs):
        for command, argv in COMMANDS.items():
            for name, (python, path) in builds.items():
                times[name][command].append(_time(python, path, argv))
    import torch

    from rlengine.machine import describe_cpu

    meta = {"date": datetime.date.today().isoformat(), "cpu": describe_cpu(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_before": os.getloadavg(), "old": args.old, "runs": args.runs}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"startup-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": meta, "seconds": times},
                                                    indent=1) + "\n")
    lines = ["# Start-up: the command's help and the ops' import", "",
             f"{meta['date']}; {meta['cpu']}; torch {meta['torch']}, Python {meta['python']}; "
             f"quiet machine (1-minute load average {meta['load_before'][0]:.2f} before the "
             f"run). Wall time of a fresh process, seconds: median (min) of {args.runs}. "
             f"'old': {args.old or 'not run'}. `python bench/startup.py`.", "",
             "| | " + " | ".join(builds) + " |", "|---|" + "---|" * len(builds)]
    for command in COMMANDS:
        cells = [f"{statistics.median(times[b][command]):.3f} ({min(times[b][command]):.3f})"
                 for b in builds]
        lines.append(f"| `{command}` | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
