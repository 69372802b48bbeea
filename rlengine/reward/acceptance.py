"""The reward-modeling claims of Secrets of RLHF II and of segment-level rewards, reproduced in
miniature on the built-in synthetic task with the engine's RewardTrainer:
``python -m rlengine.reward.acceptance [--seeds 3] [--parts strength,denoise,segment]``.

Per seed s (task seed 0; data, voters and training seeded by s):
- strength: 20%-flipped annotator labels on 2000 pairs; M voters (RewardTrainer, seeds differ)
  give mu; ROC AUC of -mu for the flipped pairs; share of mu < 0; a model trained on the lowest
  mu decile alone, scored on gold-labelled validation pairs.
- denoise: plain BT, soft label (mu < 0) + adaptive margin mu, and flip lowest 10% + soft label
  + margin, held-out accuracy against gold labels.
- segment: BT on segment scores (entropy segmentation by the SFT policy), token-mean scores and
  the bandit readout at EOS, each before and after training on the same noisy labels.
Prints a table and, with --json, writes every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from rlengine.data.types import PreferencePair
from rlengine.reward.config import RewardTrainerConfig
from rlengine.reward.job import seeded_reward_model
from rlengine.reward.model import RewardModel
from rlengine.reward.strength import roc_auc, vote
from rlengine.reward.trainer import RewardTrainer
from rlengine.synthetic import SyntheticTask
from rlengine.synthetic.task import TaskConfig

# The tiny task's settings (2000 pairs, batch 32): 600 steps is about 10 epochs, long enough for
# the flipped labels to hurt plain BT; voters train shorter, as the paper's do (one epoch).
BASE = RewardTrainerConfig(lr=2e-3, batch_size=32, steps=600, schedule="constant",
                           adam_beta2=0.999, max_grad_norm=None, progress=False, log_every=0,
                           save_model=False)


def run_seed(task: SyntheticTask, policy, seed: int, *, parts: Sequence[str], pairs: int,
             voters: int, voter_steps: int, validation: int, smoothing: float,
             log: Callable[[str], None], steps: int = BASE.steps) -> dict[str, float]:
    out: dict[str, float] = {}
    noisy = task.preference_pairs(pairs, flip_fraction=0.2, seed=1 + seed)
    clean_val = task.clean_pairs(validation, seed=100 + seed)
    flipped = torch.tensor([p.extra["flipped"] for p in noisy])

    def make_model(m: int = 0) -> RewardModel:
        return seeded_reward_model(task.make_reward_backbone(from_policy=policy), 97 * seed + m)

    def trainer_for(train_pairs: Sequence[PreferencePair], **options) -> RewardTrainer:
        config = dataclasses.replace(BASE, seed=seed, **{"steps": steps, **options})
        kwargs = {"entropy_model": policy} if config.score_mode == "segment" else {}
        return RewardTrainer(make_model(), task.tokenizer, train_pairs, config,
                             eval_sets={"clean": clean_val}, log=lambda *_: None, **kwargs)

    def train(train_pairs: Sequence[PreferencePair], **options) -> float:
        return trainer_for(train_pairs, **options).train().metrics["clean"]["accuracy"]

    def untrained(**options) -> float:
        # The same model before its first step: what "training improves accuracy" is against.
        return trainer_for(noisy, **options).evaluate()["clean"]["accuracy"]

    def note(key: str, value: float) -> None:
        out[key] = value
        log(f"  seed {seed} {key}: {value:.4f}")

    annotated = None
    if "strength" in parts or "denoise" in parts:
        began = time.perf_counter()
        voter_config = dataclasses.replace(BASE, seed=1000 * (seed + 1), steps=voter_steps)
        result = vote(make_model, task.tokenizer, noisy, voter_config, voters=voters,
                      log=lambda *_: None)
        annotated = result.annotate(noisy)
        mu = result.mu
        note("strength_auc", roc_auc(-mu, flipped))
        note("strength_negative_share", float((mu < 0).double().mean()))
        lowest = mu.argsort()[:len(noisy) // 10].sort().values.tolist()
        note("lowest_decile_flipped_share", float(flipped[lowest].double().mean()))
        note("strength_seconds", time.perf_counter() - began)
        if "strength" in parts:
            note("lowest_decile_rm", train([noisy[i] for i in lowest], steps=max(1, steps // 10),
                                           batch_size=min(BASE.batch_size, len(lowest))))
    if "denoise" in parts:
        note("plain_bt", train(noisy))
        note("soft_margin", train(annotated, margin="strength", label_smoothing=smoothing,
                                  smoothing_on="negative_strength"))
        note("flip_soft_margin", train(annotated, margin="strength", label_smoothing=smoothing,
                                       smoothing_on="negative_strength", flip_lowest=0.1))
    if "segment" in parts:
        for mode, key in (("last", "bandit_rm"), ("segment", "segment_rm"),
                          ("token_mean", "token_rm")):
            note(f"{key}_untrained", untrained(score_mode=mode))
            note(key, train(noisy, score_mode=mode))
    return out


def summarize(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: (statistics.mean(r[k] for r in runs),
                statistics.pstdev(r[k] for r in runs) if len(runs) > 1 else 0.0) for k in keys}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--parts", default="strength,denoise,segment")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--voters", type=int, default=5)
    parser.add_argument("--steps", type=int, default=BASE.steps)
    parser.add_argument("--voter-steps", type=int, default=150)
    parser.add_argument("--validation", type=int, default=2000)
    parser.add_argument("--smoothing", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--task", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TaskConfig field of the synthetic task (repeatable)")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    overrides = {}
    for item in args.task:
        key, _, value = item.partition("=")
        overrides[key] = type(getattr(TaskConfig(), key))(value)
    task = SyntheticTask(0, **overrides)
    policy = task.sft_policy()
    runs = []
    began = time.perf_counter()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        runs.append(run_seed(task, policy, seed, parts=parts, pairs=args.pairs,
                             voters=args.voters, voter_steps=args.voter_steps,
                             validation=args.validation, smoothing=args.smoothing, log=print,
                             steps=args.steps))
    summary = summarize(runs)
    print(f"\n{len(runs)} seeds, {time.perf_counter() - began:.0f} s")
    for key, (mean, std) in summary.items():
        print(f"{key:30s} {mean:.4f} +- {std:.4f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"runs": runs, "summary": summary, "args": vars(args),
                       "torch": torch.__version__}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
