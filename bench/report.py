"""Turn a pytest-benchmark JSON file into the markdown report of bench/results/.

    python bench/report.py bench/results/<run>.json > bench/results/<run>.md

For every case (pytest-benchmark group) it lists each implementation's median time and peak
memory and rlengine's speedup over it, then checks the targets below: each is a ratio of two
medians (or peak memories) measured in the same run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    what: str
    group: str                # the case, or a prefix of it
    numerator: str            # implementation whose median is divided ...
    denominator: str          # ... by this one's
    at_least: float | None = None
    at_most: float | None = None
    denominator_group: str | None = None  # compare across two cases (e.g. with / without entropy)
    field: str = "median"     # or "peak_mb"
    scale_by_info: str | None = None       # divide the ratio by this extra_info field instead


# The CPU acceptance targets of the foundation issue (2 cores).
TARGETS = [
    Target("token_logprobs forward vs eager log_softmax+gather",
           "token_logprobs forward N=4096 V=32000 torch.float32", "eager", "rlengine",
           at_least=2.5),
    Target("token_logprobs forward+backward vs eager",
           "token_logprobs forward+backward N=4096 V=32000", "eager", "rlengine", at_least=3.0),
    Target("token_logprobs forward: extra peak memory / logits size",
           "token_logprobs forward N=4096 V=32000 torch.float32", "rlengine", "rlengine",
           at_most=0.10, field="peak_mb", scale_by_info="logits_mb"),
    Target("token_logprobs: time with entropy / without",
           "token_logprobs+entropy forward N=4096 V=32000", "rlengine", "rlengine", at_most=1.3,
           denominator_group="token_logprobs forward N=4096 V=32000 torch.float32"),
    Target("gae vs Python loop over time (B=64, T=2048)", "gae B=64 T=2048", "python_loop",
           "rlengine", at_least=100.0),
    Target("entropy_segments vs per-row Python", "entropy_segments", "per_row", "rlengine",
           at_least=20.0),
    Target("segment_reduce vs per-row Python", "segment_reduce", "per_row", "rlengine",
           at_least=20.0),
    Target("segment_rewards_to_dense vs per-row Python", "segment_rewards_to_dense", "per_row",
           "rlengine", at_least=20.0),
]


def load(path: str):
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        impl = bench["params"].get("impl", bench["name"])
        groups[bench["group"]][impl] = {
            "median": bench["stats"]["median"],
            "rounds": bench["stats"]["rounds"],
            **bench.get("extra_info", {}),
        }
    return data, groups


def _find(groups, prefix):
    matches = [g for g in groups if g.startswith(prefix)]
    return matches[0] if len(matches) == 1 else None


def target_lines(groups):
    lines = []
    for t in TARGETS:
        groups_found = [_find(groups, t.group)]
        if t.denominator_group:
            groups_found.append(_find(groups, t.denominator_group))
        if any(g is None for g in groups_found):
            continue
        num_case = groups[groups_found[0]]
        den_case = groups[groups_found[-1]]
        if t.numerator not in num_case or t.denominator not in den_case:
            continue
        num = num_case[t.numerator][t.field]
        den = (num_case[t.numerator][t.scale_by_info] if t.scale_by_info
               else den_case[t.denominator][t.field])
        ratio = num / den
        ok = ((t.at_least is None or ratio >= t.at_least)
              and (t.at_most is None or ratio <= t.at_most))
        bound = f">= {t.at_least:g}" if t.at_least is not None else f"<= {t.at_most:g}"
        lines.append(f"| {t.what} | {bound} | {ratio:.3g} | {'met' if ok else 'NOT met'} |")
    return lines


def render(path: str) -> str:
    data, groups = load(path)
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {})
    out = [
        f"# rlengine benchmarks: {data.get('datetime', '')[:10]}",
        "",
        f"- machine: {cpu.get('brand_raw', machine.get('processor', '?'))}, "
        f"{cpu.get('count', '?')} logical CPUs ({machine.get('node', '')})",
        f"- python {machine.get('python_version', '?')}; "
        + ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items()),
        f"- raw results: `{path.split('/')[-1]}` (pytest-benchmark JSON); times are medians",
        "",
    ]
    targets = target_lines(groups)
    if targets:
        out += ["## Targets", "", "| target | bound | measured | |", "|---|---|---|---|",
                *targets, ""]
    out += ["## Cases", "", "| case | implementation | median ms | rlengine speedup | peak MB |",
            "|---|---|---|---|---|"]
    for group in sorted(groups):
        impls = groups[group]
        ours = impls.get("rlengine", {}).get("median")
        for impl in sorted(impls, key=lambda i: (i != "rlengine", i)):
            r = impls[impl]
            speedup = "" if ours is None or impl == "rlengine" else f"{r['median'] / ours:.1f}x"
            peak = f"{r['peak_mb']:.3g}" if "peak_mb" in r else ""
            out.append(f"| {group} | {impl} | {r['median'] * 1e3:.3f} | {speedup} | {peak} |")
    out += throughput_lines(groups)
    return "\n".join(out) + "\n"


def throughput_lines(groups) -> list[str]:
    """Cases that record the tokens they process (``tokens`` in extra_info, e.g. a training
    step's attention-mask tokens): tokens per second from the median, and both peak memories."""
    rows = []
    for group in sorted(groups):
        impls = groups[group]
        ours = impls.get("rlengine", {}).get("median")
        for impl in sorted(impls, key=lambda i: (i != "rlengine", i)):
            r = impls[impl]
            if "tokens" not in r:
                continue
            speedup = "" if ours is None or impl == "rlengine" else f"{r['median'] / ours:.2f}x"
            peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else ""
            rss = f"{r['rss_peak_extra_mb']:.0f}" if "rss_peak_extra_mb" in r else ""
            rows.append(f"| {group} | {impl} | {r['median'] * 1e3:.1f} | {r['tokens']} | "
                        f"{r['tokens'] / r['median']:.0f} | {speedup} | {peak} | {rss} |")
    if not rows:
        return []
    return ["", "## Throughput", "",
            "Tokens are those of the step's attention masks; peak MB is the torch-allocator "
            "peak above the start (bench/harness.py), RSS MB the resident-memory high-water "
            "above the start.", "",
            "| case | implementation | median ms | tokens | tokens/s | rlengine speedup "
            "| peak MB | RSS peak MB |", "|---|---|---|---|---|---|---|---|", *rows]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.stdout.write(render(sys.argv[1]))
