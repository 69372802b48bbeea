"""The reward trainer: Bradley-Terry training of a RewardModel through the engine's ops, with
the Secrets-of-RLHF-II remedies (strength margins, label smoothing, flips, contrastive losses,
MetaRM), segment-level scores, evaluation on several sets, checkpoints that resume exactly,
and data parallelism under torchrun.

The unit of work is the optimizer step. Step s draws ``batch_size`` pairs from a permutation of
the training set that depends only on (seed, epoch); each process takes an equal share of every
micro-batch, and dropout is reseeded from (seed, step, rank). So a run's numbers depend on the
seed and the options alone: not on how often it was interrupted, and (up to the order of float
sums) not on how many processes ran it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlengine import ops
from rlengine.data.tokenize import (
    PreferenceDataset,
    RankedDataset,
)
from rlengine.data.types import PreferencePair, RankedExample, Text
from rlengine.ops import reference as reference_ops
from rlengine.reward.config import RewardTrainerConfig
from rlengine.reward.denoise import PreparedPairs, prepare_pairs
from rlengine.reward.losses import metarm_difference_objective, simcse_loss, swav_loss
from rlengine.reward.metarm import MetaAscent
from rlengine.reward.model import RewardModel
from rlengine.training.checkpoint import CheckpointManager
from rlengine.training.distributed import DistributedContext, init_distributed
from rlengine.training.loop import (
    RunResult,
    adamw_with_schedule,
    autocast,
    autocast_dtype,
    data_parallel,
    finish_step_record,
    load_checkpoint_state,
    micro_batch_size,
    optimizer_step,
    process_micro_batches,
    reduce_step_record,
    save_checkpoint,
    start_run,
    step_seed,
)
from rlengine.training.metrics import MetricsLogger

MetaPrompt = tuple[Text, Sequence[Text]]


@dataclass
class RewardTrainResult(RunResult):
    """``metrics``: the final evaluation, ``{set name: {accuracy, loss, reward_mean,
    reward_std, pairs}}``; ``history``: every logged record (training and evaluation)."""

    steps: int
    metrics: dict[str, dict[str, float]]
    history: list[dict[str, Any]] = field(default_factory=list)


class _TrainModule(torch.nn.Module):
    """What data parallelism wraps: the reward model and SwAV's prototypes, whose gradients
    must be averaged with the model's."""

    def __init__(self, reward_model: RewardModel, prototypes: torch.nn.Parameter | None):
        super().__init__()
        self.reward_model = reward_model
        self.prototypes = prototypes

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.reward_model(input_ids, attention_mask)
        return out.values, out.hidden_states


