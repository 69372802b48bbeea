"""Selecting comparisons from a large pool: time and peak memory of every strategy of
rlengine.reward.active.select on n candidates with D features (the acceptance case: n = 100k,
D = 512), against a direct D-opt that inverts M and forms z M^-1 z with einsum (what a first
implementation writes; same O(nD) memory, more float work and less accuracy).

    python bench/bench_active_select.py [--n 100000] [--d 512] [--json out.json]

Each case runs in a fresh process so that its resident-memory high-water mark is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch

CASE = """
import json, resource, sys, time, torch
from rlengine.reward.active.selection import select, fisher_weights
torch.set_num_threads({threads})
n, d, strategy = {n}, {d}, {strategy!r}
g = torch.Generator().manual_seed(0)
z, gap = torch.randn(n, d, generator=g), torch.randn(n, generator=g)
past = (z[:n // 20].clone(), gap[:n // 20].clone())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
if strategy == "direct_dopt":
    w = fisher_weights(gap.double())
    zd = z.double()
    m = (zd * w[:, None]).T @ zd + 1e-6 * torch.eye(d, dtype=torch.float64)
    scores = w * torch.einsum("nd,de,ne->n", zd, torch.linalg.inv(m), zd)
    picked = scores.topk(500).indices
else:
    picked, scores = select(strategy, 500, z=z, gap=gap, past_z=past[0], past_gap=past[1])
seconds = time.perf_counter() - start
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
json.dump({{"seconds": seconds, "peak_extra_mb": grown / 2**20}}, sys.stdout)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", default="random,entropy,max_difference,coreset,dopt,"
                                                "past_dopt,direct_dopt")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for strategy in args.strategies.split(","):
        code = CASE.format(threads=args.threads, n=args.n, d=args.d, strategy=strategy)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        row = {"strategy": strategy, **json.loads(out.stdout)}
        rows.append(row)
        print(f"{strategy:15s} {row['seconds']:7.2f} s   peak +{row['peak_extra_mb']:7.0f} MB",
              flush=True)
    meta = {"n": args.n, "d": args.d, "threads": args.threads, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
