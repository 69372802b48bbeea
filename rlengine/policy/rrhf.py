"""RRHF (METHODS.md section 4): rank k candidate responses per query by their length-normalized
log-probability under the policy, with a hinge ranking loss against their rewards, plus SFT on
the best candidate; candidates come from the current policy (re-sampled every round), from
data sets (chosen / rejected, ranked responses) and from other models' response files.

The unit of work is the optimizer step; a round is ``steps_per_round`` steps on one candidate
set. Step s's queries are a slice of a permutation that depends only on (seed, round, epoch);
each process takes an equal share of every micro-batch; dropout is reseeded from
(seed, step, rank); candidate sampling is seeded per (seed, round, chunk of queries) and the
chunks are shared out among the processes, so the samples do not depend on how many
processes there are. A checkpoint holds the round's candidates, so a run resumed mid-round
trains on the very candidates it was interrupted on: an interrupted run ends exactly where an
uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlengine.data.tokenize import pad_token_id, tokenize_prompt, tokenize_ranked
from rlengine.data.types import PromptExample, RankedExample, Text
from rlengine.policy.rewards import kl_estimate
from rlengine.policy.rollout import (
    Kernels,
    PolicyLogprobs,
    SamplingConfig,
    check_sequence_length,
    generate_rollout,
    kernel_ops,
    sequence_logprobs,
)
from rlengine.policy.rrhf_config import RRHFConfig
from rlengine.reward.model import RewardModel
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
    gather_chunks,
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

RewardFunction = Callable[[Text, str, bool], float]


# ---- the loss -------------------------------------------------------------------------------

@dataclass
class RRHFLoss:
    """Per query ``[M]``: ``loss = rank_weight * rank + sft_weight * sft (+ kl_beta * kl)``,
    its parts, and the candidates' scores p_i ``[N]``."""

    loss: torch.Tensor
    rank: torch.Tensor
    sft: torch.Tensor
    kl: torch.Tensor | None
    scores: torch.Tensor
    best: torch.Tensor


