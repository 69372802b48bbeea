"""The policy-optimization claims of issue 6, reproduced in miniature on the built-in synthetic
task: ``python -m rlengine.policy.acceptance [--seeds 3] [--out bench/results]``.

Task seed 0, its SFT policy (the start of every run) and 200 held-out prompts; per seed s
(the trainers' seed, the reward models' data and head seeds):

(a) PPO with the gold reward (the `rlengine ppo` synthetic defaults: 30 iterations of 32
    prompts x 4 samples) and RRHF (the `rlengine rrhf` synthetic defaults: 4 rounds) each
    from the SFT policy: held-out gold reward before and after, greedy and sampled.
(b) Two reward models trained by RewardTrainer on the same 2000 noisy synthetic preference
    pairs (seed s): bandit (score_mode last) and segment (score_mode segment, the SFT policy
    as entropy model, threshold 1.75); the segment model's location normalizer fitted on
    1000 more pairs. PPO with each (bandit: value clip 0.2; segment: dense rewards, value clip
    0.25, as the paper), same settings otherwise: the gold reward of each iteration's rollout
    (128 samples) and the held-out gold reward every 5 iterations; the first iteration at
    which segment's 3-iteration running mean of rollout gold reaches bandit's final one (the
    mean of its last 3 iterations).
(c) RRHF with and without the ranking term (rank_weight 0: SFT on the best candidate alone).

Writes ``policy-acceptance-<date>.json`` (every number) and ``.md`` (tables) to ``--out``.
About 5 minutes on one CPU thread for 3 seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rlengine.machine import describe_cpu
from rlengine.policy.commands import PPO_SYNTHETIC_DEFAULTS, SYNTHETIC_DEFAULTS
from rlengine.policy.job import (
    RRHFJobConfig,
    build_rrhf_job,
    evaluate_synthetic,
    fit_location_normalizer,
    synthetic_task,
    train_synthetic_reward_model,
)
from rlengine.policy.ppo import PPOTrainer
from rlengine.policy.ppo_config import PPOConfig
from rlengine.policy.rrhf import RRHFTrainer
from rlengine.policy.rrhf_config import RRHFConfig

TASK_SEED = 0
TRAIN_PROMPTS, HELDOUT_PROMPTS = 512, 200
RM_PAIRS, RM_STEPS, NORMALIZER_PAIRS = 2000, 600, 1000
SEGMENT_THRESHOLD = 1.75
EVALUATE_EVERY = 5
SMOOTHING = 3  # iterations in the running means of rollout gold reward


def _quiet(*_: object) -> None:
    pass


def _evaluations(result) -> list[dict[str, float]]:
    return [{k.removeprefix("eval/"): v for k, v in e.items() if k != "step"}
            for e in result.evaluations]


def run_ppo(task, policy, prompts, heldout, seed: int, *, iterations: int, log,
            **trainer_kwargs) -> dict:
    options = {**PPO_SYNTHETIC_DEFAULTS, "iterations": iterations,
               "evaluate_every": EVALUATE_EVERY}
    value_clip = trainer_kwargs.pop("value_clip", 0.2)
    config = dataclasses.replace(PPOConfig(progress=False), seed=seed, value_clip=value_clip,
                                 **options, **trainer_kwargs.pop("config", {}))
    gold = functools.partial(_gold, task)
    trainer = PPOTrainer(policy, task.tokenizer, prompts, config, gold_fn=gold,
                         evaluate=functools.partial(evaluate_synthetic, task, heldout),
                         log=_quiet, **trainer_kwargs)
    began = time.perf_counter()
    result = trainer.train()
    rollouts = [r for r in result.history if "rollout/gold_reward" in r]
    out = {"evaluations": _evaluations(result),
           "rollout_gold": [r["rollout/gold_reward"] for r in rollouts],
           "rollout_reward": [r["rollout/reward"] for r in rollouts],
           "kl": [r["rollout/kl"] for r in rollouts],
           "seconds": time.perf_counter() - began}
    log(f"    {out['seconds']:.0f} s; held-out sampled gold "
        f"{out['evaluations'][0]['gold_reward_sampled']:.3f} -> "
        f"{out['evaluations'][-1]['gold_reward_sampled']:.3f}")
    return out


def _gold(task, prompt: str, response: str, terminated: bool) -> float:
    return task.gold_reward(prompt, response, terminated=terminated)


def run_rrhf(seed: int, *, rank_weight: float, log) -> dict:
    config = dataclasses.replace(RRHFConfig(progress=False), seed=seed, rank_weight=rank_weight,
                                 **SYNTHETIC_DEFAULTS)
    job = build_rrhf_job(RRHFJobConfig(synthetic_task_seed=TASK_SEED), log=_quiet,
                         policy_samples=config.policy_samples)
    trainer = RRHFTrainer(job.policy, job.tokenizer, job.queries, config, log=_quiet,
                          **job.trainer_kwargs)
    began = time.perf_counter()
    result = trainer.train()
    out = {"evaluations": _evaluations(result), "seconds": time.perf_counter() - began}
    log(f"    {out['seconds']:.0f} s; held-out sampled gold "
        f"{out['evaluations'][0]['gold_reward_sampled']:.3f} -> "
        f"{out['evaluations'][-1]['gold_reward_sampled']:.3f}")
    return out


def running_mean(values: Sequence[float], window: int = SMOOTHING) -> list[float]:
    return [statistics.mean(values[max(0, i + 1 - window):i + 1]) for i in range(len(values))]


def first_reaching(curve: Sequence[float], target: float) -> int | None:
    """The first iteration (1-based) whose running mean reaches ``target``, or None."""
    for i, value in enumerate(running_mean(curve)):
        if value >= target:
            return i + 1
    return None


def run_seed(task, policy, seed: int, *, iterations: int, log: Callable[[str], None]) -> dict:
    prompts = task.prompts(TRAIN_PROMPTS, seed=1)
    heldout = task.prompts(HELDOUT_PROMPTS, seed=900)
    out: dict = {}
    log(f"seed {seed}: (a) PPO, gold reward")
    out["ppo_gold"] = run_ppo(task, task.sft_policy(), prompts, heldout, seed,
                              iterations=iterations, reward_fn=functools.partial(_gold, task),
                              log=log)
    log(f"seed {seed}: (a, c) RRHF")
    out["rrhf"] = run_rrhf(seed, rank_weight=1.0, log=log)
    log(f"seed {seed}: (c) RRHF without the ranking term")
    out["rrhf_no_rank"] = run_rrhf(seed, rank_weight=0.0, log=log)

    log(f"seed {seed}: (b) reward models on {RM_PAIRS} pairs")
    began = time.perf_counter()
    models = {kind: train_synthetic_reward_model(
        task, policy, reward_kind=kind, pairs=RM_PAIRS, steps=RM_STEPS, seed=seed,
        segment_threshold=SEGMENT_THRESHOLD, log=_quiet) for kind in ("bandit", "segment")}
    pairs = task.preference_pairs(NORMALIZER_PAIRS, seed=seed + 300)
    texts = [(p.prompt, side) for p in pairs for side in (p.chosen, p.rejected)]
    normalizer, _, _ = fit_location_normalizer(models["segment"], policy, task.tokenizer, texts,
                                               threshold=SEGMENT_THRESHOLD, log=_quiet)
    out["normalizer"] = dataclasses.asdict(normalizer)
    out["reward_models_seconds"] = time.perf_counter() - began
    clean = task.clean_pairs(1000, seed=100 + seed)
    out["rm_accuracy"] = {kind: _accuracy(task, model, policy, clean, kind)
                          for kind, model in models.items()}
    log(f"    {out['reward_models_seconds']:.0f} s; clean-pair accuracy "
        + ", ".join(f"{k} {v:.3f}" for k, v in out["rm_accuracy"].items()))
    log(f"seed {seed}: (b) PPO, bandit rewards of the bandit reward model")
    out["ppo_bandit"] = run_ppo(task, task.sft_policy(), prompts, heldout, seed,
                                iterations=iterations, reward_model=models["bandit"],
                                value_clip=0.2, log=log)
    log(f"seed {seed}: (b) PPO, segment-dense rewards of the segment reward model")
    out["ppo_segment"] = run_ppo(task, task.sft_policy(), prompts, heldout, seed,
                                 iterations=iterations, reward_model=models["segment"],
                                 normalizer=normalizer.parameters, value_clip=0.25,
                                 config={"reward_kind": "segment",
                                         "segment_threshold": SEGMENT_THRESHOLD}, log=log)
    bandit_final = statistics.mean(out["ppo_bandit"]["rollout_gold"][-SMOOTHING:])
    out["bandit_final_rollout_gold"] = bandit_final
    out["segment_reaches_bandit_final_at"] = first_reaching(out["ppo_segment"]["rollout_gold"],
                                                            bandit_final)
    out["bandit_reaches_own_final_at"] = first_reaching(out["ppo_bandit"]["rollout_gold"],
                                                        bandit_final)
    return out


@torch.no_grad()
def _accuracy(task, model, policy, pairs, kind: str) -> float:
    """Share of clean pairs the reward model orders as the gold reward does, by the score it
    was trained on (bandit: value at EOS; segment: mean of segment-end values)."""
    from rlengine.reward.config import RewardTrainerConfig
    from rlengine.reward.trainer import RewardTrainer

    mode = "last" if kind == "bandit" else "segment"
    config = RewardTrainerConfig(score_mode=mode, segment_threshold=SEGMENT_THRESHOLD,
                                 batch_size=32, progress=False, save_model=False)
    trainer = RewardTrainer(model, task.tokenizer, pairs, config, eval_sets={"clean": pairs},
                            entropy_model=policy if mode == "segment" else None, log=_quiet)
    return trainer.evaluate()["clean"]["accuracy"]


def _summary(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: Sequence[float]) -> str:
    mean, std = _summary(values)
    return f"{mean:.3f} ± {std:.3f}"


def markdown(runs: list[dict], meta: dict) -> str:
    seeds = len(runs)
    lines = [f"# Policy acceptance on the synthetic task ({seeds} seeds)", "",
             f"{meta['date']}; {meta['machine']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}, Python {meta['python']}; {meta['threads']} thread(s); "
             f"total {meta['seconds'] / 60:.1f} min. `python -m rlengine.policy.acceptance` "
             f"(module docstring: the setup). Mean ± sample std over seeds "
             f"{', '.join(str(s) for s in meta['seeds'])}; held-out gold reward on "
             f"{HELDOUT_PROMPTS} prompts (maximum per prompt: n_symbols + 1, 4 to 9).", "",
             "## (a) PPO and RRHF raise the SFT policy's gold reward", "",
             "| run | greedy before | greedy after | sampled before | sampled after | "
             "s/run |", "|---|---|---|---|---|---|"]
    names = {"ppo_gold": f"PPO, gold reward ({meta['iterations']} iterations)",
             "ppo_bandit": "PPO, bandit reward model",
             "ppo_segment": "PPO, segment-dense reward model",
             "rrhf": "RRHF (rank_weight 1)", "rrhf_no_rank": "RRHF without ranking term "
                                                          "(rank_weight 0)"}
    for key, name in names.items():
        before = [r[key]["evaluations"][0] for r in runs]
        after = [r[key]["evaluations"][-1] for r in runs]
        lines.append(f"| {name} | {_pm(b['gold_reward_greedy'] for b in before)} | "
                     f"{_pm(a['gold_reward_greedy'] for a in after)} | "
                     f"{_pm(b['gold_reward_sampled'] for b in before)} | "
                     f"{_pm(a['gold_reward_sampled'] for a in after)} | "
                     f"{statistics.mean(r[key]['seconds'] for r in runs):.0f} |")
    lines += ["", "## (b) segment-dense vs bandit PPO", "",
              "Reward models (RewardTrainer, 2000 noisy pairs, 600 steps) on 1000 clean pairs: "
              f"bandit accuracy {_pm(r['rm_accuracy']['bandit'] for r in runs)}, segment "
              f"{_pm(r['rm_accuracy']['segment'] for r in runs)}.", "",
              "Gold reward of each iteration's rollout (128 samples), mean over seeds:", "",
              "| iteration | " + " | ".join(str(i) for i in range(1, len(
                  runs[0]["ppo_bandit"]["rollout_gold"]) + 1)) + " |",
              "|---|" + "---|" * len(runs[0]["ppo_bandit"]["rollout_gold"])]
    for key in ("ppo_bandit", "ppo_segment", "ppo_gold"):
        curves = list(zip(*[r[key]["rollout_gold"] for r in runs]))
        lines.append(f"| {names[key]} | "
                     + " | ".join(f"{statistics.mean(c):.2f}" for c in curves) + " |")
    lines += ["", "Held-out sampled gold reward every 5 iterations:", "",
              "| iteration | " + " | ".join(str(int(e["iteration"])) for e in
                                            runs[0]["ppo_bandit"]["evaluations"]) + " |",
              "|---|" + "---|" * len(runs[0]["ppo_bandit"]["evaluations"])]
    for key in ("ppo_bandit", "ppo_segment"):
        curves = list(zip(*[[e["gold_reward_sampled"] for e in r[key]["evaluations"]]
                            for r in runs]))
        lines.append(f"| {names[key]} | "
                     + " | ".join(f"{statistics.mean(c):.3f}" for c in curves) + " |")
    lines += ["", "| seed | bandit final rollout gold (mean of last 3) | iteration segment's "
              "3-iteration mean first reaches it | iteration bandit's own first reaches it |",
              "|---|---|---|---|"]
    for seed, r in zip(meta["seeds"], runs):
        lines.append(f"| {seed} | {r['bandit_final_rollout_gold']:.3f} | "
                     f"{r['segment_reaches_bandit_final_at'] or 'never'} | "
                     f"{r['bandit_reaches_own_final_at'] or 'never'} |")
    lines += ["", "## (c) RRHF with and without the ranking term", "",
              "See the RRHF rows of (a): rank_weight 1 vs 0, same candidates' sources and "
              "rounds.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=PPO_SYNTHETIC_DEFAULTS["iterations"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results",
                        help="folder of policy-acceptance-<date>.{json,md}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    began = time.perf_counter()
    task = synthetic_task(TASK_SEED)
    policy = task.sft_policy()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    runs = [run_seed(task, policy, seed, iterations=args.iterations, log=print)
            for seed in seeds]
    date = datetime.date.today().isoformat()
    meta = {"date": date, "machine": f"{describe_cpu()} (shared)", "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": args.threads, "seeds": seeds, "iterations": args.iterations,
            "seconds": time.perf_counter() - began}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"policy-acceptance-{date}.json").write_text(
        json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    text = markdown(runs, meta)
    (out / f"policy-acceptance-{date}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
