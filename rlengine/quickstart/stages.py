"""The quickstart's stages: the whole RLHF pipeline on the built-in synthetic task.

sft -> samples (candidate responses sampled from the SFT policy, labelled by the noisy
annotator) -> strength (voting ensemble) -> reward (plain BT, strength-denoised, segment-level)
-> rrhf and ppo (bandit vs segment-dense) from the SFT policy, all judged by the task's gold
reward; beside them, active selection (D-optimal against random) and the kernels' live
speedups. Each stage returns metric rows ``{run, metric, value[, step]}``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from pathlib import Path

import torch

from rlengine.quickstart.pipeline import MetricRow, Run, Stage
from rlengine.training.progress import progress_bar

TRAIN_PROMPT_SEED, VALIDATION_PROMPT_SEED = 1, 100


def _row(run: str, metric: str, value: float, step: int | None = None) -> MetricRow:
    row: MetricRow = {"run": run, "metric": metric, "value": float(value)}
    if step is not None:
        row["step"] = int(step)
    return row


# ---- kernels --------------------------------------------------------------------------------

def kernels(run: Run) -> list[MetricRow]:
    from rlengine import kernel_demo

    s = run.settings
    bar = progress_bar(run.progress, None, 0, "kernels", unit="op")  # the demo owns the op list
    rows = kernel_demo.run(batch=s.kernel_batch, seq_len=s.kernel_seq_len,
                           vocab_size=s.kernel_vocab, repeats=s.kernel_repeats, seed=s.seed,
                           progress=lambda message: bar.update(message.startswith("timing")))
    bar.close()
    out = []
    for timing in rows:
        name = f"{timing.op} [{timing.shape}]"
        out += [_row(name, "rlengine_ms", timing.rlengine_ms), _row(name, "eager_ms",
                                                                    timing.eager_ms),
                _row(name, "speedup", timing.speedup),
                _row(name, "max_abs_diff", timing.max_abs_diff)]
    return out


# ---- sft ------------------------------------------------------------------------------------

def sft(run: Run) -> list[MetricRow]:
    from rlengine.policy.job import evaluate_synthetic

    run.say("  supervised fine-tuning of a tiny Llama on the noisy expert's demonstrations "
            f"({run.settings.sft_steps} steps)")
    policy = run.task.sft_policy(steps=run.settings.sft_steps)
    model_dir = run.folder("sft") / "model"
    policy.save_pretrained(model_dir, safe_serialization=True)
    run.task.tokenizer.save_pretrained(model_dir)
    scores = evaluate_synthetic(run.task, run.heldout_prompts(), policy, seed=run.settings.seed)
    return [_row("sft", metric, value) for metric, value in scores.items()]


# ---- samples --------------------------------------------------------------------------------

def sampled_pairs(task, policy, prompts: list[str], *, samples: int, seed: int,
                  flip_fraction: float, temperature: float | None):
    """``samples`` responses per prompt sampled from ``policy``, every within-prompt pair of
    distinct responses whose gold rewards differ, labelled by the task's annotator."""
    repeated = [p for p in prompts for _ in range(samples)]
    responses, terminated = task.generate(policy, repeated, seed=seed, return_terminated=True)
    gold = task.gold_rewards(repeated, responses, terminated)
    columns: tuple[list, ...] = ([], [], [], [], [])
    for start in range(0, len(repeated), samples):
        for i, j in itertools.combinations(range(start, start + samples), 2):
            if gold[i] != gold[j] and responses[i] != responses[j]:
                for column, value in zip(columns, (repeated[i], responses[i], responses[j],
                                                   terminated[i], terminated[j])):
                    column.append(value)
    prompts_, first, second, done_first, done_second = columns
    pairs = task.annotate(prompts_, first, second, flip_fraction=flip_fraction,
                          temperature=temperature, seed=seed, terminated_a=done_first,
                          terminated_b=done_second, name=f"quickstart:samples/seed={seed}")
    return pairs, sum(gold) / len(gold), sum(terminated) / len(terminated)