def rrhf_loss(token_logprobs: torch.Tensor, response_mask: torch.Tensor, rewards: torch.Tensor,
              query_index: torch.Tensor, num_queries: int, *, rank_weight: float = 1.0,
              sft_weight: float = 1.0, length_penalty: float = 1.0,
              sft_reduction: str = "sum", ref_logprobs: torch.Tensor | None = None,
              kl_beta: float = 0.0, kl_estimator: str = "k3",
              kernels: Kernels = "engine") -> RRHFLoss:
    """RRHF's loss for N candidates of M queries.

    ``token_logprobs [N, T]``: the policy's log-probs of each candidate's tokens (token-aligned,
    as ``rollout.sequence_logprobs`` gives them); ``response_mask [N, T]``: its response tokens
    (EOS included); ``rewards [N]``; ``query_index [N]``: the query (0..M-1) of each candidate,
    candidates of one query contiguous. Scores ``p_i = sum log pi / |y_i| ** length_penalty``
    (``ops.sequence_scores``); ``rank = sum over r_i < r_j of max(0, p_i - p_j)``
    (``ops.rrhf_rank_loss``); ``sft = -sum log pi`` of the best candidate's tokens (first best
    on ties; token mean with ``sft_reduction="mean"``); with ``kl_beta`` and ``ref_logprobs``
    the mean per-token KL estimate over all the query's candidate tokens.
    """
    if sft_reduction not in ("sum", "mean"):
        raise ValueError(f"sft_reduction must be 'sum' or 'mean', got {sft_reduction!r}")
    impl = kernel_ops(kernels)
    n = token_logprobs.shape[0]
    device = token_logprobs.device
    mask = response_mask.bool()
    query_index = query_index.to(device=device, dtype=torch.long)
    if rewards.shape != (n,) or query_index.shape != (n,):
        raise ValueError(f"rewards and query_index must be [N={n}], got "
                         f"{tuple(rewards.shape)} and {tuple(query_index.shape)}")
    if n and bool((query_index[1:] < query_index[:-1]).any()):
        raise ValueError("candidates of one query must be contiguous, queries in order")
    if n and (int(query_index[0]) < 0 or int(query_index[-1]) >= num_queries):
        raise ValueError(f"query_index must lie in [0, num_queries={num_queries}), got "
                         f"{int(query_index[0])}..{int(query_index[-1])}")
    scores = impl.sequence_scores(token_logprobs, mask, length_penalty=length_penalty)
    counts = torch.bincount(query_index, minlength=num_queries)
    first_row = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n, device=device) - first_row[query_index]
    k_max = max(int(counts.max()) if n else 0, 1)
    grid = (num_queries, k_max)
    score_grid = torch.zeros(grid, dtype=scores.dtype, device=device).index_put(
        (query_index, slot), scores)
    reward_grid = torch.zeros(grid, dtype=torch.float32, device=device).index_put(
        (query_index, slot), rewards.float().to(device))
    valid = torch.zeros(grid, dtype=torch.bool, device=device).index_put(
        (query_index, slot), torch.ones(n, dtype=torch.bool, device=device))
    rank = impl.rrhf_rank_loss(score_grid, reward_grid, valid)
    best_slot = torch.where(valid, reward_grid, float("-inf")).argmax(-1)
    best = (first_row + best_slot).clamp(max=max(n - 1, 0))
    has_candidates = counts > 0
    best_logprobs = torch.where(mask[best], token_logprobs[best], 0.0).sum(-1)
    if sft_reduction == "mean":
        best_logprobs = best_logprobs / mask[best].sum(-1).clamp(min=1)
    sft = torch.where(has_candidates, -best_logprobs, 0.0)
    loss = rank_weight * rank + sft_weight * sft
    kl = None
    if ref_logprobs is not None:
        per_token = kl_estimate(token_logprobs, ref_logprobs, mask, estimator=kl_estimator)
        total = torch.zeros(num_queries, device=device).index_add(0, query_index,
                                                                   per_token.sum(-1))
        tokens = torch.zeros(num_queries, device=device).index_add(
            0, query_index, mask.sum(-1).float())
        kl = total / tokens.clamp(min=1)
        loss = loss + kl_beta * kl
    return RRHFLoss(loss, rank, sft, kl, scores, best)


# ---- candidates -----------------------------------------------------------------------------

@dataclass
class Candidate:
    """One response to a query: its token ids (EOS included when it has one), text, whether it
    terminated, where it came from ("policy", "dataset" or a response file) and its reward."""

    response_ids: list[int]
    text: str
    terminated: bool
    source: str
    reward: float = math.nan


@dataclass
class Query:
    """A prompt, its rendered ids and the candidates that do not change between rounds
    (dataset and response-file responses, with their given scores when the data has them)."""

    prompt: Text
    prompt_ids: list[int]
    fixed: list[Candidate] = field(default_factory=list)


@dataclass
class RRHFResult(RunResult):
    """``history``: every logged record; ``evaluations``: the evaluation records (step, round
    and the evaluator's numbers), the first one before any training."""

    steps: int
    history: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]


