"""`rlengine strength`: preference strength by voting (METHODS.md section 1), written out and
looked at.

1. M reward models that differ only by seed (head init, data order, dropout) train on the
   training pairs, each with the trainer options given (steps, lr, ...), each in
   OUTPUT_DIR/voter-m so that an interrupted run resumes voter by voter; every voter scores
   every training pair (in-sample, as in the paper).
2. OUTPUT_DIR/strength.jsonl: the training pairs with columns strength_mu, strength_sigma and
   strength_d0..d{M-1} (voter m's r(chosen) - r(rejected)); `rlengine train-rm --train` reads
   it for the strength options.
3. The decile table (printed, and saved as deciles.md and deciles.json): pairs sorted by mu
   into ten equal groups, with each group's mu range, mean mu, mean sigma and share of mu < 0;
   where the pairs carry a ground truth, the share of flipped labels (column ``flipped``, as
   the synthetic task writes) and the agreement of the label with a cleaner one (column
   ``label_agreement``, or the synthetic task's ``gold_prefers_chosen``); and, unless
   decile_steps is 0, the accuracy on the first validation set of a reward model trained on
   that decile alone (the paper: about 0.33 for the lowest decile, 0.66 in the middle).
4. Plots under OUTPUT_DIR/plots/: strength_histogram.png and decile_accuracy.png.
5. OUTPUT_DIR/summary.json: the key numbers (share of mu < 0, ROC AUC of -mu for finding the
   flipped pairs, per-decile accuracies, ...).

Under torchrun every process trains (the voters and decile models are data parallel); only
rank 0 writes files and prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlengine.configs import ConfigError
from rlengine.data.types import PreferencePair
from rlengine.data.writers import write_preferences
from rlengine.files import atomic_write
from rlengine.reward.config import RewardTrainerConfig
from rlengine.reward.job import RewardJob, RewardJobConfig, build_job
from rlengine.reward.strength import StrengthResult, roc_auc, vote
from rlengine.training.distributed import init_distributed

DEFAULT_VOTERS = 10
DECILES = 10
# Ground-truth columns the decile table reports on when the pairs have them (bool, 0/1, or
# null where unknown). ``flipped``: the label was deliberately flipped (the synthetic task).
# Agreement of the label with a cleaner one, the first of these present: a column of the
# user's own, or the synthetic task's gold preference.
FLIP_COLUMN = "flipped"
AGREEMENT_COLUMNS = ("label_agreement", "gold_prefers_chosen")

STRENGTH_FILE = "strength.jsonl"
PLOTS_DIR = "plots"
HISTOGRAM_PLOT = "strength_histogram.png"
DECILE_PLOT = "decile_accuracy.png"


@dataclass
class GroundTruth:
    """A 0/1 column over the pairs: ``known[i]`` False where pair i has no value."""

    column: str
    values: torch.Tensor   # bool [n]
    known: torch.Tensor    # bool [n]

    def share(self, indices: torch.Tensor) -> float | None:
        known = self.known[indices]
        if not known.any():
            return None
        return float(self.values[indices][known].double().mean())


def run_strength_command(job_config: RewardJobConfig, trainer_config: RewardTrainerConfig, *,
                         voters: int | None = None, decile_steps: int | None = None,
                         log: Callable[[str], None] = print) -> int:
    """The `rlengine strength` command (see the module docstring). ``voters`` defaults to 10;
    ``decile_steps`` to a third of the voters' steps (0 skips the per-decile models)."""
    voters = DEFAULT_VOTERS if voters is None else voters
    if voters < 1:
        raise ConfigError(f"voters must be >= 1, got {voters}")
    if decile_steps is not None and decile_steps < 0:
        raise ConfigError(f"decile_steps must be >= 0 (0 skips the per-decile models), got "
                          f"{decile_steps}")
    if not trainer_config.output_dir:
        raise ConfigError("strength needs output_dir (--output-dir): it writes strength.jsonl, "
                          "the decile table, the plots and the voters' checkpoints there")
    used = trainer_config.strength_options()
    if used:
        raise ConfigError(f"strength trains its voters on the plain labels, so the strength "
                          f"options cannot be used with it (got {', '.join(used)}); use them "
                          f"with `rlengine train-rm --train OUTPUT_DIR/{STRENGTH_FILE}`")

    distributed = init_distributed(job_config.device)
    main = distributed.is_main
    say = log if main else (lambda *_: None)
    output = Path(trainer_config.output_dir)
    job = build_job(job_config, need_entropy=trainer_config.score_mode == "segment",
                    need_meta=trainer_config.metarm_eta > 0, log=say)
    pairs = job.train_pairs
    if len(pairs) < DECILES:
        raise ConfigError(f"strength needs at least {DECILES} training pairs for its decile "
                          f"table, got {len(pairs)}")
    # read before the (long) vote, so that a malformed column fails at once
    flips = _ground_truth(pairs, (FLIP_COLUMN,))
    agreement = _ground_truth(pairs, AGREEMENT_COLUMNS)

    say(f"strength: {voters} voters on {len(pairs)} pairs, seeds {trainer_config.seed}.."
        f"{trainer_config.seed + voters - 1}, checkpoints under {output}/voter-*")

    def on_voter(m: int, differences: torch.Tensor) -> None:
        say(f"voter {m + 1}/{voters}: in-sample accuracy "
            f"{float((differences > 0).double().mean()):.4f}, mean difference "
            f"{float(differences.mean()):.3f}")

    result = vote(job.make_model, job.tokenizer, pairs, trainer_config, voters=voters,
                  on_voter=on_voter, device=job_config.device, log=say,
                  **job.trainer_kwargs())
    # rank 0's votes everywhere: the deciles (and so the decile models' data) must agree
    result = distributed.broadcast_object(result)
    annotated = result.annotate(pairs)
    if main:
        path = write_preferences(annotated, output / STRENGTH_FILE)
        say(f"wrote {path} (columns strength_mu, strength_sigma, strength_d0.."
            f"strength_d{voters - 1})")

    groups = decile_indices(result.mu)
    steps = _decile_steps(decile_steps, trainer_config, len(pairs))
    validation_name, accuracies = None, None
    if steps:
        if not job.eval_sets:
            say("no validation set (give eval, or eval_fraction > 0): the per-decile models "
                "are skipped")
        else:
            validation_name = next(iter(job.eval_sets))
            accuracies = _decile_accuracies(job, trainer_config, groups, steps, validation_name,
                                            job_config.device, distributed.world_size, say)

    rows = decile_rows(result, groups, flips, agreement, accuracies)
    summary = _summary(result, rows, flips, agreement, voters, validation_name, steps, job)
    if main:
        table = format_decile_table(rows, validation_name)
        say("")
        say(table)
        _write_text(output / "deciles.md", _decile_markdown(table, result, validation_name,
                                                            steps))
        _write_json(output / "deciles.json",
                    {"validation_set": validation_name, "decile_steps": steps, "rows": rows})
        plots = output / PLOTS_DIR
        plot_strength_histogram(result.mu, plots / HISTOGRAM_PLOT,
                                flipped=None if flips is None else flips.values & flips.known)
        written = [plots / HISTOGRAM_PLOT]
        if accuracies is not None:
            plot_decile_accuracy(accuracies, plots / DECILE_PLOT, validation_name)
            written.append(plots / DECILE_PLOT)
        summary["files"] = [str(p.relative_to(output)) for p in
                            [output / STRENGTH_FILE, output / "deciles.md",
                             output / "deciles.json", *written]]
        _write_json(output / "summary.json", summary)
        say("")
        say(f"share of pairs with mu < 0: {summary['share_mu_negative']:.3f}")
        if "flipped_auc" in summary:
            say(f"ROC AUC of -mu for the flipped pairs: {summary['flipped_auc']:.3f}")
        say(f"plots: {', '.join(str(p) for p in written)}")
        say(f"next: rlengine train-rm --train {output / STRENGTH_FILE} --margin strength "
            f"--label-smoothing 0.2 --smoothing-on negative_strength ...")
    distributed.barrier()
    return 0


