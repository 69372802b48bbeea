"""Supervised fine-tuning (SFT) of a causal LM on demonstrations: the negative log-likelihood
of the response tokens (EOS included) given the prompt, the prompt tokens masked out, averaged
over the response tokens of the whole optimizer step (TRL's completion-only loss). Log-probs go
through the engine's ops (``fused_linear_logprobs`` from the last hidden states for the model
types whose logits are the LM head's output, else ``token_logprobs``), so the ``[B, T, V]``
log-softmax is never formed. The result is the starting policy of RRHF and PPO.

The unit of work is the optimizer step. Step s takes ``batch_size`` examples from a permutation
of the training set that depends only on (seed, epoch); each process takes an equal share of
every micro-batch, and dropout is reseeded from (seed, step, rank). The loss of every
micro-batch is divided by the response-token count of the whole step (known up front from the
tokenized lengths), so the gradient is the same however the step is split into micro-batches
and processes, and a run killed and resumed ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlengine.data.tokenize import DemonstrationDataset
from rlengine.data.types import Demonstration
from rlengine.policy.rollout import Kernels, PolicyLogprobs, check_sequence_length, kernel_ops
from rlengine.policy.sft_config import SFTConfig
from rlengine.training.checkpoint import CheckpointManager
from rlengine.training.distributed import DistributedContext, init_distributed
from rlengine.training.loop import (
    RunResult,
    adamw_with_schedule,
    autocast,
    autocast_dtype,
    data_parallel,
    evaluate_on_main,
    finish_step_record,
    load_checkpoint_state,
    micro_batch_size,
    optimizer_step,
    process_micro_batches,
    reduce_step_record,
    save_checkpoint,
    save_policy,
    start_run,
    step_seed,
)
from rlengine.training.metrics import MetricsLogger


@dataclass
class SFTResult(RunResult):
    """``metrics``: the last evaluation, ``{set name: {loss, perplexity, tokens, examples}}``
    (plus the ``evaluate`` callback's numbers under ``"policy"``); ``history``: every logged
    record; ``evaluations``: the evaluation records, the first one before any training."""

    steps: int
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)


class SFTTrainer:
    """Fine-tune ``policy`` on ``examples`` (see SFTConfig for every option).

    Args:
        policy: a ``transformers`` causal LM (trained in place, moved to the trainer's device).
        tokenizer: its tokenizer (a pad or EOS token is required); saved with the final policy.
        examples: the training demonstrations (prompt + response; see
            rlengine.data.load_demonstrations for the formats that give them).
        eval_sets: named held-out demonstrations: their response-token loss and perplexity are
            computed before training, every ``eval_every`` steps and at the end.
        evaluate: ``evaluate(policy) -> {name: number}``, run (on the main process) at the same
            points, e.g. the synthetic task's gold reward of the policy's samples.
        device: None for cuda:LOCAL_RANK when CUDA is available, else the CPU.
        kernels: "engine" (rlengine.ops, the fused kernels) or "reference" (the eager
            definitions in rlengine.ops.reference).
    """

    def __init__(self, policy: torch.nn.Module, tokenizer: Any,
                 examples: Sequence[Demonstration], config: SFTConfig | None = None, *,
                 eval_sets: Mapping[str, Sequence[Demonstration]] | None = None,
                 evaluate: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
                 device: str | torch.device | None = None, kernels: Kernels = "engine",
                 log=print):
        self.config = config = config or SFTConfig()
        kernel_ops(kernels)  # a bad name is an error now, not at the first step
        self.kernels = kernels
        if len(examples) == 0:
            raise ValueError("examples is empty")
        self.dist: DistributedContext = init_distributed(device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda *_: None)
        self.tokenizer = tokenizer
        lengths = {"max_length": config.max_length,
                   "max_prompt_length": config.max_prompt_length}
        self.train_data = DemonstrationDataset(list(examples), tokenizer, **lengths)
        self.eval_data = {name: DemonstrationDataset(list(data), tokenizer, **lengths)
                          for name, data in (eval_sets or {}).items()}
        for name, data in self.eval_data.items():
            if len(data) == 0:
                raise ValueError(f"evaluation set {name!r} is empty")
        datasets = [self.train_data, *self.eval_data.values()]
        _check_vocabulary(policy, datasets)
        check_sequence_length({"policy": policy},
                              max(len(item.sequence.input_ids) for data in datasets
                                  for item in data),
                              "prompt + response texts", "set max_length so that they fit")
        # the loss's denominator: a step's response tokens, known before its forward passes
        self.response_tokens = [item.sequence.response_length for item in self.train_data]
        self.evaluate_fn = evaluate

        self.micro_batch = micro_batch_size(config.batch_size, "batch_size", self.dist,
                                            config.grad_accum)
        self.steps_per_epoch = len(self.train_data) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size ({config.batch_size}) is larger than the training set "
                             f"({len(self.train_data)} examples)")
        self.total_steps = config.total_steps(len(self.train_data))

        self.policy = policy.to(self.device)
        self.module = PolicyLogprobs(self.policy, kernels)
        self.wrapped = data_parallel(self.module, self.dist)
        self.optimizer, self.scheduler = adamw_with_schedule(self.policy.parameters(), config,
                                                             self.total_steps)
        self.autocast_dtype = autocast_dtype(config.mixed_precision, self.device)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self._epoch_order: tuple[int, list[int]] | None = None

    # ---- data ---------------------------------------------------------------------------------

    def _step_indices(self, step: int) -> list[int]:
        """The examples of optimizer step ``step``: a slice of its epoch's permutation, a
        function of (seed, epoch) alone."""
        size = self.config.batch_size
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(len(self.train_data),
                                                       generator=generator).tolist())
        return self._epoch_order[1][position * size:(position + 1) * size]

    def _batch(self, dataset: DemonstrationDataset, indices: Sequence[int]
               ) -> dict[str, torch.Tensor]:
        batch = dataset.collate([dataset[i] for i in indices])
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- the step -----------------------------------------------------------------------------

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def _negative_log_likelihood(self, module: torch.nn.Module, batch: dict[str, torch.Tensor]
                                 ) -> torch.Tensor:
        """The sum over the batch's response tokens of -log pi(token | what precedes it)."""
        with self._autocast():
            logprobs = module(batch["input_ids"], batch["attention_mask"],
                              batch["response_mask"])
        return -logprobs.sum()  # 0 outside the response mask

    def _train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        torch.manual_seed(step_seed(cfg.seed, step, self.dist.rank))
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        indices = self._step_indices(step)
        step_tokens = sum(self.response_tokens[i] for i in indices)
        # DDP averages gradients over processes: scaled by the world size, each process's share
        # of the sum over the step's tokens adds up to the mean over them
        scale = self.dist.world_size / step_tokens
        sums: dict[str, torch.Tensor] = {}
        micro_batches = process_micro_batches(indices, self.dist, self.micro_batch,
                                              cfg.grad_accum)
        for m, part in enumerate(micro_batches):
            last = m == cfg.grad_accum - 1
            sync = (self.wrapped.no_sync() if self.dist.enabled and not last
                    else contextlib.nullcontext())
            batch = self._batch(self.train_data, part)
            with sync:
                nll = self._negative_log_likelihood(self.wrapped, batch)
                (nll * scale).backward()
            parts = {"loss": nll.detach(), "tokens": batch["attention_mask"].sum().float()}
            for key, value in parts.items():
                sums[key] = sums[key] + value if key in sums else value
        grad_norm, lr = optimizer_step(self.policy.parameters(), self.optimizer, self.scheduler,
                                       cfg.max_grad_norm)
        record, tokens = reduce_step_record(sums, self.dist, step_tokens)
        record["train/perplexity"] = math.exp(min(record["train/loss"], 50.0))
        record["train/response_tokens"] = step_tokens
        return finish_step_record(record, lr, grad_norm, tokens)

    # ---- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluation_loss(self, dataset: DemonstrationDataset) -> dict[str, float]:
        """The mean response-token NLL of ``dataset`` under the policy, its perplexity, and the
        token and example counts (in eval mode; the mode is restored after)."""
        was_training = self.module.training
        self.module.eval()
        total, tokens = 0.0, 0
        size = self.config.eval_batch_size
        try:
            for start in range(0, len(dataset), size):
                batch = self._batch(dataset, range(start, min(start + size, len(dataset))))
                total += float(self._negative_log_likelihood(self.module, batch))
                tokens += int(batch["response_mask"].sum())
        finally:
            self.module.train(was_training)
        loss = total / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens,
                "examples": len(dataset)}

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Every evaluation set's loss and perplexity, and the ``evaluate`` callback's numbers
        (under ``"policy"``): computed on the main process, which the others wait for."""
        results: dict[str, dict[str, float]] = {}
        if self.dist.is_main:
            for name, dataset in self.eval_data.items():
                results[name] = self.evaluation_loss(dataset)
        results = self.dist.broadcast_object(results)
        if self.evaluate_fn is not None:
            results["policy"] = evaluate_on_main(self.evaluate_fn, self.policy, self.dist)
        return results

    def _evaluate(self, logger: MetricsLogger) -> dict[str, dict[str, float]]:
        results = self.evaluate()
        record = {f"eval/{name}/{key}": value for name, values in results.items()
                  for key, value in values.items()}
        self.evaluations.append({"step": self.step, **record})
        self._record(logger, record)
        self.log(f"step {self.step}: " + "; ".join(
            f"{name} " + " ".join(f"{k} {v:.4f}" for k, v in values.items()
                                  if k not in ("tokens", "examples"))
            for name, values in results.items()))
        return results

    # ---- the loop -----------------------------------------------------------------------------

    def _describe(self) -> str:
        cfg = self.config
        tokens = sum(self.response_tokens)
        return (f"SFT on {len(self.train_data)} examples ({tokens} response tokens; "
                f"{self.train_data.truncation}), {self.total_steps} steps of {cfg.batch_size}, "
                f"{self.dist.world_size} process(es) on {self.device}")

    @property
    def _evaluates(self) -> bool:
        return bool(self.eval_data) or self.evaluate_fn is not None

    def train(self) -> SFTResult:
        cfg = self.config
        began = time.perf_counter()
        checkpoints, resumed_from, logger, progress = start_run(
            cfg, dist=self.dist, load=self.load_checkpoint, log=self.log,
            total_steps=self.total_steps, position=lambda: self.step, describe=self._describe,
            desc="sft")
        metrics: dict[str, dict[str, float]] = {}
        window_start, window_tokens = time.perf_counter(), 0.0
        try:
            if self.step == 0 and self._evaluates:
                metrics = self._evaluate(logger)
            while self.step < self.total_steps:
                record = self._train_step(self.step)
                self.step += 1
                window_tokens += record.pop("train/tokens")
                progress.update(1)
                final = self.step == self.total_steps
                if cfg.log_every and (self.step % cfg.log_every == 0 or final):
                    elapsed = time.perf_counter() - window_start
                    record["train/tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
                    record["train/epoch"] = self.step / self.steps_per_epoch
                    self._record(logger, record)
                    progress.set_postfix(loss=f"{record['train/loss']:.4f}")
                    window_start, window_tokens = time.perf_counter(), 0.0
                if self._evaluates and (final or (cfg.eval_every
                                                  and self.step % cfg.eval_every == 0)):
                    metrics = self._evaluate(logger)
                if checkpoints is not None and (final or (cfg.save_every
                                                          and self.step % cfg.save_every == 0)):
                    self.save_checkpoint(checkpoints)
        finally:
            progress.close()
            logger.close()
        if self._evaluates and self.evaluations and not metrics:
            # resumed from the final checkpoint: its last evaluation is the run's
            last = self.evaluations[-1]
            metrics = _nested({k: v for k, v in last.items() if k.startswith("eval/")})
        model_dir = None
        if cfg.output_dir and cfg.save_model and self.dist.is_main:
            model_dir = save_policy(self.policy, self.tokenizer, cfg.output_dir)
        self.dist.barrier()
        return SFTResult(self.step, metrics, self.history, self.evaluations,
                         resumed_from=resumed_from, seconds=time.perf_counter() - began,
                         model_dir=model_dir)

    def _record(self, logger: MetricsLogger, values: dict[str, Any]) -> None:
        self.history.append({"step": self.step, **values})
        logger.log(self.step, values)

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config": dataclasses.asdict(self.config),
                "examples": len(self.train_data), "world_size": self.dist.world_size,
                "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "history": self.history,
                "evaluations": self.evaluations}

    def save_checkpoint(self, checkpoints: CheckpointManager) -> None:
        save_checkpoint(checkpoints, self.step, self.state_dict, self.dist)

    def load_checkpoint(self, path: str | Path) -> int:
        state = load_checkpoint_state(path, self.config, SFTConfig.RESUME_INVARIANT,
                                      size_key="examples", size=len(self.train_data),
                                      size_name="training examples")
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        return self.step


def _nested(record: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{"eval/<set>/<key>": v}`` as ``{set: {key: v}}``."""
    out: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        name, _, metric = key.removeprefix("eval/").rpartition("/")
        out.setdefault(name, {})[metric] = value
    return out


def _check_vocabulary(policy: torch.nn.Module, datasets: Sequence[DemonstrationDataset]) -> None:
    """A token id past the policy's embedding table would fail deep inside the model: say
    which tokenizer and model do not fit instead."""
    embeddings = policy.get_input_embeddings().num_embeddings
    largest = max(max(item.sequence.input_ids) for data in datasets for item in data)
    if largest >= embeddings:
        raise ValueError(f"the tokenizer gives token id {largest}, but the policy's embedding "
                         f"table has {embeddings} rows: the model and the tokenizer do not "
                         f"belong together")
