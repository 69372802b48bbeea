"""PPO (METHODS.md sections 3 and 5) on a ``transformers`` policy, driven by the engine's ops.

One iteration:

1. rollout: ``prompts_per_iteration`` prompts (a slice of a permutation per pass over the
   prompts), ``samples_per_prompt`` responses each, generated with the KV cache
   (``generate_rollout``) in chunks of ``generation_batch_size`` prompts;
2. per chunk: behaviour log-probs and entropies of the policy and log-probs of the frozen
   reference (``response_logprobs``: token_logprobs, or fused_linear_logprobs on a fusable
   head), the critic's values, and the task rewards (a reward model read as bandit, token or
   segment-dense rewards through the segment ops, or a Python function at the last token);
3. on the whole batch: EOS penalty, clipping and whitening of the task rewards, the KL penalty
   ``R_t = r_t - beta KL_t`` (k1 / k2 / k3, fixed or adaptive beta), GAE (``ops.gae``) and
   advantage whitening over every response token of the batch (``ops.masked_whiten``);
4. ``ppo_epochs`` passes of mini-batches: the clipped surrogate, the clipped value loss and an
   optional entropy bonus, token means through ``ops.masked_mean``; separate AdamW optimizers,
   schedules and gradient clipping for the actor and the critic.

Both models run without dropout (eval mode) throughout, so the first mini-batch's ratio is 1
and a step's result depends on nothing but the weights and the batch.

Determinism and scale-out: chunk c of iteration i is sampled with a seed of (seed, i, c) and
the chunks are shared out among processes; every process then holds the whole batch (it is
small next to the models) and computes the same rewards, advantages and mini-batch orders,
(seed, i, epoch); each takes an equal share of every mini-batch, and losses are normalised by
the token count of the whole mini-batch, so that DDP's gradient average equals the
one-process gradient. A checkpoint after iteration i holds the models, optimizers, schedules
and the KL controller: a resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from rlengine.data.tokenize import pad_token_id, tokenize_prompt
from rlengine.data.types import PromptExample, Text
from rlengine.policy.ppo_config import PPOConfig
from rlengine.policy.rewards import (
    FunctionRewards,
    GoldFunction,
    RewardModelRewards,
    apply_eos_penalty,
    clip_rewards,
    kl_estimate,
    kl_shaped_rewards,
    make_kl_controller,
    whiten_rewards,
)
from rlengine.policy.rollout import (
    Kernels,
    PolicyLogprobs,
    Rollout,
    SamplingConfig,
    action_values,
    check_sequence_length,
    generate_rollout,
    kernel_ops,
    make_critic,
    next_token_entropy,
    response_logprobs,
)
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
    gather_chunks,
    load_checkpoint_state,
    micro_batch_size,
    optimizer_step,
    process_micro_batches,
    reduce_step_record,
    save_checkpoint,
    save_policy,
    start_run,
)
from rlengine.training.metrics import MetricsLogger

# ---- the losses -----------------------------------------------------------------------------


@dataclass
class PPOLoss:
    """Token means over the mask: ``policy`` (clipped surrogate), ``value`` (value loss times
    ``value_loss_weight``), ``entropy``; and statistics: ``clip_fraction`` (tokens whose
    surrogate was clipped), ``value_clip_fraction``, ``approx_kl`` (k3 estimate of
    KL(pi_old || pi) on the batch's tokens)."""

    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor
    clip_fraction: torch.Tensor
    value_clip_fraction: torch.Tensor
    approx_kl: torch.Tensor

    def stats(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach() for name in
                ("policy", "value", "entropy", "clip_fraction", "value_clip_fraction",
                 "approx_kl")}


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                      advantages: torch.Tensor, *, clip_range: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with ``r = exp(log pi -
    log pi_old)``, and whether the clipped term was the larger (the token's gradient is 0)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       *, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: ``0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)`` (PPO2's value
    clipping; ``clip=None``: ``0.5 (V - R)^2``), and whether the clipped term was the larger."""
    unclipped = (values - returns).square()
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
             mask: torch.Tensor, *, clip_range: float = 0.2, value_clip: float | None = 0.2,
             value_loss_weight: float = 0.5, entropy: torch.Tensor | None = None,
             kernels: Kernels = "engine") -> PPOLoss:
    """PPO's losses over the ``mask``'s tokens of token-aligned ``[B, T]`` tensors, each a token
    mean through ``masked_mean``. ``entropy``: the policy's per-token entropies (0 without)."""
    impl = kernel_ops(kernels)
    mask = mask.bool()
    surrogate, clipped = clipped_surrogate(logprobs, old_logprobs, advantages,
                                           clip_range=clip_range)
    value_error, value_clipped = clipped_value_loss(values, old_values, returns, clip=value_clip)
    # k3 of KL(pi_old || pi): the tokens were sampled from pi_old
    approx_kl = kl_estimate(old_logprobs, logprobs.detach(), mask, estimator="k3")
    entropy = torch.zeros_like(logprobs) if entropy is None else entropy
    return PPOLoss(
        policy=impl.masked_mean(surrogate, mask),
        value=value_loss_weight * impl.masked_mean(value_error, mask),
        entropy=impl.masked_mean(entropy, mask),
        clip_fraction=impl.masked_mean(clipped.float(), mask),
        value_clip_fraction=impl.masked_mean(value_clipped.float(), mask),
        approx_kl=impl.masked_mean(approx_kl, mask))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *,
                       kernels: Kernels = "engine") -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over the mask's tokens: 1 for a perfect critic, 0 for one
    that predicts the mean, negative for worse (NaN where the returns do not vary)."""
    impl = kernel_ops(kernels)
    mask = mask.bool()
    variance = impl.masked_var(returns, mask)
    return 1.0 - impl.masked_var(returns - values, mask) / variance


# ---- the experience of one iteration --------------------------------------------------------

# an experience's token-aligned [B, T] float tensors (0 on padding)
_PER_TOKEN = ("logprobs", "entropy", "ref_logprobs", "values", "task_rewards")
_ROLLOUT_TENSORS = ("input_ids", "attention_mask", "response_mask")


@dataclass
class Experience:
    """A rollout batch and what PPO reads from it, token-aligned ``[N, T]`` (see
    rlengine.policy.rollout): behaviour ``logprobs`` and ``entropy``, the reference's
    ``ref_logprobs``, the critic's ``values`` (V of the state each token was chosen in), the
    ``task_rewards`` before shaping, ``scores [N]`` (each response's task reward), ``gold [N]``
    (the gold reward where known), ``segments [N]`` (segment rewards' segment counts); after
    ``shape_rewards``: ``rewards`` (shaped), ``kl``, ``advantages``, ``returns``."""

    rollout: Rollout
    logprobs: torch.Tensor
    entropy: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    task_rewards: torch.Tensor
    scores: torch.Tensor
    gold: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.rollout.response_mask

    def to(self, device: torch.device) -> Experience:
        moved = {f.name: getattr(self, f.name).to(device)
                 for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, rollout=self.rollout.to(device), **moved)


def merge_experiences(parts: Sequence[Experience], pad_id: int) -> Experience:
    """One experience from the chunks' (in order), their prompts re-padded on the left to the
    widest and their responses on the right to the longest, so that every row keeps the
    layout of a rollout (all responses start at one column)."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(p.rollout.prompt_length for p in parts)
    response_width = max(p.rollout.input_ids.shape[1] - p.rollout.prompt_length for p in parts)

    def repad(tensor: torch.Tensor, part: Experience, fill) -> torch.Tensor:
        rows, width = tensor.shape
        start = part.rollout.prompt_length
        out = tensor.new_full((rows, prompt_width + response_width), fill)
        out[:, prompt_width - start:prompt_width] = tensor[:, :start]
        out[:, prompt_width:prompt_width + width - start] = tensor[:, start:]
        return out

    def cat(name: str, fill, owner=lambda p: p) -> torch.Tensor:
        return torch.cat([repad(getattr(owner(p), name), p, fill) for p in parts])

    first = parts[0].rollout
    offsets = torch.tensor([0] + [int(p.rollout.prompt_index.max()) + 1 for p in parts[:-1]]
                           ).cumsum(0)
    rollout = Rollout(
        cat("input_ids", pad_id, lambda p: p.rollout),
        cat("attention_mask", 0, lambda p: p.rollout),
        cat("response_mask", False, lambda p: p.rollout),
        torch.cat([p.rollout.terminated for p in parts]),
        torch.cat([p.rollout.prompt_index + int(o) for p, o in zip(parts, offsets)]),
        prompt_width, [x for p in parts for x in p.rollout.prompts],
        [x for p in parts for x in p.rollout.responses], first.eos_token_id)

    def rows(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    return Experience(rollout, *(cat(name, 0.0) for name in _PER_TOKEN), scores=rows("scores"),
                      gold=rows("gold"), segments=rows("segments"))


def _trimmed(rollout: Rollout, rows: torch.Tensor) -> tuple[Rollout, slice]:
    """The rows of a rollout without the columns that are padding in all of them (left of the
    longest prompt, right of the longest response): the columns to take from per-token
    tensors."""
    part = rollout.select(rows)
    real = part.attention_mask.bool().any(0)
    responses = part.response_mask.any(0).nonzero()
    first = int(real.nonzero()[0]) if real.any() else 0
    last = int(responses[-1]) + 1 if len(responses) else part.input_ids.shape[1]
    columns = slice(first, last)
    trimmed = dataclasses.replace(
        part, input_ids=part.input_ids[:, columns], attention_mask=part.attention_mask[:, columns],
        response_mask=part.response_mask[:, columns], prompt_length=part.prompt_length - first)
    return trimmed, columns


class _CriticValues(torch.nn.Module):
    """What data parallelism wraps for the critic: its action-aligned values (a tensor, which
    DDP can follow, rather than a RewardOutput)."""

    def __init__(self, critic: RewardModel):
        super().__init__()
        self.critic = critic

    def forward(self, input_ids, attention_mask, position_ids):
        return action_values(self.critic(input_ids, attention_mask, position_ids).values)


# ---- the trainer ----------------------------------------------------------------------------

@dataclass
class PPOResult(RunResult):
    """``history``: every logged record (rollout and training numbers per iteration, and the
    evaluations); ``evaluations``: the evaluation records, the first before any training."""

    iterations: int
    steps: int
    history: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]


class PPOTrainer:
    """Train ``policy`` with PPO on ``prompts`` (see PPOConfig for every option).

    Args:
        policy: a ``transformers`` causal LM (trained in place, moved to the trainer's device).
        tokenizer: its tokenizer (an EOS token is required to end responses).
        prompts: strings, conversations or PromptExamples.
        reward_fn: ``fn(prompt, response_text, terminated) -> float``, the reward at the last
            token (e.g. the synthetic task's gold reward); or
        reward_model: a RewardModel sharing the policy's tokenizer, read as
            ``config.reward_kind`` (bandit / token / segment) rewards.
        normalizer: the location-aware normalizer (a_mu, b_mu, a_sigma, b_sigma) of token and
            segment rewards (``LocationNormalizer.load(path).parameters``); None: raw rewards.
        gold_fn: ``fn(prompt, response_text, terminated) -> float`` logged as the rollouts'
            gold reward where one is known (the synthetic task's; may be ``reward_fn`` itself).
        reference_model: the frozen policy of the KL penalty and of segment entropies
            (default: a copy of ``policy`` as given).
        critic: the value model (default: ``make_critic(policy=policy)``, a copy of the
            policy's body with a fresh value head; ``make_critic(reward_model=...)`` starts it
            from a reward model).
        evaluate: ``evaluate(policy) -> {name: number}`` run on the main process before
            training, every ``evaluate_every`` iterations and after the last.
        device: None for cuda:LOCAL_RANK when CUDA is available, else the CPU.
        kernels: "engine" (rlengine.ops) or "reference" (rlengine.ops.reference).
    """

    def __init__(self, policy: torch.nn.Module, tokenizer: Any,
                 prompts: Sequence[Text | PromptExample], config: PPOConfig | None = None, *,
                 reward_fn: GoldFunction | None = None, reward_model: RewardModel | None = None,
                 normalizer: Sequence[float] | None = None, gold_fn: GoldFunction | None = None,
                 reference_model: torch.nn.Module | None = None,
                 critic: RewardModel | None = None,
                 evaluate: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
                 device: str | torch.device | None = None, kernels: Kernels = "engine",
                 log=print):
        self.config = config = config or PPOConfig()
        self.kernels = kernels
        self.ops = kernel_ops(kernels)
        if (reward_fn is None) == (reward_model is None):
            raise ValueError("PPO needs exactly one of reward_fn= or reward_model=")
        if reward_fn is not None and config.reward_kind != "bandit":
            raise ValueError(f"reward_kind {config.reward_kind!r} reads a reward model's "
                             f"per-token values; a reward function gives one reward per "
                             f"response (reward_kind 'bandit')")
        if reward_model is not None and not isinstance(reward_model, RewardModel):
            raise TypeError(f"reward_model must be a RewardModel, got "
                            f"{type(reward_model).__name__}")
        if reward_fn is not None and normalizer is not None:
            raise ValueError("normalizer applies to a reward model's token and segment rewards; "
                             "a reward function has none to normalize")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: responses could never end")
        if critic is not None and not isinstance(critic, RewardModel):
            raise TypeError(f"critic must be a RewardModel, got {type(critic).__name__}")
        self.dist: DistributedContext = init_distributed(device)
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda *_: None)
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.prompts = [p.prompt if isinstance(p, PromptExample) else p for p in prompts]
        if len(self.prompts) < config.prompts_per_iteration:
            raise ValueError(f"prompts_per_iteration ({config.prompts_per_iteration}) is larger "
                             f"than the number of prompts ({len(self.prompts)})")
        self.micro_batch = micro_batch_size(config.mini_batch_size, "mini_batch_size", self.dist,
                                            config.grad_accum)
        self.iterations_per_pass = len(self.prompts) // config.prompts_per_iteration
        self.total_steps = config.iterations * config.steps_per_iteration

        if reward_fn is not None:
            self.rewards = FunctionRewards(reward_fn)
        else:
            self.rewards = RewardModelRewards(
                reward_model.to(self.device).eval(), kind=config.reward_kind,
                threshold=config.segment_threshold, normalizer=normalizer,
                spread=config.dense_spread, clamp=config.dense_clamp, kernels=kernels)
        self.gold_fn = gold_fn
        self.gold_is_reward = gold_fn is not None and gold_fn is reward_fn

        self.policy = policy.to(self.device)
        self.reference = copy.deepcopy(policy if reference_model is None else reference_model)
        self.reference.to(self.device).eval().requires_grad_(False)
        if critic is None:
            # the fresh value head is drawn from the run's seed, not from the global stream
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(random.Random(f"rlengine.ppo.critic/{config.seed}")
                                  .getrandbits(62))
                critic = make_critic(policy=policy)
        self.critic = critic.to(self.device)
        longest_prompt = max(len(tokenize_prompt(PromptExample(p), tokenizer,
                                                 max_length=config.max_prompt_length).input_ids)
                             for p in self.prompts)
        check_sequence_length(
            {"policy": policy, "critic": critic, "reward model": reward_model},
            longest_prompt + config.max_new_tokens, "prompts and responses of max_new_tokens",
            "set max_prompt_length or max_new_tokens so that they fit")
        # No dropout in either model, in rollouts or updates: see the module docstring.
        self.policy.eval()
        self.critic.eval()
        self.actor_module = PolicyLogprobs(self.policy, kernels, temperature=config.temperature,
                                           with_entropy=True)
        self.critic_module = _CriticValues(self.critic)
        self.actor_wrapped = data_parallel(self.actor_module, self.dist)
        self.critic_wrapped = data_parallel(self.critic_module, self.dist)
        self.actor_optimizer, self.actor_scheduler = adamw_with_schedule(
            self.policy.parameters(), self._optimizer_options("actor"), self.total_steps)
        self.critic_optimizer, self.critic_scheduler = adamw_with_schedule(
            self.critic.parameters(), self._optimizer_options("critic"), self.total_steps)
        self.kl_controller = make_kl_controller(config.kl_beta, target=config.kl_target,
                                                horizon=config.kl_horizon)
        self.autocast_dtype = autocast_dtype(config.mixed_precision, self.device)
        self.evaluate_fn = evaluate
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []

    def _optimizer_options(self, model: str) -> SimpleNamespace:
        cfg = self.config
        return SimpleNamespace(
            lr=getattr(cfg, f"{model}_lr"), schedule=getattr(cfg, f"{model}_schedule"),
            warmup_steps=getattr(cfg, f"{model}_warmup_steps"), min_lr_ratio=cfg.min_lr_ratio,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay)

    @property
    def step(self) -> int:
        """Optimizer steps taken."""
        return self.iteration * self.config.steps_per_iteration

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    # ---- rollouts -----------------------------------------------------------------------------

    def _iteration_prompts(self, iteration: int) -> list[Text]:
        size = self.config.prompts_per_iteration
        data_pass, position = divmod(iteration, self.iterations_per_pass)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + data_pass)
        order = torch.randperm(len(self.prompts), generator=generator).tolist()
        return [self.prompts[i] for i in order[position * size:(position + 1) * size]]

    def _sampling_config(self) -> SamplingConfig:
        cfg = self.config
        return SamplingConfig(max_new_tokens=cfg.max_new_tokens, strategy="sample",
                              temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              num_return_sequences=cfg.samples_per_prompt,
                              batch_size=cfg.generation_batch_size)

    def _chunk_experience(self, iteration: int, chunk: int, prompts: list[Text]) -> Experience:
        """Chunk ``chunk`` of an iteration: sampled with a seed of (seed, iteration, chunk),
        then scored."""
        cfg = self.config
        seed = random.Random(f"rlengine.ppo/{cfg.seed}/{iteration}/{chunk}").getrandbits(62)
        rollout = generate_rollout(self.policy, self.tokenizer, prompts, self._sampling_config(),
                                   seed=seed, max_prompt_length=cfg.max_prompt_length,
                                   device=self.device)
        return self.score_rollout(rollout)

    @torch.no_grad()
    def score_rollout(self, rollout: Rollout) -> Experience:
        """A rollout's behaviour log-probs and entropies, reference log-probs, values and task
        rewards (and gold rewards where known)."""
        cfg = self.config
        segment = isinstance(self.rewards, RewardModelRewards) and self.rewards.kind == "segment"
        with self._autocast():
            logprobs, entropy = response_logprobs(self.policy, rollout,
                                                  temperature=cfg.temperature,
                                                  with_entropy=True, kernels=self.kernels)
            reference = response_logprobs(self.reference, rollout, temperature=cfg.temperature,
                                          with_entropy=segment and cfg.temperature == 1.0,
                                          kernels=self.kernels)
            values = action_values(self.critic(rollout.input_ids, rollout.attention_mask,
                                               rollout.position_ids).values)
        next_entropy = None
        if segment:
            if cfg.temperature == 1.0:
                reference, ref_entropy = reference
            else:
                # segment ends are defined by the reference's entropies at temperature 1
                with self._autocast():
                    _, ref_entropy = response_logprobs(self.reference, rollout, with_entropy=True,
                                                       kernels=self.kernels)
            next_entropy = next_token_entropy(ref_entropy)
        task = self.rewards(rollout, next_entropy=next_entropy)
        gold = None
        if self.gold_is_reward:
            gold = task.scores
        elif self.gold_fn is not None:
            gold = torch.tensor(FunctionRewards(self.gold_fn).scores(
                rollout.prompts, rollout.responses, rollout.terminated.tolist()),
                device=self.device)
        return Experience(rollout, logprobs, entropy, reference, values.float(),
                          task.token_rewards, task.scores, gold,
                          task.segments.counts if task.segments is not None else None)

    def _collect(self, iteration: int) -> Experience:
        """The iteration's whole rollout batch on every process: each samples the chunks
        ``chunk % world == rank``, then all exchange them."""
        prompts = self._iteration_prompts(iteration)
        size = self.config.generation_batch_size
        chunks = math.ceil(len(prompts) / size)
        cpu = torch.device("cpu")
        parts = gather_chunks(
            lambda c: self._chunk_experience(iteration, c, prompts[c * size:(c + 1) * size]),
            chunks, self.dist, send=lambda experience: experience.to(cpu))
        experience = merge_experiences(parts, self.pad_id)
        return experience.to(self.device) if self.dist.enabled else experience

    def shape_rewards(self, experience: Experience) -> Experience:
        """Rewards, KL penalty, GAE and advantage whitening over the whole batch, in place."""
        cfg = self.config
        mask = experience.mask
        rollout = experience.rollout
        task = apply_eos_penalty(experience.task_rewards, mask, rollout.terminated,
                                 cfg.eos_penalty)
        task = clip_rewards(task, cfg.reward_clip)
        if cfg.whiten_rewards:
            task = whiten_rewards(task, mask, kernels=self.kernels)
        rewards, kl = kl_shaped_rewards(task, experience.logprobs, experience.ref_logprobs, mask,
                                        beta=self.kl_controller.value,
                                        estimator=cfg.kl_estimator)
        advantages, returns = self.ops.gae(rewards, experience.values, mask, gamma=cfg.gamma,
                                           lam=cfg.lam)
        if cfg.whiten_advantages:
            advantages = self.ops.masked_whiten(advantages, mask)
        experience.rewards, experience.kl = rewards, kl
        experience.advantages, experience.returns = advantages, returns
        return experience

    def _rollout_record(self, experience: Experience) -> dict[str, float]:
        mask = experience.mask
        rollout = experience.rollout
        kl_per_response = experience.kl.sum(-1)
        beta = self.kl_controller.value
        numbers = {
            "rollout/reward": experience.scores.mean(),
            "rollout/kl": kl_per_response.mean(),
            "rollout/kl_coef": torch.tensor(beta, dtype=torch.float64),
            "rollout/non_score_reward": -beta * kl_per_response.mean(),
            "rollout/entropy": self.ops.masked_mean(experience.entropy, mask),
            "rollout/response_length": rollout.response_lengths.float().mean(),
            "rollout/terminated": rollout.terminated.float().mean(),
            "rollout/value_mean": self.ops.masked_mean(experience.values, mask),
            "rollout/return_mean": self.ops.masked_mean(experience.returns, mask),
            "rollout/explained_variance": explained_variance(
                experience.values, experience.returns, mask, kernels=self.kernels)}
        if experience.gold is not None:
            numbers["rollout/gold_reward"] = experience.gold.float().mean()
        if experience.segments is not None:
            numbers["rollout/segments"] = experience.segments.float().mean()
        values = torch.stack([v.detach().double().cpu() for v in numbers.values()]).tolist()
        return dict(zip(numbers, values))

    # ---- the updates --------------------------------------------------------------------------

    def _mini_batches(self, iteration: int, epoch: int) -> list[torch.Tensor]:
        """The epoch's mini-batches: row indices of the rollout batch, in an order of
        (seed, iteration, epoch)."""
        cfg = self.config
        generator = torch.Generator().manual_seed(
            random.Random(f"rlengine.ppo.order/{cfg.seed}/{iteration}/{epoch}").getrandbits(62))
        order = torch.randperm(cfg.rollout_rows, generator=generator)
        return list(order.split(cfg.mini_batch_size))

    def _micro_loss(self, experience: Experience, rows: torch.Tensor, total_tokens: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This process's share of a mini-batch: the loss to back-propagate, scaled so that
        DDP's average over processes is the token mean over the whole mini-batch."""
        cfg = self.config
        rollout, columns = _trimmed(experience.rollout, rows)
        index = rows.to(self.device)

        def take(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[index][:, columns]

        mask = rollout.response_mask
        with self._autocast():
            logprobs, entropy = self.actor_wrapped(rollout.input_ids, rollout.attention_mask,
                                                   mask)
            values = self.critic_wrapped(rollout.input_ids, rollout.attention_mask,
                                         rollout.position_ids)
        loss = ppo_loss(logprobs, take(experience.logprobs), take(experience.advantages),
                        values.float(), take(experience.values), take(experience.returns), mask,
                        clip_range=cfg.clip_range, value_clip=cfg.value_clip,
                        value_loss_weight=cfg.value_loss_weight,
                        entropy=entropy if cfg.entropy_coef else entropy.detach(),
                        kernels=self.kernels)
        share = mask.sum() / total_tokens
        total = loss.policy - cfg.entropy_coef * loss.entropy + loss.value
        scaled = total * share * self.dist.world_size
        parts = {name: value * share for name, value in loss.stats().items()}
        parts["tokens"] = mask.sum().float()
        return scaled, parts

    def _train_step(self, experience: Experience, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        world = self.dist.world_size
        total_tokens = experience.mask[rows.to(self.device)].sum().clamp(min=1)
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.critic_optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        shares = process_micro_batches(rows, self.dist, self.micro_batch, cfg.grad_accum)
        for m, share in enumerate(shares):
            with contextlib.ExitStack() as stack:
                if self.dist.enabled and m < cfg.grad_accum - 1:
                    stack.enter_context(self.actor_wrapped.no_sync())
                    stack.enter_context(self.critic_wrapped.no_sync())
                loss, parts = self._micro_loss(experience, share, total_tokens)
                loss.backward()
            for key, value in parts.items():
                sums[key] = sums[key] + value if key in sums else value
        for name, model, optimizer, scheduler in (
                ("actor", self.policy, self.actor_optimizer, self.actor_scheduler),
                ("critic", self.critic, self.critic_optimizer, self.critic_scheduler)):
            norm, lr = optimizer_step(model.parameters(), optimizer, scheduler, cfg.max_grad_norm)
            if norm is not None:
                sums[f"{name}_grad_norm"] = norm.detach() / world  # summed over processes
            sums[f"{name}_lr"] = torch.tensor(lr / world)
        return sums

    def _train_iteration(self, iteration: int) -> dict[str, Any]:
        cfg = self.config
        experience = self.shape_rewards(self._collect(iteration))
        record = self._rollout_record(experience)
        totals: dict[str, torch.Tensor] = {}
        for epoch in range(cfg.ppo_epochs):
            for rows in self._mini_batches(iteration, epoch):
                for key, value in self._train_step(experience, rows).items():
                    value = value.detach().to(self.device, torch.float64)
                    totals[key] = totals[key] + value if key in totals else value
        train, tokens = reduce_step_record(totals, self.dist, cfg.steps_per_iteration)
        record.update(train)
        record["train/tokens"] = tokens
        self.kl_controller.update(record["rollout/kl"], cfg.rollout_rows)
        return record

    # ---- the loop -----------------------------------------------------------------------------

    def _evaluate(self, logger: MetricsLogger) -> None:
        if self.evaluate_fn is None:
            return
        # the policy stays in eval mode (no dropout) throughout, so this leaves it as it was
        results = evaluate_on_main(self.evaluate_fn, self.policy, self.dist)
        record = {"eval/iteration": self.iteration,
                  **{f"eval/{k}": v for k, v in results.items()}}
        self.evaluations.append({"step": self.iteration, **record})
        self._record(logger, record)
        self.log(f"iteration {self.iteration} " + " ".join(f"{k} {v:.4f}"
                                                           for k, v in results.items()))

    def _record(self, logger: MetricsLogger, values: dict[str, Any]) -> None:
        self.history.append({"step": self.iteration, **values})
        logger.log(self.iteration, values)

    def _describe(self) -> str:
        cfg = self.config
        reward = (f"{self.rewards.kind} rewards of a reward model"
                  if isinstance(self.rewards, RewardModelRewards) else "a reward function")
        return (f"PPO on {len(self.prompts)} prompts: {cfg.iterations} iteration(s) of "
                f"{cfg.rollout_rows} responses, {cfg.ppo_epochs} epoch(s) of "
                f"{cfg.mini_batch_size}-response mini-batches, {reward}, "
                f"{self.dist.world_size} process(es) on {self.device}")

    def train(self) -> PPOResult:
        """Run the remaining iterations (all of them, or those after the newest checkpoint)."""
        cfg = self.config
        began = time.perf_counter()
        checkpoints, resumed_from, logger, progress = start_run(
            cfg, dist=self.dist, load=self.load_checkpoint, log=self.log,
            total_steps=cfg.iterations, position=lambda: self.iteration,
            describe=self._describe, desc="ppo")
        try:
            if self.iteration == 0:
                self._evaluate(logger)
            while self.iteration < cfg.iterations:
                window = time.perf_counter()
                record = self._train_iteration(self.iteration)
                self.iteration += 1
                record["train/tokens_per_second"] = record.pop("train/tokens") / max(
                    time.perf_counter() - window, 1e-9)
                progress.update(1)
                if cfg.log_every and (self.iteration % cfg.log_every == 0
                                      or self.iteration == cfg.iterations):
                    self._record(logger, record)
                    shown = {"reward": record["rollout/reward"], "kl": record["rollout/kl"]}
                    if "rollout/gold_reward" in record:
                        shown["gold"] = record["rollout/gold_reward"]
                    progress.set_postfix(**{k: f"{v:.3f}" for k, v in shown.items()})
                last = self.iteration == cfg.iterations
                if last or (cfg.evaluate_every and self.iteration % cfg.evaluate_every == 0):
                    self._evaluate(logger)
                if checkpoints is not None and (last or (cfg.save_every and
                                                         self.iteration % cfg.save_every == 0)):
                    self.save_checkpoint(checkpoints)
        finally:
            progress.close()
            logger.close()
        model_dir = None
        if cfg.output_dir and cfg.save_model and self.dist.is_main:
            model_dir = save_policy(self.policy, self.tokenizer, cfg.output_dir)
            self.critic.save_pretrained(Path(cfg.output_dir) / "critic", self.tokenizer)
        self.dist.barrier()
        return PPOResult(self.iteration, self.step, self.history, self.evaluations,
                         resumed_from=resumed_from, seconds=time.perf_counter() - began,
                         model_dir=model_dir)

    # ---- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "config": dataclasses.asdict(self.config),
                "prompts": len(self.prompts), "world_size": self.dist.world_size,
                "policy": self.policy.state_dict(), "critic": self.critic.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "actor_scheduler": self.actor_scheduler.state_dict(),
                "critic_scheduler": self.critic_scheduler.state_dict(),
                "kl_controller": self.kl_controller.state_dict(), "history": self.history,
                "evaluations": self.evaluations}

    def save_checkpoint(self, checkpoints: CheckpointManager) -> None:
        save_checkpoint(checkpoints, self.iteration, self.state_dict, self.dist)

    def load_checkpoint(self, path: str | Path) -> int:
        state = load_checkpoint_state(path, self.config, PPOConfig.RESUME_INVARIANT,
                                      size_key="prompts", size=len(self.prompts))
        self.policy.load_state_dict(state["policy"])
        self.critic.load_state_dict(state["critic"])
        for name in ("actor_optimizer", "critic_optimizer", "actor_scheduler",
                     "critic_scheduler", "kl_controller"):
            getattr(self, name).load_state_dict(state[name])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        return self.iteration