# ---- deciles ----------------------------------------------------------------------------------


def decile_indices(mu: torch.Tensor, groups: int = DECILES) -> list[torch.Tensor]:
    """The pair indices of each decile of ``mu``, lowest first: the pairs sorted by mu (ties by
    position) cut into ``groups`` parts whose sizes differ by at most one."""
    n = len(mu)
    if n < groups:
        raise ValueError(f"{n} pairs cannot make {groups} deciles")
    order = torch.sort(mu, stable=True).indices
    return [order[k * n // groups:(k + 1) * n // groups] for k in range(groups)]


def decile_rows(result: StrengthResult, groups: Sequence[torch.Tensor],
                flips: GroundTruth | None = None, agreement: GroundTruth | None = None,
                accuracies: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """One dict per decile: decile (1 = lowest mu), pairs, mu_min, mu_max, mu_mean,
    sigma_mean, share_mu_negative, and where known share_flipped, label_agreement (and its
    column) and validation_accuracy."""
    rows = []
    for k, indices in enumerate(groups):
        mu, sigma = result.mu[indices], result.sigma[indices]
        row: dict[str, Any] = {
            "decile": k + 1, "pairs": len(indices),
            "mu_min": float(mu.min()), "mu_max": float(mu.max()),
            "mu_mean": float(mu.mean()), "sigma_mean": float(sigma.mean()),
            "share_mu_negative": float((mu < 0).double().mean())}
        if flips is not None:
            row["share_flipped"] = flips.share(indices)
        if agreement is not None:
            row["label_agreement"] = agreement.share(indices)
            row["label_agreement_column"] = agreement.column
        if accuracies is not None:
            row["validation_accuracy"] = float(accuracies[k])
        rows.append(row)
    return rows


def format_decile_table(rows: Sequence[dict[str, Any]], validation_name: str | None = None
                        ) -> str:
    """The decile table as Markdown (readable as plain text too)."""
    columns = [("decile", "decile", "{}"), ("pairs", "pairs", "{}"),
               ("mu range", None, None), ("mean mu", "mu_mean", "{:.3f}"),
               ("mean sigma", "sigma_mean", "{:.3f}"),
               ("mu < 0", "share_mu_negative", "{:.3f}")]
    if rows and "share_flipped" in rows[0]:
        columns.append(("flipped", "share_flipped", "{:.3f}"))
    if rows and "label_agreement" in rows[0]:
        columns.append((f"agrees ({rows[0]['label_agreement_column']})", "label_agreement",
                        "{:.3f}"))
    if rows and "validation_accuracy" in rows[0]:
        columns.append((f"accuracy on {validation_name or 'validation'}",
                        "validation_accuracy", "{:.3f}"))
    header = [title for title, _, _ in columns]
    body = []
    for row in rows:
        cells = []
        for _, key, style in columns:
            if key is None:
                cells.append(f"[{row['mu_min']:.3f}, {row['mu_max']:.3f}]")
            elif row.get(key) is None:
                cells.append("-")
            else:
                cells.append(style.format(row[key]))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _decile_markdown(table: str, result: StrengthResult, validation_name: str | None,
                     steps: int) -> str:
    m, n = result.differences.shape
    notes = ["# Preference strength by decile\n",
             f"{n} training pairs, {m} voters (seeds {result.seeds[0]}..{result.seeds[-1]}); "
             f"deciles of mu = mean voter score difference r(chosen) - r(rejected), "
             f"decile 1 the lowest; sigma = its population std over voters.", ""]
    if validation_name is not None:
        notes += [f"Accuracy: a reward model trained for {steps} steps on that decile alone, "
                  f"evaluated on the validation set {validation_name!r}.", ""]
    return "\n".join(notes) + "\n" + table + "\n"


def _decile_steps(requested: int | None, config: RewardTrainerConfig, pairs: int) -> int:
    if requested is not None:
        return requested
    return max(1, config.total_steps(pairs) // 3)


def _decile_accuracies(job: RewardJob, config: RewardTrainerConfig,
                       groups: Sequence[torch.Tensor], steps: int, validation_name: str,
                       device: str | None, world: int, say: Callable[[str], None]
                       ) -> list[float]:
    """Train one reward model per decile on that decile alone (same initial model and seed
    for all, so only the data differs), each in OUTPUT_DIR/decile-k, and return each one's
    accuracy on the validation set ``validation_name``."""
    from rlengine.reward.trainer import RewardTrainer

    kwargs = job.trainer_kwargs()
    kwargs["eval_sets"] = {validation_name: job.eval_sets[validation_name]}
    accuracies = []
    for k, indices in enumerate(groups):
        decile_pairs = [job.train_pairs[i] for i in indices.tolist()]
        decile_config = dataclasses.replace(
            config, steps=steps, output_dir=f"{config.output_dir}/decile-{k + 1}",
            save_model=False, batch_size=_fitting_batch(config, len(decile_pairs), world, say, k))
        trainer = RewardTrainer(job.make_model(0), job.tokenizer, decile_pairs, decile_config,
                                device=device, log=say, **kwargs)
        metrics = trainer.train().metrics[validation_name]
        accuracies.append(metrics["accuracy"])
        say(f"decile {k + 1}/{len(groups)}: {len(decile_pairs)} pairs, {steps} steps, accuracy "
            f"on {validation_name} {metrics['accuracy']:.4f}")
    return accuracies


def _fitting_batch(config: RewardTrainerConfig, pairs: int, world: int, say, k: int) -> int:
    """config.batch_size, or the largest batch a decile of ``pairs`` holds that still splits
    into grad_accum x processes equal micro-batches."""
    if config.batch_size <= pairs:
        return config.batch_size
    unit = config.grad_accum * world
    batch = pairs // unit * unit
    if batch < 1:
        raise ConfigError(f"decile {k + 1} has {pairs} pairs, fewer than grad_accum x processes "
                          f"({unit}): use more training pairs or --decile-steps 0")
    say(f"decile {k + 1}: batch_size {config.batch_size} > its {pairs} pairs; using {batch}")
    return batch


# ---- ground truth and summary -----------------------------------------------------------------


def _ground_truth(pairs: Sequence[PreferencePair], columns: Sequence[str]
                  ) -> GroundTruth | None:
    """The first of ``columns`` that some pair has a value in, as a GroundTruth (None if no
    pair has any)."""
    for column in columns:
        if not any(p.extra.get(column) is not None for p in pairs):
            continue
        values, known = [], []
        for i, pair in enumerate(pairs):
            value = pair.extra.get(column)
            if value is None:
                values.append(False)
                known.append(False)
                continue
            if isinstance(value, bool) or (isinstance(value, (int, float))
                                           and value in (0, 1)):
                values.append(bool(value))
                known.append(True)
                continue
            where = pair.source or f"pair {i}"
            raise ConfigError(f"{where}: column {column!r} must be true/false (or 0/1, or null "
                              f"where unknown), got {value!r}: the decile table reads it as "
                              f"ground truth")
        return GroundTruth(column, torch.tensor(values), torch.tensor(known))
    return None


def _summary(result: StrengthResult, rows: list[dict[str, Any]], flips: GroundTruth | None,
             agreement: GroundTruth | None, voters: int, validation_name: str | None,
             steps: int, job: RewardJob) -> dict[str, Any]:
    mu, sigma = result.mu, result.sigma
    summary: dict[str, Any] = {
        "pairs": len(mu), "voters": voters, "seeds": list(result.seeds),
        "share_mu_negative": float((mu < 0).double().mean()),
        "mu_mean": float(mu.mean()), "mu_std": float(mu.std(correction=0)),
        "sigma_mean": float(sigma.mean()),
        "voter_in_sample_accuracy": [float((d > 0).double().mean())
                                     for d in result.differences]}
    voter_accuracy: dict[str, list[float]] = {}
    for metrics in result.metrics:
        for name, values in metrics.items():
            voter_accuracy.setdefault(name, []).append(values["accuracy"])
    if voter_accuracy:
        summary["voter_validation_accuracy"] = voter_accuracy
    if flips is not None and flips.known.any():
        known = flips.known
        flipped = flips.values[known]
        summary["flipped_pairs"] = int(flipped.sum())
        summary["flipped_auc"] = roc_auc(-mu[known], flipped)
        summary["share_mu_negative_flipped"] = _share(mu[known][flipped] < 0)
        summary["share_mu_negative_unflipped"] = _share(mu[known][~flipped] < 0)
    if agreement is not None and agreement.known.any():
        known = agreement.known
        summary["label_agreement_column"] = agreement.column
        summary["label_agreement"] = float(agreement.values[known].double().mean())
        summary["label_agreement_auc"] = roc_auc(mu[known], agreement.values[known])
    if validation_name is not None and rows and "validation_accuracy" in rows[0]:
        summary["validation_set"] = validation_name
        summary["validation_pairs"] = len(job.eval_sets[validation_name])
        summary["decile_steps"] = steps
        summary["decile_validation_accuracy"] = [row["validation_accuracy"] for row in rows]
    summary["deciles"] = rows
    return summary


def _share(flags: torch.Tensor) -> float | None:
    return float(flags.double().mean()) if len(flags) else None


# ---- files and plots --------------------------------------------------------------------------


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(_json_safe(value), indent=2) + "\n")


def _json_safe(value: Any) -> Any:
    """NaN (an AUC with one class absent) as null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _save_figure(figure, path: Path) -> None:
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=120))


def plot_strength_histogram(mu: torch.Tensor, path: str | os.PathLike, *,
                            flipped: torch.Tensor | None = None, bins: int = 50) -> Path:
    """Histogram of mu, pairs with mu < 0 in their own colour; with ``flipped`` (bool [n]),
    the flipped pairs' histogram drawn over it as an outline."""
    # Figure + its Agg canvas, not pyplot: no global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = mu.double().numpy()
    figure = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 0.5, high + 0.5
    # bins of equal width with 0 on an edge, so that no bar mixes signs
    width = (high - low) / bins
    first = math.floor(low / width)
    edges = (torch.arange(first, math.ceil(high / width) + 1, dtype=torch.float64)
             * width).numpy()
    negative = values < 0
    share = float(negative.mean())
    axes.hist(values[~negative], bins=edges, color="#4c72b0", label="mu >= 0")
    axes.hist(values[negative], bins=edges, color="#dd5555",
              label=f"mu < 0 ({100 * share:.1f}% of pairs)")
    if flipped is not None and bool(flipped.any()):
        axes.hist(values[flipped.numpy()], bins=edges, histtype="step", color="black",
                  linewidth=1.4, label=f"flipped labels ({int(flipped.sum())})")
    axes.axvline(0.0, color="black", linestyle="--", linewidth=0.8)
    axes.set_xlabel("preference strength mu (mean voter r(chosen) - r(rejected))")
    axes.set_ylabel("pairs")
    axes.set_title(f"Preference strength of {len(values)} training pairs")
    axes.legend(frameon=False)
    figure.tight_layout()
    path = Path(path)
    _save_figure(figure, path)
    return path


def plot_decile_accuracy(accuracies: Sequence[float], path: str | os.PathLike,
                         validation_name: str | None = None) -> Path:
    """Bar chart of the per-decile models' validation accuracy, with chance (0.5) marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    deciles = list(range(1, len(accuracies) + 1))
    colors = ["#dd5555" if a < 0.5 else "#4c72b0" for a in accuracies]
    bars = axes.bar(deciles, accuracies, color=colors)
    axes.bar_label(bars, labels=[f"{a:.2f}" for a in accuracies], padding=2, fontsize=8)
    axes.axhline(0.5, color="black", linestyle="--", linewidth=0.8, label="chance (0.5)")
    axes.set_xticks(deciles)
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("decile of preference strength mu (1 = lowest)")
    axes.set_ylabel("validation accuracy")
    where = f" on {validation_name!r}" if validation_name else ""
    axes.set_title(f"Reward model trained on one decile alone: accuracy{where}")
    axes.legend(frameon=False, loc="upper left")
    figure.tight_layout()
    path = Path(path)
    _save_figure(figure, path)
    return path
