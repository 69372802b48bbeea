"""Every option of the reward trainer, with its default and the reason for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlengine.configs import option
from rlengine.reward.model import ScoreMode
from rlengine.training.schedules import Schedule


@dataclass
class RewardTrainerConfig:
    # ---- run ----------------------------------------------------------------------------------
    output_dir: str | None = option(None, "where checkpoints, metrics.jsonl, TensorBoard logs and "
                                          "the final model go (none: keep nothing on disk)")
    seed: int = option(0, "seed of the data order, dropout and any fresh parameters")
    resume: bool = option(True, "continue from the newest checkpoint in output_dir if there is "
                                "one; false starts over and deletes them")
    # ---- optimization -------------------------------------------------------------------------
    steps: int | None = option(None, "optimizer steps (none: epochs x pairs // batch_size)")
    epochs: float = option(1.0, "passes over the training pairs when steps is none")
    batch_size: int = option(32, "preference pairs per optimizer step, over all processes and "
                                 "accumulation steps (the paper: 32, 16 with contrastive losses)")
    grad_accum: int = option(1, "micro-batches per optimizer step (batch_size must divide into "
                                "grad_accum x world size equal parts)")
    lr: float = option(1e-5, "AdamW learning rate (the paper: 5e-6 on 7B models; tiny models want "
                             "about 2e-3)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.95, "AdamW beta2 (the paper's 0.95)")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    schedule: Schedule = option("inverse_sqrt", "learning-rate schedule after linear warm-up "
                                                "(inverse_sqrt is the paper's)")
    warmup_steps: int = option(0, "linear warm-up steps")
    min_lr_ratio: float = option(0.0, "floor of cosine and linear, as a fraction of lr")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (none: no clipping)")
    mixed_precision: Literal["auto", "bf16", "no"] = option(
        "auto", "bf16 autocast: auto uses it on CUDA only; the value head and losses stay fp32")
    # ---- scoring ------------------------------------------------------------------------------
    score_mode: ScoreMode = option("last", "sequence reward: last (value at EOS, the paper's RM), "
                                           "segment (mean of segment-end values), token_mean")
    segment_threshold: float = option(1.75, "score_mode=segment: a token ends a segment when the "
                                            "entropy model's next-token entropy exceeds this")
    # ---- preference strength and denoising (METHODS.md section 1) -----------------------------
    strength_key: str = option("strength_mu", "the column holding each pair's strength mu "
                                              "(written by `rlengine strength`)")
    margin: Literal["none", "column", "strength"] = option(
        "none", "BT margin: none; column (the data's margin column, 0 where absent); strength "
                "(adaptive margin: the pair's mu)")
    margin_scale: float = option(1.0, "multiplies the margin")
    label_smoothing: float = option(0.0, "soft-label alpha: L = -(1-a) log s(d) - a log s(-d) "
                                         "(the paper's value is unpublished; 0.2 fits its curves)")
    smoothing_on: Literal["all", "negative_strength"] = option(
        "all", "which pairs get label smoothing: all, or only those with mu < 0")
    flip_lowest: float = option(0.0, "swap chosen and rejected for this fraction of pairs with the "
                                     "lowest mu (the paper's final recipe: 0.1), then use -mu "
                                     "(and minus their margin column)")
    drop_lowest: float = option(0.0, "drop this fraction of pairs with the lowest mu (after "
                                     "flipping)")
    center_rewards: float = option(0.0, "weight of mean((r_chosen + r_rejected)^2), which keeps "
                                        "rewards centred on 0")
    # ---- contrastive learning -----------------------------------------------------------------
    contrastive: Literal["none", "simcse", "swav"] = option(
        "none", "contrastive loss added to BT with weight contrastive_beta")
    contrastive_on: Literal["single", "difference"] = option(
        "difference", "its representation: single responses h(x, y), or preference differences "
                      "h(x, y_c) - h(x, y_r) with their mirrors")
    contrastive_beta: float = option(0.1, "weight of the contrastive loss (unpublished)")
    contrastive_tau: float = option(0.05, "SimCSE temperature (SimCSE's default)")
    swav_prototypes: int = option(32, "SwAV: number of learned prototypes (unpublished)")
    swav_temperature: float = option(0.1, "SwAV: softmax temperature")
    swav_epsilon: float = option(0.05, "SwAV: Sinkhorn-Knopp epsilon")
    swav_iterations: int = option(3, "SwAV: Sinkhorn-Knopp iterations")
    # ---- MetaRM -------------------------------------------------------------------------------
    metarm_eta: float = option(0.0, "MetaRM ascent step eta on the meta set's difference "
                                    "objective before each step (0: MetaRM off; needs a meta "
                                    "set); the descent step is the optimizer's (alpha = lr)")
    metarm_batch: int = option(8, "MetaRM: prompts (each with its k samples) per meta batch")
    # ---- evaluation, logging, checkpoints -----------------------------------------------------
    eval_every: int = option(0, "evaluate every this many steps (0: at the end only)")
    eval_batch_size: int = option(64, "pairs per evaluation batch")
    log_every: int = option(10, "write training metrics every this many steps")
    save_every: int = option(0, "checkpoint every this many steps (0: at the end only)")
    keep_checkpoints: int = option(2, "newest checkpoints kept (0: all)")
    save_model: bool = option(True, "write the final model to output_dir/model")
    tensorboard: bool = option(False, "also write TensorBoard logs (pip install tensorboard)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "eval_batch_size": self.eval_batch_size, "metarm_batch": self.metarm_batch,
                    "swav_prototypes": self.swav_prototypes,
                    "swav_iterations": self.swav_iterations}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        nonnegative = {"warmup_steps": self.warmup_steps, "eval_every": self.eval_every,
                       "log_every": self.log_every, "save_every": self.save_every,
                       "keep_checkpoints": self.keep_checkpoints, "lr": self.lr,
                       "weight_decay": self.weight_decay, "center_rewards": self.center_rewards,
                       "contrastive_beta": self.contrastive_beta, "metarm_eta": self.metarm_eta}
        for name, value in nonnegative.items():
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or none, got {self.steps}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        for name in ("flip_lowest", "drop_lowest"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("contrastive_tau", "swav_temperature", "swav_epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or none, got {self.max_grad_norm}")

    @property
    def uses_strength(self) -> bool:
        return bool(self.strength_options())

    def total_steps(self, train_pairs: int) -> int:
        """Optimizer steps of a run on ``train_pairs`` pairs: ``steps``, or ``epochs`` passes of
        ``train_pairs // batch_size`` steps (each epoch drops its remainder), at least 1."""
        return self.steps or max(1, int(self.epochs * (train_pairs // self.batch_size)))

    def strength_options(self) -> list[str]:
        """The options set that read each pair's strength column, as ``name=value`` (for
        messages): margin=strength, flip_lowest, drop_lowest, smoothing on mu < 0."""
        used = []
        if self.margin == "strength":
            used.append("margin=strength")
        if self.flip_lowest > 0:
            used.append(f"flip_lowest={self.flip_lowest}")
        if self.drop_lowest > 0:
            used.append(f"drop_lowest={self.drop_lowest}")
        if self.label_smoothing > 0 and self.smoothing_on == "negative_strength":
            used.append("smoothing_on=negative_strength")
        return used

    # Options that change what a checkpoint's numbers mean: resuming with other values is an
    # error. The rest (logging, evaluation cadence, checkpoint cadence) may change on resume.
    RESUME_INVARIANT = ("seed", "steps", "epochs", "batch_size", "lr", "weight_decay",
                        "adam_beta1", "adam_beta2", "adam_eps", "schedule", "warmup_steps",
                        "min_lr_ratio", "max_grad_norm", "score_mode", "segment_threshold",
                        "margin", "margin_scale", "label_smoothing", "smoothing_on",
                        "flip_lowest", "drop_lowest", "center_rewards", "contrastive",
                        "contrastive_on", "contrastive_beta", "contrastive_tau",
                        "swav_prototypes", "swav_temperature", "swav_epsilon",
                        "swav_iterations", "strength_key", "metarm_eta", "metarm_batch")