class RewardTrainer:
    """Train ``model`` on ``train_pairs`` (see RewardTrainerConfig for every option).

    Args:
        model: the RewardModel to train (moved to the trainer's device).
        tokenizer: its tokenizer (a pad or EOS token is required).
        train_pairs: preference pairs; strength options read ``pair.extra[strength_key]``.
        config: the options.
        eval_sets: named validation sets, evaluated every ``eval_every`` steps and at the end.
        meta_set: MetaRM's unlabeled policy samples, ``(prompt, [k responses])`` per prompt (or
            RankedExamples, whose scores are ignored); used when ``metarm_eta > 0``.
        entropy_model: ``score_mode="segment"``: the frozen causal LM (usually the SFT policy,
            same tokenizer) whose next-token entropies place the segment boundaries.
        max_length, max_prompt_length: truncation, as rlengine.data.PreferenceDataset.
        device: None for cuda:LOCAL_RANK when CUDA is available, else the CPU.
        kernels: "engine" (rlengine.ops, the fused kernels) or "reference" (the plain-PyTorch
            definitions in rlengine.ops.reference): the benchmarks' eager baseline.
    """

    def __init__(self, model: RewardModel, tokenizer: Any,
                 train_pairs: Sequence[PreferencePair], config: RewardTrainerConfig | None = None,
                 *, eval_sets: Mapping[str, Sequence[PreferencePair]] | None = None,
                 meta_set: Sequence[MetaPrompt | RankedExample] | None = None,
                 entropy_model: torch.nn.Module | None = None, max_length: int | None = None,
                 max_prompt_length: int | None = None, device: str | torch.device | None = None,
                 kernels: str = "engine", log=print):
        self.config = config = config or RewardTrainerConfig()
        if kernels not in ("engine", "reference"):
            raise ValueError(f"kernels must be 'engine' or 'reference', got {kernels!r}")
        self.ops = ops if kernels == "engine" else reference_ops
        if not isinstance(model, RewardModel):
            raise TypeError(f"model must be a rlengine RewardModel, got {type(model).__name__}")
        self.dist: DistributedContext = init_distributed(device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda *_: None)
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        if len(train_pairs) == 0:
            raise ValueError("train_pairs is empty")

        self.prepared: PreparedPairs = prepare_pairs(train_pairs, config)
        # per-pair loss inputs on the device once, indexed there by each batch's pair indices
        self._margin = (None if self.prepared.margin is None
                        else self.prepared.margin.to(self.device))
        self._smoothing = self.prepared.smoothing.to(self.device)
        self.lengths = lengths = {"max_length": max_length,
                                  "max_prompt_length": max_prompt_length}
        self.train_data = PreferenceDataset(self.prepared.pairs, tokenizer, **lengths)
        self.eval_data = {name: PreferenceDataset(list(pairs), tokenizer, **lengths)
                          for name, pairs in (eval_sets or {}).items()}
        for name, data in self.eval_data.items():
            if len(data) == 0:
                raise ValueError(f"evaluation set {name!r} is empty")

        self.meta_data = None
        if config.metarm_eta > 0:
            if not meta_set:
                raise ValueError("metarm_eta > 0 needs a meta_set: prompts with k >= 2 samples "
                                 "of the current policy each")
            self.meta_data = RankedDataset(_as_ranked(meta_set), tokenizer, **lengths)

        self.entropy_model = entropy_model
        if config.score_mode == "segment":
            if entropy_model is None:
                raise ValueError("score_mode='segment' needs an entropy_model: the frozen causal "
                                 "LM (the SFT policy) whose entropies place segment boundaries")
            # Used under no_grad only: its requires_grad flags are the caller's (the entropy model
            # is often the SFT policy, which other models are copied from) and stay untouched.
            entropy_model.to(self.device)

        self.micro_batch = micro_batch_size(config.batch_size, "batch_size", self.dist,
                                            config.grad_accum)
        self.steps_per_epoch = len(self.train_data) // config.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size ({config.batch_size}) is larger than the training set "
                             f"({len(self.train_data)} pairs)")
        self.total_steps = config.total_steps(len(self.train_data))

        self.model = model.to(self.device)
        hidden = model.value_head.in_features
        prototypes = None
        if config.contrastive == "swav":
            generator = torch.Generator().manual_seed(config.seed)
            prototypes = torch.nn.Parameter(
                F.normalize(torch.randn(config.swav_prototypes, hidden, generator=generator),
                            dim=-1).to(self.device))
        self.module = _TrainModule(self.model, prototypes)
        self.wrapped = data_parallel(self.module, self.dist)
        self.optimizer, self.scheduler = adamw_with_schedule(self.module.parameters(), config,
                                                             self.total_steps)
        self.autocast_dtype = autocast_dtype(config.mixed_precision, self.device)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._epoch_order: tuple[int, torch.Tensor] | None = None

        if config.contrastive == "simcse" and not _has_dropout(model):
            self.log("warning: contrastive=simcse but the backbone has no dropout: its two views "
                     "are identical and the loss only spreads the batch apart")

    # ---- data ---------------------------------------------------------------------------------

    def _step_indices(self, step: int) -> list[int]:
        """The training pairs of optimizer step ``step``: a slice of its epoch's permutation,
        a function of (seed, epoch) alone (drawn once per epoch)."""
        size = self.config.batch_size
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(len(self.train_data),
                                                       generator=generator))
        return self._epoch_order[1][position * size:(position + 1) * size].tolist()

    def _micro_batches(self, step: int) -> list[list[int]]:
        """This process's share of each micro-batch of ``step``."""
        return process_micro_batches(self._step_indices(step), self.dist, self.micro_batch,
                                     self.config.grad_accum)

    def _batch(self, dataset: PreferenceDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = dataset.collate([dataset[i] for i in indices])
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---- scoring ------------------------------------------------------------------------------

    def _content_mask(self, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      last_index: torch.Tensor) -> torch.Tensor:
        """The response without its final EOS (token_mean and segment scores leave it out)."""
        rows = torch.arange(len(input_ids), device=input_ids.device)
        mask = response_mask.clone()
        if self.eos_id is not None:
            ends_with_eos = input_ids[rows, last_index] == self.eos_id
            mask[rows, last_index] &= ~ends_with_eos
        return mask

    @torch.no_grad()
    def _entropy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T]: at position t, the entropy model's entropy of the distribution that predicts
        token t + 1 (METHODS.md's alignment; see ops.entropy_segments)."""
        was_training = self.entropy_model.training
        self.entropy_model.eval()
        try:
            logits = self.entropy_model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.entropy_model.train(was_training)
        _, entropy = self.ops.token_logprobs(logits[:, :-1].float(), input_ids[:, 1:],
                                       with_entropy=True)
        return F.pad(entropy, (0, 1))

    def _scores(self, values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, response_mask: torch.Tensor,
                last_index: torch.Tensor) -> torch.Tensor:
        mode = self.config.score_mode
        if mode == "last":
            return RewardModel.score(values, mode="last", last_index=last_index)
        content = self._content_mask(input_ids, response_mask, last_index)
        if mode == "token_mean":
            return RewardModel.score(values, mode="token_mean", response_mask=content)
        entropy = self._entropy(input_ids, attention_mask)
        segment_ids, counts = self.ops.entropy_segments(entropy, content,
                                                        threshold=self.config.segment_threshold)
        return self.ops.segment_reduce(values, segment_ids, counts, reduce="end_mean").float()

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    @staticmethod
    def _pair_rows(batch: dict[str, torch.Tensor], repeat: int = 1):
        keys = ("input_ids", "attention_mask", "response_mask", "last_index")
        rows = [torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in keys]
        return [torch.cat([r] * repeat) for r in rows]

    # ---- losses -------------------------------------------------------------------------------

    def _contrastive(self, hidden: torch.Tensor, last_index: torch.Tensor, pairs: int
                     ) -> torch.Tensor:
        cfg = self.config
        rows = torch.arange(len(last_index), device=hidden.device)
        vectors = hidden[rows, last_index].float()            # [2 views x 2 sides x pairs, H]
        views = vectors.view(2, 2, pairs, -1)
        if cfg.contrastive_on == "difference":
            difference = views[:, 0] - views[:, 1]             # [2 views, pairs, H]
            items = torch.cat([difference, -difference], dim=1)
        else:
            items = views.reshape(2, 2 * pairs, -1)
        if cfg.contrastive == "simcse":
            return simcse_loss(items[0], items[1], temperature=cfg.contrastive_tau)
        return swav_loss(items[0], items[1], self.module.prototypes,
                         temperature=cfg.swav_temperature, epsilon=cfg.swav_epsilon,
                         iterations=cfg.swav_iterations)

    def _micro_loss(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        batch = self._batch(self.train_data, indices)
        pairs = len(indices)
        views = 2 if cfg.contrastive != "none" else 1
        input_ids, attention_mask, response_mask, last_index = self._pair_rows(batch, views)
        with self._autocast():
            values, hidden = self.wrapped(input_ids, attention_mask)
        first = slice(0, 2 * pairs)
        rewards = self._scores(values[first], input_ids[first], attention_mask[first],
                               response_mask[first], last_index[first])
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        index = batch["index"]
        per_pair = self.ops.bt_loss(chosen, rejected,
                                    margin=None if self._margin is None else self._margin[index],
                                    label_smoothing=self._smoothing[index])
        bt = per_pair.mean()
        loss = bt
        parts = {"bt_loss": bt.detach(),
                 "accuracy": ((chosen > rejected).float()
                              + 0.5 * (chosen == rejected).float()).mean().detach(),
                 "reward_mean": rewards.mean().detach()}
        if cfg.center_rewards > 0:
            center = ((chosen + rejected) ** 2).mean()
            loss = loss + cfg.center_rewards * center
            parts["center_loss"] = center.detach()
        if cfg.contrastive != "none":
            contrastive = self._contrastive(hidden, last_index, pairs)
            loss = loss + cfg.contrastive_beta * contrastive
            parts["contrastive_loss"] = contrastive.detach()
        tokens = attention_mask[first].sum().detach()
        parts["tokens"] = tokens.float()
        return loss, parts

    def _meta_objective(self, step: int):
        """J on this step's meta batch (every process draws the same prompts and averages the
        ascent gradient), as a closure for MetaAscent."""
        data = self.meta_data
        generator = torch.Generator().manual_seed(self.config.seed * 7_777_777 + step)
        chosen = torch.randperm(len(data), generator=generator)[:self.config.metarm_batch]
        batch = data.collate([data[i] for i in chosen.tolist()])
        batch = {k: v.to(self.device) for k, v in batch.items()}

        def objective() -> torch.Tensor:
            with self._autocast():
                values, _ = self.module(batch["input_ids"], batch["attention_mask"])
            rewards = self._scores(values, batch["input_ids"], batch["attention_mask"],
                                   batch["response_mask"], batch["last_index"])
            per_prompt = []
            start = 0
            for count in batch["num_responses"].tolist():
                per_prompt.append(metarm_difference_objective(rewards[start:start + count]))
                start += count
            return torch.stack(per_prompt).mean()

        return objective

    # ---- the loop -----------------------------------------------------------------------------

    def _train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        torch.manual_seed(step_seed(cfg.seed, step, self.dist.rank))
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        ascent = contextlib.nullcontext()
        if self.meta_data is not None:
            average = None
            if self.dist.enabled:
                def average(t: torch.Tensor) -> torch.Tensor:
                    return self.dist.all_reduce_sum(t) / self.dist.world_size
            ascent = MetaAscent(list(self.module.parameters()), self._meta_objective(step),
                                cfg.metarm_eta, all_reduce=average)
        with ascent:
            for m, indices in enumerate(self._micro_batches(step)):
                last = m == cfg.grad_accum - 1
                sync = (self.wrapped.no_sync() if self.dist.enabled and not last
                        else contextlib.nullcontext())
                with sync:
                    loss, parts = self._micro_loss(indices)
                    (loss / cfg.grad_accum).backward()
                parts["loss"] = loss.detach()
                for key, value in parts.items():
                    sums[key] = sums[key] + value if key in sums else value
        grad_norm, lr = optimizer_step(self.module.parameters(), self.optimizer, self.scheduler,
                                       cfg.max_grad_norm)
        # every logged number in one tensor: one copy to the host, one all-reduce
        record, tokens = reduce_step_record(sums, self.dist, cfg.grad_accum * self.dist.world_size)
        if isinstance(ascent, MetaAscent):
            record["train/metarm_objective"] = ascent.value
        return finish_step_record(record, lr, grad_norm, tokens)

    def _describe(self) -> str:
        return (f"training on {len(self.train_data)} pairs "
                f"({', '.join(f'{k} {v}' for k, v in self.prepared.summary().items())}; "
                f"{self.train_data.truncation}), {self.total_steps} steps of "
                f"{self.config.batch_size}, {self.dist.world_size} process(es) on {self.device}")

    def train(self) -> RewardTrainResult:
        cfg = self.config
        began = time.perf_counter()
        checkpoints, resumed_from, logger, progress = start_run(
            cfg, dist=self.dist, load=self.load_checkpoint, log=self.log,
            total_steps=self.total_steps, position=lambda: self.step, describe=self._describe,
            desc="reward model")
        metrics: dict[str, dict[str, float]] = {}
        window_start, window_tokens = time.perf_counter(), 0.0
        try:
            while self.step < self.total_steps:
                record = self._train_step(self.step)
                self.step += 1
                window_tokens += record.pop("train/tokens")
                progress.update(1)
                if cfg.log_every and (self.step % cfg.log_every == 0
                                      or self.step == self.total_steps):
                    elapsed = time.perf_counter() - window_start
                    record["train/tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
                    record["train/epoch"] = self.step / self.steps_per_epoch
                    self._record(logger, record)
                    progress.set_postfix(loss=f"{record['train/loss']:.4f}",
                                         acc=f"{record['train/accuracy']:.3f}")
                    window_start, window_tokens = time.perf_counter(), 0.0
                final = self.step == self.total_steps
                if self.eval_data and (final or (cfg.eval_every
                                                 and self.step % cfg.eval_every == 0)):
                    metrics = self.evaluate()
                    self._record(logger, {f"eval/{name}/{key}": value
                                          for name, values in metrics.items()
                                          for key, value in values.items()})
                if checkpoints is not None and (final or (cfg.save_every
                                                          and self.step % cfg.save_every == 0)):
                    self.save_checkpoint(checkpoints)
        finally:
            progress.close()
            logger.close()
        if self.eval_data and not metrics:
            # Resumed from the final checkpoint: nothing left to train, but the caller still
            # gets the final evaluation (already in the history and metrics.jsonl).
            metrics = self.evaluate()
        model_dir = None
        if cfg.output_dir and cfg.save_model and self.dist.is_main:
            model_dir = self.model.save_pretrained(Path(cfg.output_dir) / "model", self.tokenizer)
        self.dist.barrier()
        return RewardTrainResult(self.step, metrics, self.history, resumed_from=resumed_from,
                                 seconds=time.perf_counter() - began, model_dir=model_dir)

    def _record(self, logger: MetricsLogger, values: dict[str, Any]) -> None:
        self.history.append({"step": self.step, **values})
        logger.log(self.step, values)

    # ---- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def score_dataset(self, dataset: PreferenceDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards of chosen, rewards of rejected), float32 [n] on the CPU, in eval mode."""
        was_training = self.module.training
        self.module.eval()
        chosen, rejected = [], []
        size = self.config.eval_batch_size
        try:
            for start in range(0, len(dataset), size):
                batch = self._batch(dataset, range(start, min(start + size, len(dataset))))
                input_ids, attention_mask, response_mask, last_index = self._pair_rows(batch)
                with self._autocast():
                    values, _ = self.module(input_ids, attention_mask)
                rewards = self._scores(values, input_ids, attention_mask, response_mask,
                                       last_index).float().cpu()
                half = len(rewards) // 2
                chosen.append(rewards[:half])
                rejected.append(rewards[half:])
        finally:
            self.module.train(was_training)
        return torch.cat(chosen), torch.cat(rejected)

    def score_pairs(self, pairs: Sequence[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of any pairs, tokenized and truncated as the training pairs are."""
        return self.score_dataset(PreferenceDataset(list(pairs), self.tokenizer, **self.lengths))

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Every evaluation set's accuracy (ties count half), plain BT loss, reward mean and std
        over both sides, and pair count. Computed on the main process, which the others wait
        for."""
        results: dict[str, dict[str, float]] = {}
        if self.dist.is_main:
            for name, dataset in self.eval_data.items():
                chosen, rejected = self.score_dataset(dataset)
                results[name] = pair_metrics(chosen, rejected)
        return self.dist.broadcast_object(results)

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config": dataclasses.asdict(self.config),
                "train_pairs": len(self.train_data), "world_size": self.dist.world_size,
                "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "history": self.history}

    def save_checkpoint(self, checkpoints: CheckpointManager) -> None:
        save_checkpoint(checkpoints, self.step, self.state_dict, self.dist)

    def load_checkpoint(self, path: str | Path) -> int:
        state = load_checkpoint_state(path, self.config, RewardTrainerConfig.RESUME_INVARIANT,
                                      size_key="train_pairs", size=len(self.train_data),
                                      size_name="training pairs")
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        return self.step


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (ties count half), mean BT loss, mean and std of all rewards, pair count."""
    difference = chosen.double() - rejected.double()
    both = torch.cat([chosen, rejected]).double()
    return {"accuracy": float(((difference > 0).double() + 0.5 * (difference == 0).double())
                              .mean()),
            "loss": float(F.softplus(-difference).mean()),
            "reward_mean": float(both.mean()),
            "reward_std": float(both.std(correction=0)),
            "pairs": len(chosen)}


def _as_ranked(meta_set: Sequence[MetaPrompt | RankedExample]) -> list[RankedExample]:
    out = []
    for i, item in enumerate(meta_set):
        if isinstance(item, RankedExample):
            prompt, responses = item.prompt, item.responses
        else:
            prompt, responses = item
        responses = list(responses)
        if len(responses) < 2:
            raise ValueError(f"meta_set[{i}]: MetaRM needs k >= 2 responses per prompt, got "
                             f"{len(responses)}")
        out.append(RankedExample(prompt, responses, [0.0] * len(responses)))
    return out


def _has_dropout(model: torch.nn.Module) -> bool:
    config = model.config
    names = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop",
             "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")
    return any(float(getattr(config, n, 0) or 0) > 0 for n in names)