class RRHFTrainer:
    """Train ``policy`` with RRHF on ``queries`` (see RRHFConfig for every option).

    Args:
        policy: a ``transformers`` causal LM (trained in place, moved to the trainer's device).
        tokenizer: its tokenizer (an EOS token is required to end samples).
        queries: prompts (strings, conversations or PromptExamples), or RankedExamples whose
            responses are fixed candidates of every round (dataset chosen/rejected, ranked
            responses, other models' outputs) and whose scores are their rewards when there is
            no reward function or model.
        reward_fn: ``fn(prompt, response_text, terminated) -> float``, e.g. the synthetic
            task's gold reward; or
        reward_model: a RewardModel sharing the policy's tokenizer, read at the last token
            (``reward_score_mode="last"``) or averaged over the content tokens
            (``"token_mean"``). With neither, every candidate needs a given score, and
            ``policy_samples`` must be 0.
        reference_model: the frozen policy of the KL term (default: a copy of ``policy`` as
            given), used only when ``kl_beta > 0``.
        evaluate: ``evaluate(policy) -> {name: number}`` run (on the main process) before
            training and after every round, e.g. the synthetic task's gold reward.
        device: None for cuda:LOCAL_RANK when CUDA is available, else the CPU.
        kernels: "engine" (rlengine.ops) or "reference" (rlengine.ops.reference).
    """

    def __init__(self, policy: torch.nn.Module, tokenizer: Any,
                 queries: Sequence[Text | PromptExample | RankedExample],
                 config: RRHFConfig | None = None, *, reward_fn: RewardFunction | None = None,
                 reward_model: RewardModel | None = None, reward_score_mode: str = "last",
                 reference_model: torch.nn.Module | None = None,
                 evaluate: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
                 device: str | torch.device | None = None, kernels: Kernels = "engine",
                 log=print):
        self.config = config = config or RRHFConfig()
        self.kernels = kernels
        self.ops = kernel_ops(kernels)
        if reward_fn is not None and reward_model is not None:
            raise ValueError("give reward_fn or reward_model, not both")
        if reward_model is not None and not isinstance(reward_model, RewardModel):
            raise TypeError(f"reward_model must be a RewardModel, got "
                            f"{type(reward_model).__name__}")
        if reward_score_mode not in ("last", "token_mean"):
            raise ValueError(f"reward_score_mode must be 'last' or 'token_mean', got "
                             f"{reward_score_mode!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: policy samples could never end")
        self.dist: DistributedContext = init_distributed(device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda *_: None)
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.reward_fn = reward_fn
        self.reward_model = reward_model.to(self.device).eval() if reward_model else None
        self.reward_score_mode = reward_score_mode
        self.evaluate_fn = evaluate
        self.queries = self._prepare_queries(queries)
        if not self.queries:
            raise ValueError("queries is empty")
        self.uses_given_scores = reward_fn is None and reward_model is None
        if self.uses_given_scores:
            if config.policy_samples:
                raise ValueError("policy samples need a reward: give reward_fn or reward_model "
                                 "(or set policy_samples to 0 to train on the data's scored "
                                 "responses alone)")
            unscored = [i for i, q in enumerate(self.queries)
                        if any(math.isnan(c.reward) for c in q.fixed)]
            if unscored:
                raise ValueError(f"query {unscored[0]} has candidates without a score, and "
                                 f"there is no reward_fn or reward_model to score them")
        if config.policy_samples == 0 and all(len(q.fixed) < 2 for q in self.queries):
            raise ValueError("no query has 2 or more candidates: set policy_samples > 0 or give "
                             "queries with responses")
        sampled = config.max_new_tokens if config.policy_samples else 0
        check_sequence_length(
            {"policy": policy, "reward model": reward_model},
            max(len(q.prompt_ids) + max([sampled, *(len(c.response_ids) for c in q.fixed)])
                for q in self.queries),
            "prompts and their candidates (policy samples of up to max_new_tokens, the data's "
            "responses)", "set max_prompt_length, max_response_length or max_new_tokens so "
                          "that they fit")

        self.micro_batch = micro_batch_size(config.queries_per_step, "queries_per_step",
                                            self.dist, config.grad_accum)
        self.steps_per_epoch = len(self.queries) // config.queries_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(f"queries_per_step ({config.queries_per_step}) is larger than the "
                             f"number of queries ({len(self.queries)})")
        self.steps_per_round = max(1, int(config.epochs * self.steps_per_epoch))
        self.total_steps = config.rounds * self.steps_per_round

        self.policy = policy.to(self.device)
        self.reference = None
        if config.kl_beta > 0:
            self.reference = copy.deepcopy(policy if reference_model is None
                                           else reference_model).to(self.device).eval()
            self.reference.requires_grad_(False)
        self.module = PolicyLogprobs(self.policy, kernels)
        self.wrapped = data_parallel(self.module, self.dist)
        self.optimizer, self.scheduler = adamw_with_schedule(self.policy.parameters(), config,
                                                             self.total_steps)
        self.autocast_dtype = autocast_dtype(config.mixed_precision, self.device)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.round_candidates: list[list[Candidate]] | None = None
        self.candidates_round: int | None = None
        self.round_stats: dict[str, float] = {}
        self._order: tuple[tuple[int, int], list[int]] | None = None

    # ---- queries and candidates ---------------------------------------------------------------

    def _prepare_queries(self, queries) -> list[Query]:
        cfg = self.config
        prepared = []
        for i, item in enumerate(queries):
            if isinstance(item, RankedExample):
                prompt, responses, scores = item.prompt, list(item.responses), list(item.scores)
                source = item.extra.get("candidate_sources") if item.extra else None
            else:
                prompt = item.prompt if isinstance(item, PromptExample) else item
                responses, scores, source = [], [], None
            prompt_ids = tokenize_prompt(PromptExample(prompt), self.tokenizer,
                                         max_length=cfg.max_prompt_length, index=i).input_ids
            if not prompt_ids:
                raise ValueError(f"query {i}: the prompt has no tokens")
            fixed = []
            if responses:
                tokenized = tokenize_ranked(RankedExample(prompt, responses, scores),
                                            self.tokenizer, index=i)
                eos = self.tokenizer.eos_token_id
                for j, (sequence, text, score) in enumerate(zip(tokenized.responses, responses,
                                                                scores)):
                    ids = sequence.input_ids[sequence.response_start:]
                    if cfg.max_response_length is not None:
                        ids = ids[:cfg.max_response_length]
                    fixed.append(Candidate(list(ids), text if isinstance(text, str) else "",
                                           bool(ids) and ids[-1] == eos,
                                           source[j] if source else "dataset", float(score)))
            prepared.append(Query(prompt, prompt_ids, fixed))
        return prepared

    def _sampling_config(self) -> SamplingConfig:
        cfg = self.config
        return SamplingConfig(
            max_new_tokens=cfg.max_new_tokens,
            strategy="diverse_beam" if cfg.sampling == "diverse_beam" else "sample",
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            num_return_sequences=cfg.policy_samples, num_beam_groups=cfg.num_beam_groups,
            diversity_penalty=cfg.diversity_penalty, batch_size=cfg.generation_batch_size)

    @torch.no_grad()
    def _chunk_candidates(self, round_index: int, chunk: int) -> list[list[Candidate]]:
        """The candidates of one chunk of queries (policy samples, seeded per (seed, round,
        chunk), then the fixed ones), scored."""
        cfg = self.config
        size = cfg.generation_batch_size
        queries = self.queries[chunk * size:(chunk + 1) * size]
        out: list[list[Candidate]] = [[] for _ in queries]
        if cfg.policy_samples:
            seed = random.Random(f"rlengine.rrhf/{cfg.seed}/{round_index}/{chunk}") \
                .getrandbits(62)
            rollout = generate_rollout(self.policy, self.tokenizer, [q.prompt for q in queries],
                                       self._sampling_config(), seed=seed,
                                       max_prompt_length=cfg.max_prompt_length,
                                       device=self.device)
            start = rollout.prompt_length
            for row in range(len(rollout)):
                length = int(rollout.response_mask[row].sum())
                ids = rollout.input_ids[row, start:start + length].tolist()
                out[int(rollout.prompt_index[row])].append(Candidate(
                    ids, rollout.responses[row], bool(rollout.terminated[row]), "policy"))
        for candidates, query in zip(out, queries):
            candidates.extend(dataclasses.replace(c) for c in query.fixed)
        if not self.uses_given_scores:
            self._score(queries, out)
        return out

    def _score(self, queries: list[Query], candidates: list[list[Candidate]]) -> None:
        if self.reward_fn is not None:
            for query, group in zip(queries, candidates):
                for c in group:
                    value = float(self.reward_fn(query.prompt, c.text, c.terminated))
                    if not math.isfinite(value):
                        raise ValueError(f"the reward function returned {value} for prompt "
                                         f"{query.prompt!r}, response {c.text!r}")
                    c.reward = value
            return
        flat = [(q, c) for q, group in zip(queries, candidates) for c in group]
        size = self.config.score_batch_size
        for start in range(0, len(flat), size):
            part = flat[start:start + size]
            batch = self._batch([q.prompt_ids for q, _ in part], [c.response_ids for _, c in part])
            values = self.reward_model(batch["input_ids"], batch["attention_mask"],
                                       batch["position_ids"]).values
            if self.reward_score_mode == "last":
                rewards = RewardModel.score(values, mode="last", last_index=batch["last_index"])
            else:
                content = batch["response_mask"].clone()
                rows = torch.arange(len(part), device=self.device)
                # the response without its final EOS, as token-level reward models read it
                content[rows, batch["last_index"]] &= ~batch["terminated"]
                rewards = RewardModel.score(values, mode="token_mean", response_mask=content)
            for (_, c), value in zip(part, rewards.tolist()):
                c.reward = float(value)

    def _batch(self, prompts: Sequence[list[int]], responses: Sequence[list[int]]
               ) -> dict[str, torch.Tensor]:
        """Rows of prompt (left-padded) + response (right-padded), as rollouts are laid out."""
        prompt_width = max(len(p) for p in prompts)
        response_width = max(max((len(r) for r in responses), default=1), 1)
        rows = len(prompts)
        ids = torch.full((rows, prompt_width + response_width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        response_mask = torch.zeros_like(ids, dtype=torch.bool)
        eos = self.tokenizer.eos_token_id
        terminated = torch.zeros(rows, dtype=torch.bool)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, prompt_width - len(p):prompt_width] = torch.tensor(p)
            mask[i, prompt_width - len(p):prompt_width + len(r)] = 1
            if r:
                ids[i, prompt_width:prompt_width + len(r)] = torch.tensor(r)
                response_mask[i, prompt_width:prompt_width + len(r)] = True
                terminated[i] = r[-1] == eos
        lengths = response_mask.sum(-1)
        last_index = torch.where(lengths > 0, prompt_width + lengths - 1, prompt_width - 1)
        out = {"input_ids": ids, "attention_mask": mask, "response_mask": response_mask,
               "last_index": last_index, "terminated": terminated,
               "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        return {k: v.to(self.device) for k, v in out.items()}

    def _build_round(self, round_index: int) -> None:
        """This round's candidates for every query: each process samples and scores the chunks
        ``chunk % world == rank``, then all processes exchange them."""
        chunks = math.ceil(len(self.queries) / self.config.generation_batch_size)
        parts = gather_chunks(lambda c: self._chunk_candidates(round_index, c), chunks,
                              self.dist)
        self.round_candidates = [group for part in parts for group in part]
        self.candidates_round = round_index
        self.round_stats = _candidate_stats(self.round_candidates)
        self._order = None

    # ---- data order ---------------------------------------------------------------------------

    def _step_queries(self, step: int) -> list[int]:
        size = self.config.queries_per_step
        round_index, within = divmod(step, self.steps_per_round)
        epoch, position = divmod(within, self.steps_per_epoch)
        key = (round_index, epoch)
        if self._order is None or self._order[0] != key:
            generator = torch.Generator().manual_seed(
                self.config.seed * 1_000_003 + round_index * 10_007 + epoch)
            self._order = (key, torch.randperm(len(self.queries), generator=generator).tolist())
        return self._order[1][position * size:(position + 1) * size]

    def _micro_batches(self, step: int) -> list[list[int]]:
        return process_micro_batches(self._step_queries(step), self.dist, self.micro_batch,
                                     self.config.grad_accum)

    # ---- the step -----------------------------------------------------------------------------

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    def _micro_loss(self, query_indices: list[int]):
        cfg = self.config
        prompts, responses, rewards, owner = [], [], [], []
        for slot, q in enumerate(query_indices):
            for c in self.round_candidates[q]:
                prompts.append(self.queries[q].prompt_ids)
                responses.append(c.response_ids)
                rewards.append(c.reward)
                owner.append(slot)
        batch = self._batch(prompts, responses)
        with self._autocast():
            logprobs = self.wrapped(batch["input_ids"], batch["attention_mask"],
                                    batch["response_mask"])
        ref = None
        if self.reference is not None:
            with torch.no_grad(), self._autocast():
                ref = sequence_logprobs(self.reference, batch["input_ids"],
                                        batch["attention_mask"], batch["response_mask"],
                                        kernels=self.kernels)
        reward_tensor = torch.tensor(rewards, dtype=torch.float32, device=self.device)
        out = rrhf_loss(logprobs, batch["response_mask"], reward_tensor,
                        torch.tensor(owner, device=self.device), len(query_indices),
                        rank_weight=cfg.rank_weight, sft_weight=cfg.sft_weight,
                        length_penalty=cfg.length_penalty, sft_reduction=cfg.sft_reduction,
                        ref_logprobs=ref, kl_beta=cfg.kl_beta, kl_estimator=cfg.kl_estimator,
                        kernels=self.kernels)
        loss = out.loss.mean()
        best_rewards = reward_tensor[out.best]
        parts = {"loss": loss.detach(), "rank_loss": out.rank.mean().detach(),
                 "sft_loss": out.sft.mean().detach(),
                 "candidate_reward": _mean_per_query(reward_tensor, owner, len(query_indices)),
                 "best_reward": best_rewards.mean().detach(),
                 "score_mean": out.scores.mean().detach(),
                 "tokens": batch["attention_mask"].sum().float()}
        if out.kl is not None:
            parts["kl"] = out.kl.mean().detach()
        return loss, parts

    def _train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        torch.manual_seed(step_seed(cfg.seed, step, self.dist.rank))
        self.wrapped.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for m, indices in enumerate(self._micro_batches(step)):
            last = m == cfg.grad_accum - 1
            sync = (self.wrapped.no_sync() if self.dist.enabled and not last
                    else contextlib.nullcontext())
            with sync:
                loss, parts = self._micro_loss(indices)
                (loss / cfg.grad_accum).backward()
            for key, value in parts.items():
                sums[key] = sums[key] + value if key in sums else value
        grad_norm, lr = optimizer_step(self.policy.parameters(), self.optimizer, self.scheduler,
                                       cfg.max_grad_norm)
        record, tokens = reduce_step_record(sums, self.dist, cfg.grad_accum * self.dist.world_size)
        return finish_step_record(record, lr, grad_norm, tokens)

    # ---- the loop -----------------------------------------------------------------------------

    def _evaluate(self, logger: MetricsLogger, round_index: int) -> None:
        if self.evaluate_fn is None or not self.config.evaluate_rounds:
            return
        results = evaluate_on_main(self.evaluate_fn, self.policy, self.dist)
        record = {"eval/round": round_index, **{f"eval/{k}": v for k, v in results.items()}}
        self.evaluations.append({"step": self.step, **record})
        self._record(logger, record)
        self.log(f"round {round_index} " + " ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def _describe(self) -> str:
        cfg = self.config
        return (f"RRHF on {len(self.queries)} queries: {cfg.rounds} round(s) of "
                f"{self.steps_per_round} steps of {cfg.queries_per_step} queries, "
                f"{cfg.policy_samples} policy sample(s) per query per round, "
                f"{self.dist.world_size} process(es) on {self.device}")

    def train(self) -> RRHFResult:
        cfg = self.config
        began = time.perf_counter()
        checkpoints, resumed_from, logger, progress = start_run(
            cfg, dist=self.dist, load=self.load_checkpoint, log=self.log,
            total_steps=self.total_steps, position=lambda: self.step, describe=self._describe,
            desc="rrhf")
        window_start, window_tokens = time.perf_counter(), 0.0
        try:
            if self.step == 0:
                self._evaluate(logger, 0)
            while self.step < self.total_steps:
                round_index = self.step // self.steps_per_round
                if self.candidates_round != round_index:
                    self._build_round(round_index)
                record = self._train_step(self.step)
                self.step += 1
                window_tokens += record.pop("train/tokens")
                progress.update(1)
                round_end = self.step % self.steps_per_round == 0
                if cfg.log_every and (self.step % cfg.log_every == 0 or round_end):
                    elapsed = time.perf_counter() - window_start
                    record["train/tokens_per_second"] = window_tokens / max(elapsed, 1e-9)
                    record["train/round"] = round_index
                    record.update({f"round/{k}": v for k, v in self.round_stats.items()})
                    self._record(logger, record)
                    progress.set_postfix(loss=f"{record['train/loss']:.3f}",
                                         best=f"{record['train/best_reward']:.3f}")
                    window_start, window_tokens = time.perf_counter(), 0.0
                if round_end:
                    self._evaluate(logger, round_index + 1)
                if checkpoints is not None and (round_end or (cfg.save_every and
                                                              self.step % cfg.save_every == 0)):
                    self.save_checkpoint(checkpoints)
        finally:
            progress.close()
            logger.close()
        model_dir = None
        if cfg.output_dir and cfg.save_model and self.dist.is_main:
            model_dir = save_policy(self.policy, self.tokenizer, cfg.output_dir)
        self.dist.barrier()
        return RRHFResult(self.step, self.history, self.evaluations, resumed_from=resumed_from,
                          seconds=time.perf_counter() - began, model_dir=model_dir)

    def _record(self, logger: MetricsLogger, values: dict[str, Any]) -> None:
        self.history.append({"step": self.step, **values})
        logger.log(self.step, values)

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "config": dataclasses.asdict(self.config),
                "queries": len(self.queries), "world_size": self.dist.world_size,
                "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "history": self.history,
                "evaluations": self.evaluations, "candidates_round": self.candidates_round,
                "candidates": [[dataclasses.asdict(c) for c in group]
                               for group in self.round_candidates or []]}

    def save_checkpoint(self, checkpoints: CheckpointManager) -> None:
        save_checkpoint(checkpoints, self.step, self.state_dict, self.dist)

    def load_checkpoint(self, path: str | Path) -> int:
        state = load_checkpoint_state(path, self.config, RRHFConfig.RESUME_INVARIANT,
                                      size_key="queries", size=len(self.queries))
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        if state["candidates"]:
            self.round_candidates = [[Candidate(**c) for c in group]
                                     for group in state["candidates"]]
            self.candidates_round = state["candidates_round"]
            self.round_stats = _candidate_stats(self.round_candidates)
        return self.step


def _mean_per_query(rewards: torch.Tensor, owner: list[int], queries: int) -> torch.Tensor:
    index = torch.tensor(owner, device=rewards.device)
    total = torch.zeros(queries, device=rewards.device).index_add(0, index, rewards)
    count = torch.zeros(queries, device=rewards.device).index_add(0, index,
                                                                   torch.ones_like(rewards))
    return (total / count.clamp(min=1)).mean()


def _candidate_stats(candidates: list[list[Candidate]]) -> dict[str, float]:
    """A round's candidate rewards: mean over all, over policy samples, mean of each query's
    best, and the share of policy samples that terminated."""
    every = [c.reward for group in candidates for c in group]
    sampled = [c for group in candidates for c in group if c.source == "policy"]
    best = [max(c.reward for c in group) for group in candidates if group]
    stats = {"candidate_reward_mean": sum(every) / max(len(every), 1),
             "best_reward_mean": sum(best) / max(len(best), 1)}
    if sampled:
        stats["policy_sample_reward_mean"] = sum(c.reward for c in sampled) / len(sampled)
        stats["policy_sample_terminated"] = sum(c.terminated for c in sampled) / len(sampled)
    return stats

