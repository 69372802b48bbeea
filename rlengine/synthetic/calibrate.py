"""Measure how hard the synthetic task is for the tiny models: the numbers the task's defaults
were tuned on. ``python -m rlengine.synthetic.calibrate [--task-seed 0] [--seeds 3]``.

It trains only the probe reward model of rlengine.synthetic.training (plain BT, optional
per-pair margin and label smoothing), not the engine's reward trainers: it shows that the
task leaves room for each method, not that a method works.

Steps (all on 2 CPU cores, one thread):
1. SFT a policy on noisy-expert demonstrations; gold reward of its greedy answers before/after.
2. Reward models on clean and on 20%-flipped labels (random-init and SFT-init backbones):
   held-out accuracy against the gold preference.
3. Preference strength: M voters on the flipped data; ROC AUC of -mu for the flipped pairs;
   share of pairs with mu < 0; accuracy of a model trained on the lowest-mu decile alone.
4. Denoising: plain BT against soft label (on mu < 0) + adaptive margin mu, with and without
   flipping the lowest-mu decile, over several seeds.
5. Token level: a reward model scoring the mean of per-token values (clean labels) against the
   EOS readout; ROC AUC of its per-token values for separating correct answer words from
   injected errors (is the token-local part of the gold reward localised?).

Measured with the defaults (2000 pairs, 600 steps = ~10 epochs, 5 voters x 150 steps, 2000
clean validation pairs), task seeds 0 / 1, about 7 minutes each on 2 shared cores:

    SFT (700 steps, ~9 s): greedy gold reward       -2.7 -> 4.2 / -8.2 -> 5.8 (max 6.5)
    RM, random init, clean labels, 400 steps (8 s)  0.799 / 0.775
    RM, SFT init, clean labels                      0.860 / 0.820
    RM, SFT init, 20% flipped labels                0.762 / 0.762
    ROC AUC of -mu for flipped pairs                0.899 / 0.910
    share of pairs with mu < 0                      0.262 / 0.290
    lowest-mu decile: flipped share, RM alone       0.870, 0.207 / 0.845, 0.227
    plain BT (3 seeds)                              0.736 / 0.749
    soft label (mu < 0) + margin mu                 0.777 / 0.784
    flip lowest decile + soft label + margin        0.800 / 0.792
    clean labels (the ceiling)                      0.840 / 0.804
    readout at EOS vs mean of token values          0.842 vs 0.832 / 0.818 vs 0.822
    token values: correct words above errors (AUC)  0.726 / 0.719

With 1000 pairs and 300 steps the flips hurt more (plain BT 0.704 / 0.715 against 0.825 /
0.799 clean; soft + margin 0.759 / 0.763) but the 5 voters separate the flips less well (ROC
AUC 0.870 / 0.906).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from rlengine.data.types import PreferencePair
from rlengine.reward.strength import roc_auc
from rlengine.synthetic.task import SyntheticTask, pair_accuracy
from rlengine.synthetic.training import (
    batch_scored,
    encode_scored,
    score_pairs,
    train_probe_reward_model,
)


def swap_labels(pairs: Sequence[PreferencePair], which: set[int]) -> list[PreferencePair]:
    """The pairs with chosen and rejected exchanged at the given indices."""
    return [PreferencePair(p.prompt, p.rejected, p.chosen, p.margin, p.source, dict(p.extra))
            if i in which else p for i, p in enumerate(pairs)]


def calibrate(task: SyntheticTask | None = None, *, n_pairs: int = 2000,
              flip_fraction: float = 0.2, voters: int = 5, voter_steps: int = 150,
              steps: int = 600, seeds: int = 3, n_validation: int = 2000, lr: float = 2e-3,
              smoothing: float = 0.2, log: Callable[[str], None] = print) -> dict[str, float]:
    task = task or SyntheticTask()
    results: dict[str, float] = {}

    def note(key: str, value: float, text: str) -> None:
        results[key] = value
        log(f"{text}: {value:.3f}")

    eval_prompts = task.prompts(300, seed=1000)
    note("policy_random_gold", task.evaluate_policy(task.make_policy(), eval_prompts,
                                                    greedy=True)["mean_gold_reward"],
         "random policy, greedy mean gold reward")
    began = time.perf_counter()
    policy = task.sft_policy()
    note("sft_seconds", time.perf_counter() - began, "SFT seconds")
    sft_eval = task.evaluate_policy(policy, eval_prompts, greedy=True)
    note("policy_sft_gold", sft_eval["mean_gold_reward"], "SFT policy, greedy mean gold reward")
    note("policy_sft_perfect", sft_eval["perfect"], "SFT policy, share of perfect answers")
    note("max_gold", sum(map(task.max_gold_reward, eval_prompts)) / len(eval_prompts),
         "mean maximum gold reward")

    validation = task.clean_pairs(n_validation, seed=100)

    def accuracy(model) -> float:
        chosen, rejected = score_pairs(model, task.tokenizer, validation)
        return pair_accuracy(chosen, rejected, validation)

    def train(pairs, seed, *, backbone=None, n_steps=steps, **options):
        backbone = backbone or task.make_reward_backbone(from_policy=policy)
        return train_probe_reward_model(backbone, task.tokenizer, pairs, steps=n_steps, lr=lr,
                                        seed=seed, **options)

    clean = task.preference_pairs(n_pairs, flip_fraction=0.0, seed=1)
    noisy = task.preference_pairs(n_pairs, flip_fraction=flip_fraction, seed=1)
    result = train(clean, 0, backbone=task.make_reward_backbone(0), n_steps=400)
    note("rm_random_init_clean", accuracy(result.model),
         f"RM, random init, clean labels, 400 steps ({result.seconds:.0f} s)")
    result = train(clean, 0)
    note("rm_clean", accuracy(result.model),
         f"RM, SFT init, clean labels, {steps} steps ({result.seconds:.0f} s)")
    result = train(noisy, 0)
    note("rm_noisy", accuracy(result.model),
         f"RM, SFT init, {flip_fraction:.0%} flipped labels, {steps} steps")

    differences = []
    for m in range(voters):
        result = train(noisy, 100 + m, n_steps=voter_steps)
        chosen, rejected = score_pairs(result.model, task.tokenizer, noisy)
        differences.append(chosen - rejected)
    mu = torch.stack(differences).mean(0)
    flipped = torch.tensor([p.extra["flipped"] for p in noisy])
    note("strength_auc", roc_auc(-mu, flipped),
         f"ROC AUC of -mu for flipped pairs ({voters} voters x {voter_steps} steps)")
    note("strength_negative_share", float((mu < 0).double().mean()), "share of pairs with mu < 0")
    order = mu.argsort().tolist()
    lowest = set(order[:n_pairs // 10])
    note("lowest_decile_flipped", sum(noisy[i].extra["flipped"] for i in lowest) / len(lowest),
         "share of flipped pairs in the lowest-mu decile")
    result = train([noisy[i] for i in sorted(lowest)], 7, n_steps=60)
    note("lowest_decile_rm", accuracy(result.model), "RM trained on the lowest-mu decile alone")

    mu_list = mu.tolist()
    mu_after_flip = [-x if i in lowest else x for i, x in enumerate(mu_list)]
    recipes = {
        "plain_bt": (noisy, {}),
        "soft_margin": (noisy, {"margins": mu_list, "label_smoothing":
                                [smoothing if x < 0 else 0.0 for x in mu_list]}),
        "flip_soft_margin": (swap_labels(noisy, lowest), {
            "margins": mu_after_flip,
            "label_smoothing": [smoothing if x < 0 else 0.0 for x in mu_after_flip]}),
        "clean_labels": (clean, {}),
    }
    for name, (pairs, options) in recipes.items():
        scores = [accuracy(train(pairs, 200 + s, **options).model) for s in range(seeds)]
        note(f"denoise_{name}", sum(scores) / seeds,
             f"{name}, mean of {seeds} seeds ({', '.join(f'{x:.3f}' for x in scores)})")

    for readout in ("last", "token_mean"):
        scores = []
        for s in range(seeds):
            result = train(clean, 300 + s, readout=readout)
            scores.append(accuracy(result.model))
        note(f"readout_{readout}", sum(scores) / seeds,
             f"RM readout {readout}, clean labels, mean of {seeds} seeds")
    note("token_error_auc", localisation_auc(task, result.model),
         "ROC AUC of token values: correct answer words above injected errors")
    return results


@torch.no_grad()
def localisation_auc(task: SyntheticTask, model, n: int = 500, error_rate: float = 0.3) -> float:
    """How well a token-level reward model's per-token values separate the correct words of
    noisy-expert answers from the wrong ones (fillers and wrong symbols), as ROC AUC."""
    rng = task._rng("localisation", 0)
    rows, labels = [], []
    for prompt in task.prompts(n, seed=2000):
        response, errors = task.expert_response(prompt, error_rate, rng)
        rows.append(encode_scored(task.tokenizer, prompt, response))
        wrong = {position for position, kind in errors if kind in ("filler", "symbol")}
        target = task.target(prompt).split()
        labels.append([position not in wrong and position < len(target)
                       for position in range(len(response.split()))])
    model.eval()
    ids, mask, response_mask = batch_scored(rows, task.tokenizer.pad_token_id)
    values = model.token_values(ids, mask)
    scores, correct = [], []
    for row, (_, start), row_labels in zip(values, rows, labels):
        scores.append(row[start:start + len(row_labels)])
        correct += row_labels
    return roc_auc(torch.cat(scores), torch.tensor(correct, dtype=torch.bool))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--voters", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--voter-steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibrate(SyntheticTask(args.task_seed), n_pairs=args.pairs, steps=args.steps,
              voter_steps=args.voter_steps, seeds=args.seeds, voters=args.voters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
