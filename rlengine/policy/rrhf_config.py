"""Every option of the RRHF trainer, with its default and the reason for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlengine.configs import option
from rlengine.policy.rewards import KLEstimator
from rlengine.training.schedules import Schedule


@dataclass
class RRHFConfig:
    # ---- run ----------------------------------------------------------------------------------
    output_dir: str | None = option(None, "where checkpoints, metrics.jsonl, TensorBoard logs and "
                                          "the final policy go (none: keep nothing on disk)")
    seed: int = option(0, "seed of sampling, the query order and dropout")
    resume: bool = option(True, "continue from the newest checkpoint in output_dir if there is "
                                "one; false starts over and deletes them")
    # ---- rounds and steps ---------------------------------------------------------------------
    rounds: int = option(3, "sampling rounds: each samples fresh candidates with the current "
                            "policy, then trains on them (1: offline RRHF on one sample set)")
    epochs: float = option(1.0, "passes over the queries per round (the paper: 3)")
    queries_per_step: int = option(16, "queries (each with all its candidates) per optimizer "
                                       "step, over all processes and accumulation steps (the "
                                       "paper: 64)")
    grad_accum: int = option(1, "micro-batches per optimizer step (queries_per_step must divide "
                                "into grad_accum x world size equal parts)")
    # ---- optimization -------------------------------------------------------------------------
    lr: float = option(2e-5, "AdamW learning rate (the paper: 2e-5 on 7B models; the tiny "
                             "synthetic models want about 1e-3)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    schedule: Schedule = option("cosine", "learning-rate schedule after linear warm-up, over all "
                                          "rounds")
    warmup_steps: int = option(0, "linear warm-up steps")
    min_lr_ratio: float = option(0.0, "floor of cosine and linear, as a fraction of lr")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    mixed_precision: Literal["auto", "bf16", "no"] = option(
        "auto", "bf16 autocast: auto uses it on CUDA only; log-probs and losses stay fp32")
    # ---- the loss (METHODS.md section 4) ------------------------------------------------------
    rank_weight: float = option(1.0, "weight of the ranking loss (0: SFT on the best candidate "
                                     "alone, the paper's ablation)")
    sft_weight: float = option(1.0, "weight of the SFT loss on each query's best candidate")
    sft_reduction: Literal["sum", "mean"] = option(
        "sum", "SFT loss over the best candidate's tokens: sum (the paper) or token mean")
    length_penalty: float = option(1.0, "scores p_i = sum log pi / length ** length_penalty "
                                        "(1: the paper's length-normalized score; 0: the sum)")
    kl_beta: float = option(0.0, "weight of the KL to the reference (initial) policy on the "
                                 "candidates' tokens (the paper: 0.01 for online sampling; 0: "
                                 "off, no reference forward)")
    kl_estimator: KLEstimator = option("k3", "per-token KL estimator of the KL term")
    # ---- candidates ---------------------------------------------------------------------------
    policy_samples: int = option(4, "responses sampled from the current policy per query each "
                                     "round (the paper: 4, besides the dataset's 2)")
    sampling: Literal["sample", "diverse_beam"] = option(
        "sample", "how policy candidates are drawn: sampling, or diverse beam search")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest token set with this mass")
    top_k: int = option(0, "sample among the k likeliest tokens (0: all)")
    num_beam_groups: int | None = option(None, "diverse beam search: groups (default: one per "
                                               "beam, i.e. policy_samples)")
    diversity_penalty: float = option(1.0, "diverse beam search: Hamming diversity penalty")
    max_new_tokens: int = option(64, "longest policy sample, in tokens (EOS included)")
    max_prompt_length: int | None = option(None, "keep the last this many prompt tokens")
    max_response_length: int | None = option(None, "cut dataset responses to this many tokens")
    generation_batch_size: int = option(32, "queries per generation call; also the unit of work "
                                            "that processes share (the samples do not depend on "
                                            "the number of processes)")
    score_batch_size: int = option(64, "candidates per reward-model forward")
    # ---- evaluation, logging, checkpoints -----------------------------------------------------
    evaluate_rounds: bool = option(True, "evaluate the policy (when the job can: the synthetic "
                                         "task's gold reward) before training and after each "
                                         "round")
    log_every: int = option(1, "write training metrics every this many steps")
    save_every: int = option(0, "checkpoint every this many steps (0: at the end of each "
                                "round only)")
    keep_checkpoints: int = option(2, "newest checkpoints kept (0: all)")
    save_model: bool = option(True, "write the final policy to output_dir/model")
    tensorboard: bool = option(False, "also write TensorBoard logs (pip install tensorboard)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        positive = {"rounds": self.rounds, "queries_per_step": self.queries_per_step,
                    "grad_accum": self.grad_accum, "max_new_tokens": self.max_new_tokens,
                    "generation_batch_size": self.generation_batch_size,
                    "score_batch_size": self.score_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        nonnegative = {"lr": self.lr, "weight_decay": self.weight_decay,
                       "warmup_steps": self.warmup_steps, "rank_weight": self.rank_weight,
                       "sft_weight": self.sft_weight, "length_penalty": self.length_penalty,
                       "kl_beta": self.kl_beta, "policy_samples": self.policy_samples,
                       "top_k": self.top_k, "diversity_penalty": self.diversity_penalty,
                       "log_every": self.log_every, "save_every": self.save_every,
                       "keep_checkpoints": self.keep_checkpoints}
        for name, value in nonnegative.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.rank_weight == 0 and self.sft_weight == 0 and self.kl_beta == 0:
            raise ValueError("rank_weight, sft_weight and kl_beta are all 0: nothing to train")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or none, got {self.max_grad_norm}")
        for name in ("max_prompt_length", "max_response_length", "num_beam_groups"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or none, got {value}")
        if self.sampling == "diverse_beam" and self.policy_samples:
            groups = self.num_beam_groups or self.policy_samples
            if self.policy_samples % groups:
                raise ValueError(f"diverse beam search: policy_samples ({self.policy_samples}) "
                                 f"beams must split into num_beam_groups ({groups}) equal groups")

    # Options that change what a checkpoint's numbers mean: resuming with other values is an
    # error. The rest (logging, checkpoint cadence, progress) may change on resume.
    RESUME_INVARIANT = ("seed", "rounds", "epochs", "queries_per_step", "lr", "weight_decay",
                        "adam_beta1", "adam_beta2", "adam_eps", "schedule", "warmup_steps",
                        "min_lr_ratio", "max_grad_norm", "rank_weight", "sft_weight",
                        "sft_reduction", "length_penalty", "kl_beta", "kl_estimator",
                        "policy_samples", "sampling", "temperature", "top_p", "top_k",
                        "num_beam_groups", "diversity_penalty", "max_new_tokens",
                        "max_prompt_length", "max_response_length", "generation_batch_size")
