"""The quickstart's report: ``metrics.jsonl`` (every stage's metric rows, in stage order),
``report.md`` (tables and findings, every number read from those rows) and PNG plots.

The findings are written from the numbers of this run; each one names what the project's
earlier, larger measurements found (bench/results/ in the repository), so a reader can see
whether this run agrees.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections import defaultdict
from pathlib import Path

import torch

from rlengine.files import atomic_write
from rlengine.machine import describe_cpu
from rlengine.quickstart.pipeline import MetricRow, Run, write_metrics

POLICY_RUNS = {"ppo_gold": "PPO, gold reward", "ppo_bandit": "PPO, bandit reward model",
               "ppo_segment": "PPO, segment-dense reward model",
               "rrhf_denoised_rm": "RRHF, denoised reward model"}
REWARD_NAMES = {"plain": "plain Bradley-Terry",
                "soft_margin": "soft labels (mu < 0) + adaptive margin",
                "denoised": "flip lowest 10% + soft labels + margin",
                "segment": "segment-level scores"}


class Metrics:
    """The metric rows of one run, looked up by (stage, run, metric[, step])."""

    def __init__(self, rows: list[MetricRow]):
        self.rows = rows
        self.values: dict[tuple, float] = {}
        self.curves: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
        for row in rows:
            key = (row["stage"], row["run"], row["metric"])
            if "step" in row:
                self.curves[key].append((row["step"], row["value"]))
            else:
                self.values[key] = row["value"]

    def get(self, stage: str, run: str, metric: str) -> float | None:
        return self.values.get((stage, run, metric))

    def curve(self, stage: str, run: str, metric: str) -> list[tuple[int, float]]:
        return sorted(self.curves.get((stage, run, metric), []))

    def runs(self, stage: str) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            if row["stage"] == stage:
                seen.setdefault(row["run"], None)
        return [r for r in seen if r != "stage"]

    def has(self, stage: str) -> bool:
        return any(row["stage"] == stage for row in self.rows)


def write_report(run: Run) -> list[MetricRow]:
    # the records of the stages before this one, in pipeline order
    rows = [row for record in run.records.values() for row in record["metrics"]]
    write_metrics(run.out / "metrics.jsonl", rows)
    metrics = Metrics(rows)
    plots = run.out / "plots"
    pictures = {}
    for name, draw in (("kernel_speedups", plot_kernels), ("rm_accuracy", plot_reward_models),
                       ("active_selection", plot_active), ("gold_reward", plot_policies)):
        path = plots / f"{name}.png"
        if draw(metrics, path):
            pictures[name] = path.relative_to(run.out).as_posix()
    if (plots / "strength_histogram.png").exists() and metrics.has("strength"):
        pictures["strength_histogram"] = "plots/strength_histogram.png"
    text = markdown(metrics, run, pictures)
    atomic_write(run.out / "report.md", lambda tmp: tmp.write_text(text))
    run.say(f"  {run.out / 'report.md'}")
    return []


# ---- the markdown ---------------------------------------------------------------------------

def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def markdown(m: Metrics, run: Run, pictures: dict[str, str]) -> str:
    import transformers

    s = run.settings
    seconds = sum(r.get("seconds", 0.0) for r in run.records.values())
    lines = ["# rlengine quickstart report", "",
             f"{datetime.date.today().isoformat()}; {describe_cpu()}; torch {torch.__version__}, "
             f"transformers {transformers.__version__}, Python {platform.python_version()}; "
             f"{_threads_used(run)}. The built-in synthetic task (task seed "
             f"{s.task_seed}, seed {s.seed}): a tiny Llama copies, reverses or sorts words, and "
             f"a programmatic gold reward judges every answer, so each step of the pipeline can "
             f"be scored against the truth. Stages' compute time: {seconds / 60:.1f} min.", ""]
    lines += _stage_table(run)
    lines += ["## Findings", ""] + [f"- {f}" for f in findings(m, s)] + [""]
    if m.has("kernels"):
        lines += _kernels_section(m, pictures)
    if m.has("sft") or m.has("samples"):
        lines += _data_section(m, s)
    if m.has("strength"):
        lines += _strength_section(m, pictures)
    if m.has("reward"):
        lines += _reward_section(m, pictures)
    if m.has("active"):
        lines += _active_section(m, s, pictures)
    if m.has("ppo") or m.has("rrhf"):
        lines += _policy_section(m, s, pictures)
    lines += _files_section(run)
    return "\n".join(lines)


def _stage_table(run: Run) -> list[str]:
    from rlengine.quickstart.stages import all_stages

    rows = []
    for stage in (s.name for s in all_stages() if not s.always):
        record = run.records.get(stage)
        if record is None:
            rows.append([stage, "not run", "", ""])
        else:
            rows.append([stage, record.get("finished", ""), f"{record.get('seconds', 0):.0f}",
                         str(record.get("threads", "not recorded"))])
    return ["Stages (a stage reused from an earlier run shows when it finished, and the CPU "
            "threads it ran with):", ""] + \
        _table(["stage", "finished", "seconds", "CPU threads"], rows)


def _threads_used(run: Run) -> str:
    """The CPU threads of the stages in this report: one count, or the range (the stage table
    gives each)."""
    counts = sorted({r["threads"] for r in run.records.values() if "threads" in r})
    if not counts:
        return f"{torch.get_num_threads()} CPU threads"
    if len(counts) == 1:
        return f"{counts[0]} CPU thread{'s' if counts[0] != 1 else ''}"
    return f"{counts[0]} to {counts[-1]} CPU threads (by stage: the table below)"


def _speedup_summary(speedups: list[float]) -> str:
    """How the fused ops compared with eager PyTorch, in words that stay true at the edges: a
    speedup within 10% of 1 is the same speed, not "faster"."""
    faster = [x for x in speedups if x >= 1.1]
    same = [x for x in speedups if 1 / 1.1 < x < 1.1]
    slower = [x for x in speedups if x <= 1 / 1.1]
    parts = []
    if faster:
        parts.append(f"{len(faster)} of the {len(speedups)} fused ops ran faster than their "
                     f"eager PyTorch equivalents ({min(faster):.1f}x to {max(faster):.1f}x)")
    if same:
        parts.append(f"{len(same)} about as fast ({min(same):.2f}x to {max(same):.2f}x)")
    if slower:
        parts.append(f"{len(slower)} slower ({min(slower):.2f}x to {max(slower):.2f}x)")
    return "; ".join(parts)


def findings(m: Metrics, s) -> list[str]:
    out = []
    if m.has("kernels"):
        speedups = [m.get("kernels", r, "speedup") for r in m.runs("kernels")]
        speedups = [x for x in speedups if x is not None]
        if speedups:
            out.append(f"Kernels: {_speedup_summary(speedups)}, measured just now on this "
                       f"machine (speedup = eager median / fused median; the benchmark "
                       f"suite's full table: bench/results/cpu-2026-11-21.md).")
    auc = m.get("strength", "strength", "auc_flipped")
    if auc is not None:
        out.append(f"Preference strength: the voters' mean difference mu separates the "
                   f"flipped labels from the rest with ROC AUC {auc:.3f} (earlier, on "
                   f"noisy-expert pairs: 0.909 +- 0.012 over 3 seeds); "
                   f"{m.get('strength', 'strength', 'negative_share'):.0%} of pairs have "
                   f"mu < 0.")
    plain, denoised = m.get("reward", "plain", "accuracy"), m.get("reward", "denoised",
                                                                   "accuracy")
    if plain is not None and denoised is not None:
        verb = "beats" if denoised > plain else "does not beat"
        out.append(f"Denoising: the strength-denoised reward model {verb} plain Bradley-Terry "
                   f"on held-out pairs with gold labels, {denoised:.3f} against {plain:.3f} "
                   f"({100 * (denoised - plain):+.1f} points; earlier, on noisy-expert pairs: "
                   f"0.816 against 0.759, +5.7 points).")
    segment = m.get("reward", "segment", "accuracy")
    if segment is not None and plain is not None:
        before = m.get("reward", "segment", "accuracy_untrained")
        out.append(f"Segment-level reward model: training raises its accuracy from "
                   f"{_f(before)} to {segment:.3f}, "
                   f"{'above' if segment > plain else 'below'} the EOS readout's {plain:.3f} "
                   f"(earlier: 0.516 -> 0.714, below the EOS readout's 0.759).")
    if m.has("active"):
        final = {r: m.curve("active", r, "accuracy")[-1] for r in m.runs("active")
                 if m.curve("active", r, "accuracy")}
        if "random" in final:
            labels = final["random"][0]
            parts = [f"{r} {v:.3f}" for r, (_, v) in final.items()]
            best = max(final, key=lambda r: final[r][1])
            verdict = ("random selection is best here" if best == "random" else
                       f"{best} is best here")
            out.append(f"Active selection: held-out accuracy with {labels} labels: "
                       f"{', '.join(parts)} ({s.active_seeds} seed(s)); {verdict}"
                       f" (earlier, 5 seeds: D-opt saves no labels on this task; "
                       f"bench/results/active-2026-11-22.md explains why).")
    policy = []
    for name, title in POLICY_RUNS.items():
        curve = m.curve("ppo" if name.startswith("ppo") else "rrhf", name,
                        "gold_reward_sampled")
        if len(curve) >= 2:
            policy.append(f"{title} {curve[0][1]:.2f} -> {curve[-1][1]:.2f}")
    if policy:
        out.append("Policy optimization, held-out gold reward of sampled answers (SFT policy "
                   "-> trained): " + "; ".join(policy) + " (earlier, 3 seeds: PPO with the "
                   "gold reward 2.99 -> 4.40; PPO with reward models trained on noisy-expert "
                   "pairs 3.02 bandit, 1.90 segment-dense: the policy exploits the reward "
                   "model's errors).")
    return out


def _kernels_section(m: Metrics, pictures: dict[str, str]) -> list[str]:
    rows = [[r, _f(m.get("kernels", r, "rlengine_ms")), _f(m.get("kernels", r, "eager_ms")),
             f"{m.get('kernels', r, 'speedup'):.1f}x", f"{m.get('kernels', r, 'max_abs_diff'):.1e}"]
            for r in m.runs("kernels")]
    lines = ["## Kernel speedups, measured live", "",
             "Each fused op on the outputs of a tiny random Llama with a 32k vocabulary, "
             "against the eager PyTorch it replaces (medians):", ""]
    lines += _table(["op [shape]", "rlengine ms", "eager ms", "speedup", "max |diff|"], rows)
    if "kernel_speedups" in pictures:
        lines += [f"![kernel speedups]({pictures['kernel_speedups']})", ""]
    return lines


def _data_section(m: Metrics, s) -> list[str]:
    lines = ["## SFT policy and preference data", ""]
    if m.has("sft"):
        lines += [f"SFT policy on {s.heldout_prompts} held-out prompts: gold reward "
                  f"{_f(m.get('sft', 'sft', 'gold_reward_greedy'))} greedy, "
                  f"{_f(m.get('sft', 'sft', 'gold_reward_sampled'))} sampled; "
                  f"{_f(m.get('sft', 'sft', 'perfect_greedy'))} of greedy answers perfect.", ""]
    if m.has("samples"):
        rows = [[name, f"{int(m.get('samples', name, 'pairs'))}",
                 _f(m.get("samples", name, "sample_gold_reward")),
                 _f(m.get("samples", name, "terminated")),
                 _f(m.get("samples", name, "label_errors"))]
                for name in ("train", "validation")]
        lines += [f"{s.samples_per_prompt} samples per prompt from the SFT policy; every "
                  f"within-prompt pair of distinct answers with different gold rewards, "
                  f"labelled by the simulated annotator (Bradley-Terry on the gold reward, "
                  f"then {s.flip_fraction:.0%} of the training labels flipped; validation "
                  f"labels are the gold preference):", ""]
        lines += _table(["set", "pairs", "mean gold reward of samples", "share ending in EOS",
                         "labels against gold"], rows)
    return lines


def _strength_section(m: Metrics, pictures: dict[str, str]) -> list[str]:
    g = lambda k: m.get("strength", "strength", k)  # noqa: E731
    lines = ["## Preference strength", "",
             f"ROC AUC of -mu for the flipped pairs: {_f(g('auc_flipped'))}; for the pairs "
             f"whose label disagrees with the gold preference (flips and annotator noise): "
             f"{_f(g('auc_against_gold'))}. Share with mu < 0: {_f(g('negative_share'))}; "
             f"flipped share overall {_f(g('flipped_share'))}, in the lowest-mu decile "
             f"{_f(g('lowest_decile_flipped_share'))}.", ""]
    if "strength_histogram" in pictures:
        lines += [f"![strength histogram]({pictures['strength_histogram']})", ""]
    return lines


def _reward_section(m: Metrics, pictures: dict[str, str]) -> list[str]:
    rows = [[name, REWARD_NAMES.get(name, name), _f(m.get("reward", name, "accuracy_untrained")),
             _f(m.get("reward", name, "accuracy"))] for name in m.runs("reward")]
    lines = ["## Reward models", "",
             "Held-out accuracy against the gold preference, on the validation pairs:", ""]
    lines += _table(["model", "method", "before training", "after training"], rows)
    if "rm_accuracy" in pictures:
        lines += [f"![reward-model accuracy]({pictures['rm_accuracy']})", ""]
    return lines


def _active_section(m: Metrics, s, pictures: dict[str, str]) -> list[str]:
    strategies = [r for r in m.runs("active") if m.curve("active", r, "accuracy")]
    labels = [step for step, _ in m.curve("active", strategies[0], "accuracy")]
    rows = [[r] + [_f(v) for _, v in m.curve("active", r, "accuracy")] for r in strategies]
    lines = ["## Active selection of comparisons", "",
             f"In-prompt pools of {s.active_responses_per_prompt} noisy-expert answers per "
             f"prompt, embedded by the SFT policy; the paper's preference model refitted every "
             f"round; held-out accuracy against the gold preference, mean of "
             f"{s.active_seeds} seed(s), by labels used:", ""]
    lines += _table(["strategy"] + [str(x) for x in labels], rows)
    ratios = [(r, m.get("active", r, "label_ratio")) for r in strategies]
    lines += ["Share of the budget each strategy needs to reach random's final accuracy: "
              + ", ".join(f"{r} {_f(v, 2)}" for r, v in ratios)
              + " (n/a: not reached within the budget).", ""]
    if "active_selection" in pictures:
        lines += [f"![active selection]({pictures['active_selection']})", ""]
    return lines


def _policy_section(m: Metrics, s, pictures: dict[str, str]) -> list[str]:
    rows = []
    for name, title in POLICY_RUNS.items():
        stage = "ppo" if name.startswith("ppo") else "rrhf"
        sampled = m.curve(stage, name, "gold_reward_sampled")
        greedy = m.curve(stage, name, "gold_reward_greedy")
        if not sampled:
            continue
        rows.append([name, title, _f(sampled[0][1]), _f(sampled[-1][1]), _f(greedy[0][1]),
                     _f(greedy[-1][1]), str(sampled[-1][0])])
    lines = ["## Policy optimization", "",
             f"From the SFT policy; held-out gold reward on {s.heldout_prompts} prompts, of "
             f"sampled (temperature 1) and greedy answers, before and after training. PPO: "
             f"{s.ppo_iterations} iterations of {s.ppo_prompts_per_iteration} prompts x 4 "
             f"samples; RRHF: {s.rrhf_rounds} rounds over {s.rrhf_queries} prompts.", ""]
    lines += _table(["run", "what", "sampled before", "sampled after", "greedy before",
                     "greedy after", "prompts trained on"], rows)
    if "gold_reward" in pictures:
        lines += [f"![gold reward against training]({pictures['gold_reward']})", ""]
    return lines


def _files_section(run: Run) -> list[str]:
    from rlengine.quickstart.stages import model_folders

    lines = ["## Files", "",
             "- `metrics.jsonl`: every number above, one row per (stage, run, metric[, step]);",
             "- `<stage>/stage.json`: what each stage ran with, and when;",
             "- `reward/<model>/metrics.jsonl`, `ppo/<run>/metrics.jsonl`, "
             "`rrhf/denoised_rm/metrics.jsonl`: the trainers' step-by-step logs;",
             "- `active/`: the active-selection curves (results.json, curves.md, plots);",
             "- trained models (load with `transformers` or `rlengine.reward.RewardModel.load`):"]
    for name, folder in model_folders(run.out).items():
        if folder.exists():
            lines.append(f"  - {name}: `{folder.relative_to(run.out).as_posix()}`")
    return lines + [""]


# ---- the plots ------------------------------------------------------------------------------

def _figure(width: float = 7.5, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> bool:
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return True


def plot_kernels(m: Metrics, path: Path) -> bool:
    names = m.runs("kernels")
    if not names:
        return False
    speedups = [m.get("kernels", n, "speedup") for n in names]
    labels = [n.split(" [")[0] for n in names]
    figure = _figure(7.5, 0.45 * len(names) + 1.4)
    axes = figure.add_subplot()
    bars = axes.barh(range(len(names)), speedups, color="#3b7dd8",
                     label="eager median / rlengine median")
    axes.set_yticks(range(len(names)), labels)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(1.0, color="gray", lw=0.8, label="1x: the same speed")
    axes.set_xlabel("speedup over eager PyTorch (log scale; 1 = same speed)")
    axes.set_title("Fused ops against their eager equivalents, measured live")
    for bar, value in zip(bars, speedups):
        axes.text(bar.get_width() * 1.05, bar.get_y() + bar.get_height() / 2,
                  f"{value:.1f}x", va="center", fontsize=8)
    axes.set_xlim(right=max(speedups) * 3)
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def plot_reward_models(m: Metrics, path: Path) -> bool:
    names = m.runs("reward")
    if not names:
        return False
    figure = _figure()
    axes = figure.add_subplot()
    x = range(len(names))
    before = [m.get("reward", n, "accuracy_untrained") for n in names]
    after = [m.get("reward", n, "accuracy") for n in names]
    axes.bar([i - 0.2 for i in x], before, width=0.4, color="#c8c8c8", label="before training")
    bars = axes.bar([i + 0.2 for i in x], after, width=0.4, color="#3b7dd8",
                    label="after training")
    for bar, value in zip(bars, after):
        axes.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f"{value:.3f}",
                  ha="center", fontsize=8)
    axes.set_xticks(list(x), [REWARD_NAMES.get(n, n).replace(" + ", "\n+ ") for n in names],
                    fontsize=7)
    axes.axhline(0.5, color="gray", lw=0.8, ls=":")
    axes.set_ylim(0.3, 1.0)
    axes.set_ylabel("held-out accuracy vs gold")
    axes.set_title("Reward-model accuracy by method")
    axes.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def plot_active(m: Metrics, path: Path) -> bool:
    strategies = [r for r in m.runs("active") if m.curve("active", r, "accuracy")]
    if not strategies:
        return False
    from matplotlib.patches import Patch

    figure = _figure()
    axes = figure.add_subplot()
    for strategy in strategies:
        curve = m.curve("active", strategy, "accuracy")
        std = dict(m.curve("active", strategy, "accuracy_std"))
        x = [p for p, _ in curve]
        y = [v for _, v in curve]
        line, = axes.plot(x, y, "-" if "dopt" in strategy else "--", marker="o", markersize=3,
                          label=f"{strategy} (mean over seeds)")
        axes.fill_between(x, [v - std.get(p, 0) for p, v in curve],
                          [v + std.get(p, 0) for p, v in curve], alpha=0.12,
                          color=line.get_color())
    axes.set_xlabel("labels used")
    axes.set_ylabel("held-out accuracy vs gold")
    axes.set_title("Label efficiency: active selection against random")
    handles, _ = axes.get_legend_handles_labels()
    band = Patch(color="gray", alpha=0.25, label="shaded: mean +- std over seeds")
    axes.legend(handles=handles + [band], fontsize=8)
    return _save(figure, path)


def plot_policies(m: Metrics, path: Path) -> bool:
    curves = {name: m.curve("ppo" if name.startswith("ppo") else "rrhf", name,
                            "gold_reward_sampled") for name in POLICY_RUNS}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    figure = _figure(11, 4.2)
    left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for name, curve in curves.items():
        left.plot([p for p, _ in curve], [v for _, v in curve], marker="o", markersize=3,
                  label=POLICY_RUNS[name])
        rollout = m.curve("ppo", name, "rollout_gold_reward")
        if rollout:
            right.plot([p for p, _ in rollout], [v for _, v in rollout], label=POLICY_RUNS[name])
    left.set_title("Held-out gold reward (sampled answers)")
    right.set_title("Gold reward of each PPO rollout")
    for axes in (left, right):
        axes.set_xlabel("prompts trained on")
        axes.set_ylabel("mean gold reward")
        axes.legend(fontsize=7)
    return _save(figure, path)


def load_metrics(path: str | Path) -> Metrics:
    return Metrics([json.loads(line) for line in Path(path).read_text().splitlines() if line])

