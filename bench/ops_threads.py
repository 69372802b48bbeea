"""Every CPU op on 1 and 2 threads, on a quiet machine and beside a competing process.

    python bench/ops_threads.py sweep              # 2 threads vs 1 by size: where threads pay
    python bench/ops_threads.py contention [--old PYTHON:PATH]

`sweep` times each op at sizes from 2^12 to 2^24 elements on 1 and 2 threads (OpenMP waiting
passively, as the `rlengine` command sets it), quiet: the speedup of 2 threads by size shows
the work below which a parallel region costs more than it saves (the grain sizes in
csrc/cpu/common.h come from it). `contention` times each op at a small and a large size, on 1
and 2 threads, quiet and while another process spins on one CPU, with this checkout's build
and (``--old``) an earlier build run by another Python with the earlier checkout on its path,
both with OpenMP's default spin-then-sleep waiting and with passive waiting. Every
configuration runs in its own process (the OpenMP settings are read when torch loads), all in
one run, one after another. Results: bench/results/ops-threads-<what>-<date>.{json,md}.
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

from load import busy_cpu

RESULTS = Path(__file__).resolve().parent / "results"
REPEATS = 30


# ---- the worker: one configuration, in its own process ----------------------------------------

def _cases(size: int):
    """(op, elements, callable) for every op at about `size` elements of its work unit."""
    import torch

    from rlengine import ops

    g = torch.Generator().manual_seed(0)
    out = []
    vocab = 4096 if size >= 4096 * 4 else 256
    rows = max(1, size // vocab)
    logits = torch.randn(rows, vocab, generator=g)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    out.append(("token_logprobs+entropy", rows * vocab,
                lambda: ops.token_logprobs(logits, labels, with_entropy=True)))
    grad_logits = logits.clone().requires_grad_()

    def logprobs_backward():
        lp, ent = ops.token_logprobs(grad_logits, labels, with_entropy=True)
        (lp.sum() + ent.sum()).backward()
        grad_logits.grad = None
    out.append(("token_logprobs fwd+bwd", rows * vocab, logprobs_backward))

    steps = 256 if size >= 256 * 16 else 64
    batch = max(1, size // steps)
    x = torch.randn(batch, steps, generator=g)
    mask = torch.rand(batch, steps, generator=g) < 0.9
    values = torch.randn(batch, steps, generator=g)
    out.append(("sequence_scores", batch * steps, lambda: ops.sequence_scores(x, mask)))
    out.append(("gae", batch * steps,
                lambda: ops.gae(x, values, mask, gamma=0.99, lam=0.95)))
    xg, vg = x.clone().requires_grad_(), values.clone().requires_grad_()

    def gae_backward():
        adv, ret = ops.gae(xg, vg, mask, gamma=0.99, lam=0.95)
        (adv.sum() + ret.sum()).backward()
        xg.grad = vg.grad = None
    out.append(("gae fwd+bwd", batch * steps, gae_backward))
    entropy = torch.rand(batch, steps, generator=g) * 3
    ids, counts = ops.entropy_segments(entropy, mask, threshold=2.0)
    out.append(("entropy_segments", batch * steps,
                lambda: ops.entropy_segments(entropy, mask, threshold=2.0)))
    out.append(("segment_reduce", batch * steps,
                lambda: ops.segment_reduce(values, ids, counts)))
    seg = torch.randn(batch, int(counts.max()) if counts.numel() else 1, generator=g)
    out.append(("segment_rewards_to_dense", batch * steps,
                lambda: ops.segment_rewards_to_dense(seg, ids, counts, mask)))
    out.append(("masked_whiten", batch * steps, lambda: ops.masked_whiten(x, mask)))
    out.append(("masked_mean (rows)", batch * steps, lambda: ops.masked_mean(x, mask, dim=1)))
    k = 8
    groups = max(1, size // (k * k))
    scores = torch.randn(groups, k, generator=g, requires_grad=True)
    rewards = torch.randn(groups, k, generator=g)

    def rank_loss():
        ops.rrhf_rank_loss(scores, rewards).sum().backward()
        scores.grad = None
    out.append(("rrhf_rank_loss fwd+bwd", groups * k * k, rank_loss))
    chosen = torch.randn(size, generator=g, requires_grad=True)
    rejected = torch.randn(size, generator=g)

    def bt():
        ops.bt_loss(chosen, rejected, margin=0.5, label_smoothing=0.1).sum().backward()
        chosen.grad = None
    out.append(("bt_loss fwd+bwd", size, bt))
    return out


def _time(fn) -> tuple[float, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        fn()
        times.append((time.perf_counter() - began) * 1e3)
    return min(times), statistics.median(times)


def worker(threads: int, sizes: list[int]) -> None:
    import torch

    torch.set_num_threads(threads)
    for size in sizes:
        for op, elements, fn in _cases(size):
            low, median = _time(fn)
            print(json.dumps({"op": op, "size": size, "elements": elements, "threads": threads,
                              "min_ms": low, "median_ms": median}), flush=True)


# ---- the parent: configurations one after another ---------------------------------------------

# How idle OpenMP threads wait: the environment each policy sets (none: libgomp's default,
# spin about 300,000 times, then sleep).
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "spin10000": {"GOMP_SPINCOUNT": "10000"}, "spin30000": {"GOMP_SPINCOUNT": "30000"}}


def run_worker(python: str, path: str | None, threads: int, sizes: list[int],
               policy: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    if path:
        env["PYTHONPATH"] = path
    command = [python, str(Path(__file__).resolve()), "worker", "--threads", str(threads),
               "--sizes", ",".join(map(str, sizes))]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True,
                            cwd="/")
    return [dict(json.loads(line), policy=policy) for line in result.stdout.splitlines()
            if line.startswith("{")]


def machine() -> dict:
    import torch
    import transformers  # noqa: F401

    from rlengine.machine import describe_cpu

    return {"date": datetime.date.today().isoformat(), "cpu": describe_cpu(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_before": os.getloadavg()}


def sweep(args) -> None:
    low, high = (int(x) for x in args.powers.split(","))
    sizes = [2 ** p for p in range(low, high + 1)]
    policies = args.policies.split(",")
    rows = []
    for policy in policies:
        for threads in (1, 2):
            rows += run_worker(sys.executable, None, threads, sizes, policy)
    result = {"machine": machine(), "rows": rows}
    stem = RESULTS / f"ops-threads-sweep-{result['machine']['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Each op on 2 threads against 1, by size (quiet machine)", "",
             f"{result['machine']['date']}; {result['machine']['cpu']}; ATen "
             f"{result['machine']['cpu_capability']}; torch {result['machine']['torch']}. "
             f"Median of {REPEATS} calls; speedup = 1-thread median / 2-thread median (the "
             f"1-thread median in brackets). How idle OpenMP threads wait: 'default' libgomp's "
             f"own (spin about 300,000 times, then sleep), 'passive' OMP_WAIT_POLICY=PASSIVE, "
             f"'spinN' GOMP_SPINCOUNT=N. Sizes in the op's unit of work (logits, positions, "
             f"candidate pairs, elements). `python bench/ops_threads.py sweep --powers "
             f"{args.powers} --policies {args.policies}`.", ""]
    lines += ["| op | " + " | ".join(f"2^{s.bit_length() - 1}" for s in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    for op in dict.fromkeys(r["op"] for r in rows):
        for policy in policies:
            cells = []
            for size in sizes:
                one, two = ([r for r in rows if (r["op"], r["size"], r["threads"], r["policy"])
                             == (op, size, t, policy)][0] for t in (1, 2))
                cells.append(f"{one['median_ms'] / two['median_ms']:.2f}x "
                             f"({one['median_ms']:.3f})")
            lines.append(f"| {op} ({policy}) | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def contention(args) -> None:
    sizes = [2 ** 16, 2 ** 17, 2 ** 22]
    runs = (("default", 1), ("default", 2), ("passive", 2), ("spin10000", 2))
    builds = [("new", sys.executable, None)]
    if args.old:
        python, path = args.old.split(":", 1)
        builds.append(("old", python, path))
    rows = []
    for busy in (False, True):
        with busy_cpu(busy):
            for build, python, path in builds:
                for policy, threads in runs:  # one thread never waits at a barrier
                    for r in run_worker(python, path, threads, sizes, policy):
                        rows.append(dict(r, build=build, contended=busy))
                    print(f"done: busy={busy} build={build} policy={policy} "
                          f"threads={threads}", flush=True)
    result = {"machine": machine(), "rows": rows,
              "old": args.old, "repeats": REPEATS}
    stem = RESULTS / f"ops-threads-contention-{result['machine']['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    configs = [(b, p, t) for b, _, _ in builds for p, t in runs]
    lines = ["# Every op on 1 and 2 threads, quiet and beside a busy process", "",
             f"{result['machine']['date']}; {result['machine']['cpu']}; ATen "
             f"{result['machine']['cpu_capability']}; torch {result['machine']['torch']}. "
             f"Median (min) of {REPEATS} calls in ms. 'busy': another process spins on one "
             f"of the CPUs. 'new': this checkout's kernels (grain sizes by measured cost); "
             f"'old': {args.old or 'not run'}. How idle threads wait: 'default' libgomp's own "
             f"(spin about 300,000 times, then sleep), 'passive' OMP_WAIT_POLICY=PASSIVE, "
             f"'spin10000' GOMP_SPINCOUNT=10000 (the `rlengine` command's). "
             f"`python bench/ops_threads.py contention`.", ""]
    header = [f"{b} {t}t {p}" for b, p, t in configs]
    lines += ["| op | elements | load | " + " | ".join(header) + " |",
              "|---|---|---|" + "---|" * len(header)]
    for op in dict.fromkeys(r["op"] for r in rows):
        for size in sizes:
            for busy in (False, True):
                cells, elements = [], ""
                for build, policy, threads in configs:
                    match = [r for r in rows if r["op"] == op and r["size"] == size
                             and r["contended"] == busy and r["build"] == build
                             and r["policy"] == policy and r["threads"] == threads]
                    if match:
                        elements = match[0]["elements"]
                        cells.append(f"{match[0]['median_ms']:.3f} ({match[0]['min_ms']:.3f})")
                    else:
                        cells.append("")
                lines.append(f"| {op} | {elements} | {'busy' if busy else 'quiet'} | "
                             + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--threads", type=int, required=True)
    w.add_argument("--sizes", required=True)
    sw = sub.add_parser("sweep")
    sw.add_argument("--powers", default="12,24", help="sizes 2^low..2^high (default 12,24)")
    sw.add_argument("--policies", default="default,passive,spin10000",
                    help=f"comma-separated, of {', '.join(POLICIES)}")
    c = sub.add_parser("contention")
    c.add_argument("--old", default=None, metavar="PYTHON:PATH",
                   help="an earlier build: its Python and the checkout to put on its path")
    args = parser.parse_args()
    if args.mode == "worker":
        worker(args.threads, [int(s) for s in args.sizes.split(",")])
    elif args.mode == "sweep":
        sweep(args)
    else:
        contention(args)


if __name__ == "__main__":
    main()
