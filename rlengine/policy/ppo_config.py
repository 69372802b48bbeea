"""Every option of the PPO trainer, with its default and the reason for it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rlengine.configs import option
from rlengine.policy.rewards import KLEstimator, RewardKind, Spread
from rlengine.training.schedules import Schedule


@dataclass
class PPOConfig:
    # ---- run ----------------------------------------------------------------------------------
    output_dir: str | None = option(None, "where checkpoints, metrics.jsonl, TensorBoard logs, "
                                          "the final policy and critic go (none: keep nothing "
                                          "on disk)")
    seed: int = option(0, "seed of sampling, the prompt and mini-batch orders and dropout")
    resume: bool = option(True, "continue from the newest checkpoint in output_dir if there is "
                                "one; false starts over and deletes them")
    # ---- iterations ---------------------------------------------------------------------------
    iterations: int = option(20, "PPO iterations: each samples a rollout batch with the current "
                                 "policy, then trains on it for ppo_epochs")
    prompts_per_iteration: int = option(64, "prompts sampled per iteration, over all processes")
    samples_per_prompt: int = option(1, "responses sampled per prompt")
    ppo_epochs: int = option(2, "passes over each rollout batch")
    mini_batch_size: int = option(32, "responses per optimizer step, over all processes and "
                                      "accumulation steps (must divide the rollout batch)")
    grad_accum: int = option(1, "micro-batches per optimizer step (mini_batch_size must divide "
                                "into grad_accum x world size equal parts)")
    # ---- optimization -------------------------------------------------------------------------
    actor_lr: float = option(1e-6, "policy AdamW learning rate (7B models: about 1e-6; the tiny "
                                   "synthetic policy wants about 3e-4)")
    critic_lr: float = option(5e-6, "critic AdamW learning rate (usually above the actor's)")
    weight_decay: float = option(0.0, "AdamW weight decay (both models)")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.95, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    actor_schedule: Schedule = option("constant", "actor learning-rate schedule after warm-up")
    critic_schedule: Schedule = option("constant", "critic learning-rate schedule after warm-up")
    actor_warmup_steps: int = option(0, "actor linear warm-up, in optimizer steps")
    critic_warmup_steps: int = option(0, "critic linear warm-up, in optimizer steps")
    min_lr_ratio: float = option(0.0, "floor of cosine and linear, as a fraction of each lr")
    max_grad_norm: float | None = option(1.0, "clip each model's gradient norm to this (none: no "
                                              "clipping)")
    mixed_precision: Literal["auto", "bf16", "no"] = option(
        "auto", "bf16 autocast: auto uses it on CUDA only; log-probs, values and losses stay "
                "fp32")
    # ---- the PPO objective (METHODS.md sections 3 and 5) --------------------------------------
    clip_range: float = option(0.2, "policy ratio clip epsilon of the surrogate")
    value_clip: float | None = option(0.2, "clip each value prediction to old value +- this "
                                           "(the paper: 0.2 bandit, 0.25 segment; none: "
                                           "unclipped value loss)")
    value_loss_weight: float = option(0.5, "the critic minimises this x the squared error (its "
                                           "own optimizer; matters with a shared clip norm "
                                           "only through Adam's epsilon)")
    entropy_coef: float = option(0.0, "entropy bonus weight in the actor loss")
    gamma: float = option(1.0, "GAE discount (the paper: 1)")
    lam: float = option(0.95, "GAE lambda (the paper: 0.95)")
    whiten_advantages: bool = option(True, "whiten advantages over the whole rollout batch")
    # ---- rewards ------------------------------------------------------------------------------
    reward_kind: RewardKind = option(
        "bandit", "with a reward model: bandit (value at the last token), token (value at every "
                  "content token) or segment (entropy segments of the reference policy, "
                  "normalized and spread); a reward function is always bandit")
    segment_threshold: float = option(1.75, "segment: a token ends a segment where the "
                                            "reference policy's next-token entropy exceeds this")
    dense_spread: Spread = option("even", "segment: how a segment's reward reaches its tokens: "
                                          "even (divided by its length), repeat, end")
    dense_clamp: float | None = option(10.0, "token and segment: clamp each token reward to "
                                             "+- this (none: no clamp)")
    kl_beta: float = option(0.01, "KL penalty coefficient beta in R_t = r_t - beta KL_t (the "
                                  "initial value with kl_target)")
    kl_estimator: KLEstimator = option("k1", "per-token KL estimator of the penalty: k1, k2, k3")
    kl_target: float | None = option(None, "adaptive KL controller's target KL per response "
                                           "(none: fixed beta)")
    kl_horizon: int = option(10000, "adaptive KL controller's horizon, in responses")
    whiten_rewards: bool = option(False, "scale the task rewards to unit variance over the "
                                         "batch's response tokens (mean kept)")
    reward_clip: float | None = option(None, "clip each task reward to +- this (none: off)")
    eos_penalty: float = option(0.0, "subtract this at the last token of responses that never "
                                     "produced EOS")
    # ---- sampling -----------------------------------------------------------------------------
    temperature: float = option(1.0, "sampling temperature (the log-probs use the same)")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest token set with this mass")
    top_k: int = option(0, "sample among the k likeliest tokens (0: all)")
    max_new_tokens: int = option(64, "longest response, in tokens (EOS included)")
    max_prompt_length: int | None = option(None, "keep the last this many prompt tokens")
    generation_batch_size: int = option(32, "prompts per generation call; also the unit of work "
                                            "processes share (the rollout does not depend on "
                                            "the number of processes)")
    # ---- evaluation, logging, checkpoints -----------------------------------------------------
    evaluate_every: int = option(5, "evaluate the policy (when the job can: the synthetic "
                                    "task's held-out gold reward) before training, every this "
                                    "many iterations and after the last (0: before and after)")
    log_every: int = option(1, "write metrics every this many iterations")
    save_every: int = option(1, "checkpoint every this many iterations (0: at the end only)")
    keep_checkpoints: int = option(2, "newest checkpoints kept (0: all)")
    save_model: bool = option(True, "write the final policy to output_dir/model and the critic "
                                    "to output_dir/critic")
    tensorboard: bool = option(False, "also write TensorBoard logs (pip install tensorboard)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        positive = {"iterations": self.iterations,
                    "prompts_per_iteration": self.prompts_per_iteration,
                    "samples_per_prompt": self.samples_per_prompt, "ppo_epochs": self.ppo_epochs,
                    "mini_batch_size": self.mini_batch_size, "grad_accum": self.grad_accum,
                    "max_new_tokens": self.max_new_tokens, "kl_horizon": self.kl_horizon,
                    "generation_batch_size": self.generation_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        nonnegative = {"actor_lr": self.actor_lr, "critic_lr": self.critic_lr,
                       "weight_decay": self.weight_decay,
                       "actor_warmup_steps": self.actor_warmup_steps,
                       "critic_warmup_steps": self.critic_warmup_steps,
                       "value_loss_weight": self.value_loss_weight,
                       "entropy_coef": self.entropy_coef, "kl_beta": self.kl_beta,
                       "eos_penalty": self.eos_penalty, "top_k": self.top_k,
                       "evaluate_every": self.evaluate_every, "log_every": self.log_every,
                       "save_every": self.save_every, "keep_checkpoints": self.keep_checkpoints}
        for name, value in nonnegative.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.clip_range < 1:
            raise ValueError(f"clip_range must be in (0, 1), got {self.clip_range}")
        for name in ("value_clip", "reward_clip", "dense_clamp", "max_grad_norm", "kl_target"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or none, got {value}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not math.isfinite(self.segment_threshold):
            raise ValueError(f"segment_threshold must be finite, got {self.segment_threshold}")
        if self.kl_target is not None and self.kl_beta == 0:
            raise ValueError("the adaptive KL controller (kl_target) needs kl_beta > 0 to start "
                             "from")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or none, got "
                             f"{self.max_prompt_length}")
        rows = self.prompts_per_iteration * self.samples_per_prompt
        if rows % self.mini_batch_size:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must divide the rollout "
                             f"batch: prompts_per_iteration x samples_per_prompt = {rows}")

    @property
    def rollout_rows(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * (self.rollout_rows // self.mini_batch_size)

    # Options that change what a checkpoint's numbers mean: resuming with other values is an
    # error. The rest (logging, evaluation and checkpoint cadence, progress) may change.
    RESUME_INVARIANT = (
        "seed", "iterations", "prompts_per_iteration", "samples_per_prompt", "ppo_epochs",
        "mini_batch_size", "actor_lr", "critic_lr", "weight_decay", "adam_beta1", "adam_beta2",
        "adam_eps", "actor_schedule", "critic_schedule", "actor_warmup_steps",
        "critic_warmup_steps", "min_lr_ratio", "max_grad_norm", "clip_range", "value_clip",
        "value_loss_weight", "entropy_coef", "gamma", "lam", "whiten_advantages", "reward_kind",
        "segment_threshold", "dense_spread", "dense_clamp", "kl_beta", "kl_estimator",
        "kl_target", "kl_horizon", "whiten_rewards", "reward_clip", "eos_penalty",
        "temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_length",
        "generation_batch_size")