def samples(run: Run) -> list[MetricRow]:
    from rlengine.data.writers import write_preferences

    s, task, policy = run.settings, run.task, run.sft_policy()
    out = run.folder("samples")
    rows = []
    for name, count, seed, flips, temperature in (
            ("train", s.train_prompts, TRAIN_PROMPT_SEED, s.flip_fraction, None),
            ("validation", s.validation_prompts, VALIDATION_PROMPT_SEED, 0.0, 0.0)):
        pairs, mean_gold, terminated = sampled_pairs(
            task, policy, task.prompts(count, seed=seed), samples=s.samples_per_prompt,
            seed=seed, flip_fraction=flips, temperature=temperature)
        write_preferences(pairs, out / f"{name}_pairs.jsonl")
        wrong = sum(p.extra["gold_prefers_chosen"] is False for p in pairs) / len(pairs)
        run.say(f"  {name}: {count} prompts x {s.samples_per_prompt} samples -> {len(pairs)} "
                f"pairs, {wrong:.1%} labelled against the gold preference")
        rows += [_row(name, "pairs", len(pairs)), _row(name, "sample_gold_reward", mean_gold),
                 _row(name, "terminated", terminated), _row(name, "label_errors", wrong)]
    return rows


def _pairs(run: Run, name: str):
    from rlengine.data.loaders import load_preferences

    return load_preferences(run.folder("samples") / f"{name}_pairs.jsonl")


# ---- strength -------------------------------------------------------------------------------

def _reward_config(run: Run, **options):
    from rlengine.reward.config import RewardTrainerConfig

    s = run.settings
    # the reward acceptance's settings for the tiny task (rlengine/reward/acceptance.py)
    base = RewardTrainerConfig(lr=s.rm_lr, batch_size=s.rm_batch_size, steps=s.rm_steps,
                               schedule="constant", adam_beta2=0.999, max_grad_norm=None,
                               segment_threshold=s.segment_threshold, progress=run.progress,
                               log_every=25, save_every=200, seed=s.seed)
    return dataclasses.replace(base, **options)


def _make_reward_model(run: Run, policy):
    from rlengine.reward.job import seeded_reward_model

    return lambda m=0: seeded_reward_model(run.task.make_reward_backbone(from_policy=policy),
                                           97 * run.settings.seed + m)


