"""What the quickstart runs: the sizes of every stage, in two presets.

The default preset reproduces the earlier measurements' setups at one seed (the reward-model,
active-selection and policy acceptance runs under bench/results/), sized to finish in under ten
minutes on two CPU cores; ``fast`` is a smoke test of the same stages in under two minutes,
too small for its numbers to mean much.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class QuickstartSettings:
    task_seed: int = 0
    seed: int = 0
    # kernels: the live speedup of every fused op (rlengine.kernel_demo)
    kernel_batch: int = 8
    kernel_seq_len: int = 256
    kernel_vocab: int = 32000
    kernel_repeats: int = 5
    # sft: the task's SFT policy (SyntheticTask.sft_policy)
    sft_steps: int = 700
    heldout_prompts: int = 200
    # samples: candidate responses sampled from the SFT policy, paired within each prompt and
    # labelled by the simulated annotator with this share of flipped labels
    train_prompts: int = 700
    validation_prompts: int = 300
    samples_per_prompt: int = 4
    flip_fraction: float = 0.2
    # strength: an ensemble of voters (Secrets of RLHF II)
    voters: int = 5
    voter_steps: int = 150
    # reward: plain BT, strength-denoised, segment-level (the reward acceptance's settings)
    rm_steps: int = 600
    rm_batch_size: int = 32
    rm_lr: float = 2e-3
    label_smoothing: float = 0.2
    flip_lowest: float = 0.1
    segment_threshold: float = 1.75
    # active: D-optimal against random selection (rlengine.reward.active)
    active_prompts: int = 400
    active_responses_per_prompt: int = 8
    active_strategies: tuple[str, ...] = ("random", "dopt", "past_dopt")
    active_seeds: int = 2
    active_rounds: int = 6
    active_initial_labels: int = 50
    active_labels_per_round: int = 50
    active_hidden: tuple[int, ...] = (256, 256, 256)
    active_fit_steps: int = 500
    # rrhf and ppo: from the SFT policy, evaluated by the task's gold reward
    rrhf_rounds: int = 4
    rrhf_queries: int = 256
    ppo_iterations: int = 30
    ppo_prompts_per_iteration: int = 32
    evaluate_every: int = 5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


DEFAULT = QuickstartSettings()

FAST = replace(
    DEFAULT, kernel_batch=4, kernel_seq_len=128, kernel_repeats=3, sft_steps=300,
    heldout_prompts=48, train_prompts=120, validation_prompts=60, voters=3, voter_steps=30,
    rm_steps=60, active_prompts=80, active_strategies=("random", "dopt"), active_seeds=1,
    active_rounds=2, active_initial_labels=20, active_labels_per_round=20, active_hidden=(64,),
    active_fit_steps=100, rrhf_rounds=1, rrhf_queries=32, ppo_iterations=3,
    ppo_prompts_per_iteration=16, evaluate_every=1)
