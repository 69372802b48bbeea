"""rlengine.integrations.verl against veRL's own functions, in one process, at the trainers'
shapes. Run it with the python of an environment that has veRL (tests/trainer_envs.py makes
build/trainer-venvs/verl):

    build/trainer-venvs/verl/bin/python bench/integrations_verl.py

Medians of interleaved rounds; results: bench/results/integrations-verl-<date>.{json,md}.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _gae_inputs(rows: int, steps: int, kind: str):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(rows, steps, generator=generator)
    values = torch.randn(rows, steps, generator=generator)
    lengths = torch.randint(steps // 4, steps + 1, (rows,), generator=generator)
    mask = (torch.arange(steps) < lengths[:, None]).long()
    if kind == "multi-turn":  # a masked tool output in the middle of every response
        mask[:, steps // 3: steps // 2] = 0
    return rewards, values, mask


def _time(fn, rounds: int) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1e3


def main() -> None:
    import verl.trainer.ppo.core_algos as core_algos
    import verl.utils.torch_functional as verl_F

    from rlengine.integrations import verl as rlengine_verl

    originals = {"gae": core_algos.compute_gae_advantage_return,
                 "whiten": verl_F.masked_whiten, "mean": verl_F.masked_mean,
                 "var": verl_F.masked_var}
    patch = rlengine_verl.apply()
    patched = {"gae": core_algos.compute_gae_advantage_return,
               "whiten": verl_F.masked_whiten, "mean": verl_F.masked_mean,
               "var": verl_F.masked_var}
    rows_out = []

    def compare(name: str, shape: str, call, rounds: int) -> None:
        theirs = _time(lambda: call(originals), rounds)
        ours = _time(lambda: call(patched), rounds)
        rows_out.append({"function": name, "shape": shape, "verl_ms": theirs,
                         "rlengine_ms": ours, "speedup": theirs / ours})
        print(json.dumps(rows_out[-1]), flush=True)

    for rows, steps in ((64, 1024), (64, 2048), (512, 1024), (64, 8192), (512, 8192)):
        for kind in ("right-padded", "multi-turn"):
            rewards, values, mask = _gae_inputs(rows, steps, kind)
            rounds = 3 if rows * steps >= 512 * 8192 else 7
            compare("compute_gae_advantage_return", f"B={rows}, T={steps}, {kind}",
                    lambda f: f["gae"](rewards, values, mask, 1.0, 0.95), rounds)
    for rows, steps in ((64, 2048), (512, 2048), (512, 8192)):
        x = torch.randn(rows, steps)
        mask = (torch.rand(rows, steps) < 0.8).long()
        shape = f"[{rows}, {steps}], int mask"
        compare("masked_whiten", shape, lambda f: f["whiten"](x, mask), 15)
        compare("masked_mean", shape, lambda f: f["mean"](x, mask), 15)
        compare("masked_var", shape, lambda f: f["var"](x, mask), 15)
    assert patch.calls()["original"] == 0, patch.calls()
    patch.revert()

    from rlengine.machine import describe_cpu

    meta = {"date": datetime.date.today().isoformat(), "cpu": describe_cpu(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "verl": importlib.metadata.version("verl"), "python": platform.python_version()}
    stem = RESULTS / f"integrations-verl-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": meta, "rows": rows_out},
                                                    indent=1) + "\n")
    lines = ["# rlengine.integrations.verl against veRL's own functions", "",
             f"{meta['date']}; {meta['cpu']}; {meta['threads']} threads; torch {meta['torch']}, "
             f"veRL {meta['verl']}, Python {meta['python']}. Medians (ms) of interleaved calls "
             f"in one process; fp32. `build/trainer-venvs/verl/bin/python "
             f"bench/integrations_verl.py`.", "",
             "| function | shape | veRL ms | rlengine ms | speedup |", "|---|---|---|---|---|"]
    for row in rows_out:
        lines.append(f"| {row['function']} | {row['shape']} | {row['verl_ms']:.3f} | "
                     f"{row['rlengine_ms']:.3f} | {row['speedup']:.1f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