def strength(run: Run) -> list[MetricRow]:
    from rlengine.data.writers import write_preferences
    from rlengine.reward.strength import roc_auc, vote
    from rlengine.reward.strength_report import plot_strength_histogram

    s, out = run.settings, run.folder("strength")
    pairs, policy = _pairs(run, "train"), run.sft_policy()
    config = _reward_config(run, steps=s.voter_steps, seed=1000 * (s.seed + 1),
                            output_dir=str(out / "voters"), save_model=False)
    run.say(f"  {s.voters} voters, {s.voter_steps} steps each, on {len(pairs)} pairs")
    result = vote(_make_reward_model(run, policy), run.task.tokenizer, pairs, config,
                  voters=s.voters, log=lambda *_: None)
    annotated = result.annotate(pairs)
    write_preferences(annotated, out / "strength.jsonl")
    flipped = torch.tensor([p.extra["flipped"] for p in pairs])
    wrong = torch.tensor([p.extra["gold_prefers_chosen"] is False for p in pairs])
    mu = result.mu
    plot_strength_histogram(mu, run.out / "plots" / "strength_histogram.png", flipped=flipped)
    lowest = mu.argsort()[:max(1, len(pairs) // 10)]
    return [_row("strength", "auc_flipped", roc_auc(-mu, flipped)),
            _row("strength", "auc_against_gold", roc_auc(-mu, wrong)),
            _row("strength", "negative_share", (mu < 0).double().mean()),
            _row("strength", "flipped_share", flipped.double().mean()),
            _row("strength", "lowest_decile_flipped_share", flipped[lowest].double().mean())]


# ---- reward models --------------------------------------------------------------------------

REWARD_METHODS = {
    # name: (training pairs, what it is)
    "plain": ("train", "plain Bradley-Terry"),
    "soft_margin": ("strength", "soft labels where mu < 0 + adaptive margin"),
    "denoised": ("strength", "flip lowest decile + soft labels + margin"),
    "segment": ("train", "segment-level (entropy segments), plain labels"),
}


def _reward_options(name: str, s) -> dict:
    """RewardTrainerConfig options of a method (Secrets of RLHF II's denoising, METHODS §1)."""
    denoise = {"margin": "strength", "smoothing_on": "negative_strength",
               "label_smoothing": s.label_smoothing}
    return {"plain": {}, "soft_margin": denoise,
            "denoised": {**denoise, "flip_lowest": s.flip_lowest},
            "segment": {"score_mode": "segment"}}[name]


def reward(run: Run) -> list[MetricRow]:
    from rlengine.reward.trainer import RewardTrainer

    policy = run.sft_policy()
    make_model = _make_reward_model(run, policy)
    data = {"train": _pairs(run, "train"), "strength": _load_strength_pairs(run)}
    validation = _pairs(run, "validation")
    rows = []
    for name, (source, what) in REWARD_METHODS.items():
        config = _reward_config(run, output_dir=str(run.folder("reward") / name),
                                **_reward_options(name, run.settings))
        extra = {"entropy_model": policy} if config.score_mode == "segment" else {}
        trainer = RewardTrainer(make_model(), run.task.tokenizer, data[source], config,
                                eval_sets={"clean": validation}, log=lambda *_: None, **extra)
        before = trainer.evaluate()["clean"]["accuracy"]
        after = trainer.train().metrics["clean"]["accuracy"]
        run.say(f"  {name:12s} ({what}): held-out accuracy {before:.3f} -> {after:.3f}")
        rows += [_row(name, "accuracy_untrained", before), _row(name, "accuracy", after)]
    return rows


def _load_strength_pairs(run: Run):
    from rlengine.data.loaders import load_preferences

    return load_preferences(run.folder("strength") / "strength.jsonl")


def _reward_model(run: Run, name: str):
    from rlengine.policy.job import load_reward_model

    return load_reward_model(run.folder("reward") / name / "model")


# ---- active selection -----------------------------------------------------------------------

def active(run: Run) -> list[MetricRow]:
    from rlengine.reward.active import datasets, report
    from rlengine.reward.active.embeddings import Embedder
    from rlengine.reward.active.model import PreferenceModelConfig
    from rlengine.reward.active.simulation import ActiveSimConfig, simulate

    s, out = run.settings, run.folder("active")
    policy = run.sft_policy()
    embedder = Embedder(policy, run.task.tokenizer, "quickstart-sft", "last",
                        min(256, policy.config.max_position_embeddings))
    table = datasets.synthetic_table(run.task, embedder, prompts=s.active_prompts,
                                     responses_per_prompt=s.active_responses_per_prompt,
                                     seed=s.seed, cache_dir=None, log=lambda *_: None)
    train, test = datasets.split_prompts(s.active_prompts, 0.25, seed=s.seed)
    config = ActiveSimConfig(
        strategies=tuple(s.active_strategies), pools=("in_prompt",), seeds=s.active_seeds,
        first_seed=s.seed, rounds=s.active_rounds, initial_labels=s.active_initial_labels,
        labels_per_round=s.active_labels_per_round,
        model=PreferenceModelConfig(hidden=tuple(s.active_hidden), steps=s.active_fit_steps))
    run.say(f"  {len(table)} responses of {s.active_prompts} prompts; in-prompt pools; "
            f"{', '.join(config.strategies)}; {config.budget} labels; {config.seeds} seed(s)")
    bar = progress_bar(run.progress, len(config.strategies) * config.seeds, 0, "active",
                       unit="curve")
    result = simulate(table, train, test, config, log=lambda *_: bar.update(1))
    bar.close()
    report.write(result, out)
    rows = []
    for strategy, curve in result["summary"]["in_prompt"].items():
        for point in curve:
            rows.append(_row(strategy, "accuracy", point["accuracy"], step=point["labels"]))
            rows.append(_row(strategy, "accuracy_std", point["accuracy_std"],
                             step=point["labels"]))
        ratio = result["label_ratio"]["in_prompt"].get(strategy)
        if ratio is not None:
            rows.append(_row(strategy, "label_ratio", ratio))
    return rows


# ---- policy optimization --------------------------------------------------------------------

def _gold(task, prompt: str, response: str, terminated: bool) -> float:
    return task.gold_reward(prompt, response, terminated=terminated)


def _trainer_rows(name: str, output_dir: Path, counter: str, prompts_per_step: int
                  ) -> list[MetricRow]:
    """Held-out gold rewards (and PPO's rollout rewards) from a trainer's metrics.jsonl, which
    holds the whole run even when it was interrupted and resumed; steps are counted in prompts
    trained on, so PPO iterations and RRHF rounds share an axis."""
    rows = []
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if f"eval/{counter}" in record:
            step = int(record[f"eval/{counter}"]) * prompts_per_step
            for metric in ("gold_reward_sampled", "gold_reward_greedy"):
                rows.append(_row(name, metric, record[f"eval/{metric}"], step=step))
        if "rollout/gold_reward" in record:
            # iteration i's rollout comes from the policy after i - 1 updates
            step = (int(record["step"]) - 1) * prompts_per_step
            rows.append(_row(name, "rollout_gold_reward", record["rollout/gold_reward"],
                             step=step))
            rows.append(_row(name, "rollout_reward", record["rollout/reward"], step=step))
    return rows


def rrhf(run: Run) -> list[MetricRow]:
    from rlengine.policy.commands import SYNTHETIC_DEFAULTS
    from rlengine.policy.job import evaluate_synthetic
    from rlengine.policy.rrhf import RRHFTrainer
    from rlengine.policy.rrhf_config import RRHFConfig

    s, task = run.settings, run.task
    # the `rlengine rrhf` synthetic setup: two noisy-expert responses per prompt plus the
    # policy's samples as candidates; here ranked by the denoised reward model, not the gold
    queries = task.ranked_examples(s.rrhf_queries, k=2, seed=s.seed + 1)
    config = dataclasses.replace(RRHFConfig(), **{**SYNTHETIC_DEFAULTS, "rounds": s.rrhf_rounds},
                                 seed=s.seed, output_dir=str(run.folder("rrhf") / "denoised_rm"),
                                 progress=run.progress, save_every=0)
    trainer = RRHFTrainer(run.sft_policy(), task.tokenizer, queries, config,
                          reward_model=_reward_model(run, "denoised"),
                          evaluate=functools.partial(evaluate_synthetic, task,
                                                     run.heldout_prompts(), seed=s.seed),
                          log=lambda *_: None)
    trainer.train()
    return _trainer_rows("rrhf_denoised_rm", Path(config.output_dir), "round", len(queries))


PPO_RUNS = {
    # name: (what rewards the policy, the reward model it reads)
    "ppo_gold": ("the task's gold reward (a ceiling, no reward model)", None),
    "ppo_bandit": ("bandit: the plain reward model's score at EOS", "plain"),
    "ppo_segment": ("segment-dense: the segment reward model, normalised, spread per token",
                    "segment"),
}


def ppo(run: Run) -> list[MetricRow]:
    from rlengine.policy.commands import PPO_SYNTHETIC_DEFAULTS
    from rlengine.policy.job import evaluate_synthetic, fit_location_normalizer
    from rlengine.policy.ppo import PPOTrainer
    from rlengine.policy.ppo_config import PPOConfig

    s, task = run.settings, run.task
    prompts = task.prompts(512, seed=TRAIN_PROMPT_SEED)
    gold = functools.partial(_gold, task)
    rows = []
    for name, (what, model_name) in PPO_RUNS.items():
        run.say(f"  {name}: {what}")
        options = {**PPO_SYNTHETIC_DEFAULTS, "iterations": s.ppo_iterations,
                   "prompts_per_iteration": s.ppo_prompts_per_iteration,
                   "mini_batch_size": min(PPO_SYNTHETIC_DEFAULTS["mini_batch_size"],
                                          s.ppo_prompts_per_iteration),
                   "evaluate_every": s.evaluate_every, "value_clip": 0.2}
        kwargs = {}
        if model_name is None:
            kwargs["reward_fn"] = gold
        else:
            kwargs["reward_model"] = _reward_model(run, model_name)
        if name == "ppo_segment":
            # the paper's settings for dense rewards; the location normalizer fitted on the
            # segment rewards of the training pairs' responses
            options.update(reward_kind="segment", segment_threshold=s.segment_threshold,
                           value_clip=0.25)
            pairs = _pairs(run, "train")
            texts = [(p.prompt, side) for p in pairs for side in (p.chosen, p.rejected)]
            normalizer, _, _ = fit_location_normalizer(
                kwargs["reward_model"], run.sft_policy(), task.tokenizer, texts,
                threshold=s.segment_threshold, log=lambda *_: None)
            kwargs["normalizer"] = normalizer.parameters
            rows += [_row(name, f"normalizer_{key}", value)
                     for key, value in zip(("a_mu", "b_mu", "a_sigma", "b_sigma"),
                                           normalizer.parameters)]
        config = dataclasses.replace(PPOConfig(), seed=s.seed, progress=run.progress,
                                     output_dir=str(run.folder("ppo") / name), save_every=10,
                                     **options)
        trainer = PPOTrainer(run.sft_policy(), task.tokenizer, prompts, config, gold_fn=gold,
                             evaluate=functools.partial(evaluate_synthetic, task,
                                                        run.heldout_prompts(), seed=s.seed),
                             log=lambda *_: None, **kwargs)
        trainer.train()
        rows += _trainer_rows(name, Path(config.output_dir), "iteration",
                              s.ppo_prompts_per_iteration)
    return rows


# ---- the pipeline ---------------------------------------------------------------------------

def all_stages() -> list[Stage]:
    from rlengine.quickstart import report

    return [
        Stage("kernels", "the fused ops against their eager equivalents, timed live", kernels,
              settings=("seed", "kernel_batch", "kernel_seq_len", "kernel_vocab",
                        "kernel_repeats")),
        Stage("sft", "SFT of the tiny policy on the synthetic task", sft,
              settings=("task_seed", "seed", "sft_steps", "heldout_prompts")),
        Stage("samples", "candidate responses sampled from the SFT policy, labelled by the "
                         "noisy annotator", samples, needs=("sft",),
              settings=("train_prompts", "validation_prompts", "samples_per_prompt",
                        "flip_fraction")),
        Stage("strength", "preference strength by a voting ensemble", strength,
              needs=("sft", "samples"),
              settings=("seed", "voters", "voter_steps", "rm_lr", "rm_batch_size")),
        Stage("reward", "reward models: plain, strength-denoised, segment-level", reward,
              needs=("sft", "samples", "strength"),
              settings=("seed", "rm_steps", "rm_lr", "rm_batch_size", "label_smoothing",
                        "flip_lowest", "segment_threshold")),
        Stage("active", "active selection of comparisons: D-optimal against random", active,
              needs=("sft",),
              settings=("seed", "active_prompts", "active_responses_per_prompt",
                        "active_strategies", "active_seeds", "active_rounds",
                        "active_initial_labels", "active_labels_per_round", "active_hidden",
                        "active_fit_steps")),
        Stage("rrhf", "RRHF from the SFT policy with the denoised reward model", rrhf,
              needs=("sft", "reward"), settings=("seed", "rrhf_rounds", "rrhf_queries",
                                                 "heldout_prompts")),
        Stage("ppo", "PPO from the SFT policy: gold reward, bandit, segment-dense", ppo,
              needs=("sft", "samples", "reward"),
              settings=("seed", "ppo_iterations", "ppo_prompts_per_iteration",
                        "evaluate_every", "segment_threshold", "heldout_prompts")),
        Stage("report", "report.md, plots and metrics.jsonl", report.write_report,
              always=True),
    ]


def model_folders(out: Path) -> dict[str, Path]:
    """The trained models a full run leaves, by name."""
    return {"sft policy": out / "sft" / "model",
            **{f"reward model: {name}": out / "reward" / name / "model"
               for name in REWARD_METHODS},
            "rrhf policy": out / "rrhf" / "denoised_rm" / "model",
            **{f"{name} policy": out / "ppo" / name / "model" for name in PPO_RUNS}}
