"""active-sim's outputs: results.json (every curve), curves.md (mean +- std tables and the label
ratio against random) and one PNG per metric (labels used on x, one line per strategy with a
band of one std, one panel per pool)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlengine.files import atomic_write

METRICS = {"accuracy": "held-out pair accuracy", "spearman": "within-prompt Spearman",
           "best_of_n": "best-of-N gold reward"}


def write(result: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    atomic_write(out / "results.json",
                 lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    atomic_write(out / "curves.md", lambda tmp: tmp.write_text(markdown(result)))
    plot(result, out / "plots")


def markdown(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [f"# Active reward modeling: {config['seeds']} seeds, mean +- std", ""]
    for pool, by in result["summary"].items():
        for metric, title in METRICS.items():
            if not any(metric in p for curve in by.values() for p in curve):
                continue
            labels = [int(p["labels"]) for p in next(iter(by.values()))]
            lines += [f"## {pool}: {title}", "",
                      "| strategy | " + " | ".join(map(str, labels)) + " |",
                      "|---|" + "---|" * len(labels)]
            for strategy, curve in by.items():
                cells = [f"{p[metric]:.3f} +- {p[metric + '_std']:.3f}" for p in curve]
                lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
            lines.append("")
        ratio = result["label_ratio"].get(pool, {})
        if ratio:
            lines += [f"Labels needed to reach random's accuracy at the full budget "
                      f"({ratio['target_accuracy']:.3f} with {int(ratio['budget'])} labels), as a "
                      f"share of that budget (none: not reached):", ""]
            lines += [f"- {s}: {'none' if v is None else f'{v:.2f}'}"
                      for s, v in ratio.items() if s not in ("target_accuracy", "budget")]
            lines.append("")
    reference = result.get("reference", {})
    if reference:
        lines += [f"Best-of-N references: oracle {reference['best_of_n_oracle']:.3f}, random "
                  f"pick {reference['best_of_n_random']:.3f}.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    folder.mkdir(parents=True, exist_ok=True)
    pools = list(result["summary"])
    for metric, title in METRICS.items():
        if not any(metric in p for by in result["summary"].values() for c in by.values()
                   for p in c):
            continue
        figure, axes = plt.subplots(1, len(pools), figsize=(6 * len(pools), 4.2), squeeze=False,
                                    sharey=True)
        for axis, pool in zip(axes[0], pools):
            for strategy, curve in result["summary"][pool].items():
                x = [p["labels"] for p in curve]
                y = [p[metric] for p in curve]
                s = [p[metric + "_std"] for p in curve]
                style = "-" if "dopt" in strategy else "--"
                line, = axis.plot(x, y, style, marker="o", markersize=3, label=strategy)
                axis.fill_between(x, [a - b for a, b in zip(y, s)],
                                  [a + b for a, b in zip(y, s)], alpha=0.12,
                                  color=line.get_color())
            reference = result.get("reference", {})
            if metric == "best_of_n" and reference:
                axis.axhline(reference["best_of_n_oracle"], color="gray", lw=0.8, ls=":",
                             label="oracle")
            axis.set_title(f"{pool.replace('_', '-')} pool")
            axis.set_xlabel("labels used")
            axis.grid(alpha=0.3)
        axes[0][0].set_ylabel(title)
        handles, _ = axes[0][-1].get_legend_handles_labels()
        band = Patch(color="gray", alpha=0.25,
                     label=f"shaded: mean +- std over {result['config']['seeds']} seeds")
        axes[0][-1].legend(handles=handles + [band], fontsize=8)
        figure.suptitle(f"{title} ({result['config']['seeds']} seeds, mean +- std)")
        figure.tight_layout()
        figure.savefig(folder / f"{metric}.png", dpi=110)
        plt.close(figure)
