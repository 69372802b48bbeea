"""Every option of the SFT trainer, with its default and the reason for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlengine.configs import option
from rlengine.training.schedules import Schedule


@dataclass
class SFTConfig:
    # ---- run ----------------------------------------------------------------------------------
    output_dir: str | None = option(None, "where checkpoints, metrics.jsonl, TensorBoard logs and "
                                          "the final policy (output_dir/model, with its "
                                          "tokenizer) go (none: keep nothing on disk)")
    seed: int = option(0, "seed of the data order and dropout")
    resume: bool = option(True, "continue from the newest checkpoint in output_dir if there is "
                                "one; false starts over and deletes them")
    # ---- optimization -------------------------------------------------------------------------
    steps: int | None = option(None, "optimizer steps (none: epochs x examples // batch_size)")
    epochs: float = option(1.0, "passes over the training examples when steps is none (each "
                                "epoch drops its last partial batch)")
    batch_size: int = option(16, "examples per optimizer step, over all processes and "
                                 "accumulation steps")
    grad_accum: int = option(1, "micro-batches per optimizer step (batch_size must divide into "
                                "grad_accum x world size equal parts)")
    lr: float = option(2e-5, "AdamW learning rate (TRL's SFT default; tiny models built fresh "
                             "want about 1e-3, their default)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    schedule: Schedule = option("cosine", "learning-rate schedule after linear warm-up")
    warmup_steps: int = option(0, "linear warm-up steps")
    min_lr_ratio: float = option(0.0, "floor of cosine and linear, as a fraction of lr")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    mixed_precision: Literal["auto", "bf16", "no"] = option(
        "auto", "bf16 autocast: auto uses it on CUDA only; log-probs and the loss stay fp32")
    # ---- data ---------------------------------------------------------------------------------
    max_length: int | None = option(1024, "truncate prompt + response to this many tokens (the "
                                          "prompt loses its start, the response its end; none: "
                                          "no truncation)")
    max_prompt_length: int | None = option(None, "the most of max_length a long prompt keeps "
                                                 "when the response is long too (default: half)")
    # ---- evaluation, logging, checkpoints -----------------------------------------------------
    eval_every: int = option(0, "evaluate every this many steps (0: before training and at the "
                                "end only)")
    eval_batch_size: int = option(32, "examples per evaluation batch")
    log_every: int = option(10, "write training metrics every this many steps")
    save_every: int = option(0, "checkpoint every this many steps (0: at the end only)")
    keep_checkpoints: int = option(2, "newest checkpoints kept (0: all)")
    save_model: bool = option(True, "write the final policy and its tokenizer to "
                                    "output_dir/model")
    tensorboard: bool = option(False, "also write TensorBoard logs (pip install tensorboard)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        nonnegative = {"lr": self.lr, "weight_decay": self.weight_decay,
                       "warmup_steps": self.warmup_steps, "eval_every": self.eval_every,
                       "log_every": self.log_every, "save_every": self.save_every,
                       "keep_checkpoints": self.keep_checkpoints}
        for name, value in nonnegative.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or none, got {self.steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or none, got {self.max_grad_norm}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or none, got {self.max_length}")
        if self.max_prompt_length is not None:
            if self.max_length is None:
                raise ValueError("max_prompt_length is the prompt's share of max_length: set "
                                 "max_length too")
            if not 0 <= self.max_prompt_length < self.max_length:
                raise ValueError(f"max_prompt_length must be in [0, max_length={self.max_length})"
                                 f", got {self.max_prompt_length}")

    def total_steps(self, examples: int) -> int:
        """Optimizer steps of a run on ``examples`` examples: ``steps``, or ``epochs`` passes of
        ``examples // batch_size`` steps, at least 1."""
        return self.steps or max(1, int(self.epochs * (examples // self.batch_size)))

    # Options that change what a checkpoint's numbers mean: resuming with other values is an
    # error. The rest (logging, evaluation and checkpoint cadence, progress) may change.
    RESUME_INVARIANT = ("seed", "steps", "epochs", "batch_size", "lr", "weight_decay",
                        "adam_beta1", "adam_beta2", "adam_eps", "schedule", "warmup_steps",
                        "min_lr_ratio", "max_grad_norm", "max_length", "max_prompt_length")
