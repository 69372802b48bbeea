"""Rollouts: batched generation from a policy, the tensors PPO and RRHF consume, the per-token
log-probs of the responses through the engine's kernels, and the critic.

Layout of a rollout (``Rollout``), one row per response::

    columns  0 .. P-1                       P .. T-1
             <pad> <pad> p0 p1 p2 p3         r0 r1 r2 <eos> <pad> <pad>
             prompt, left-padded             response, right-padded

Every prompt ends at column P - 1 and every response starts at column P, so the batch is what
``generate`` produced (no re-padding between generation and training), and position ids count
real tokens only (``cumsum(attention_mask) - 1``: what ``generate`` used), so a left-padded
row scores exactly as the same row unpadded.

Per-token tensors that the policy code computes (log-probs, entropies, values, rewards) are
*token-aligned* ``[B, T]``: column ``t`` belongs to token ``input_ids[:, t]``; for log-probs,
``log pi(input_ids[t] | input_ids[<t])``; 0 outside the response.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from rlengine import ops
from rlengine.data.tokenize import pad_token_id, tokenize_prompt
from rlengine.data.types import PromptExample, Text
from rlengine.ops import reference as reference_ops
from rlengine.reward.model import RewardModel

if TYPE_CHECKING:  # transformers' model classes load when a model is first built (seconds)
    from transformers import PreTrainedModel

IGNORE_INDEX = -100
Strategy = Literal["sample", "greedy", "diverse_beam"]
STRATEGIES = ("sample", "greedy", "diverse_beam")
Kernels = Literal["engine", "reference"]

# Model types whose logits are exactly ``lm_head(last_hidden_state)`` (no soft-capping, logit
# scaling or extra projection after the head), so the fused linear + log-prob op may replace
# the head. Others take the logits path unless ``fused=True`` insists.
FUSABLE_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2",
    "gpt_neox", "phi", "phi3", "olmo", "olmo2", "starcoder2", "gemma", "gpt_bigcode"})


def kernel_ops(kernels: str):
    """The op namespace a trainer computes with: ``rlengine.ops`` ("engine", the fused
    kernels) or ``rlengine.ops.reference`` ("reference", the eager definitions)."""
    if kernels == "engine":
        return ops
    if kernels == "reference":
        return reference_ops
    raise ValueError(f"kernels must be 'engine' or 'reference', got {kernels!r}")


# ---- the rollout ----------------------------------------------------------------------------

@dataclass
class Rollout:
    """Prompts and their generated responses, in the layout of the module docstring.

    ``input_ids``, ``attention_mask`` (long 0/1) and ``response_mask`` (bool: the response's
    tokens, EOS included when it was generated) are ``[B, T]``; ``terminated [B]`` says whether
    the response ended with EOS (else generation hit ``max_new_tokens``); ``prompt_index [B]``
    the prompt each row answers (several rows per prompt with ``num_return_sequences > 1``);
    ``prompts`` (one per row) and ``responses`` are the texts (responses decoded without EOS).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    terminated: torch.Tensor
    prompt_index: torch.Tensor
    prompt_length: int
    prompts: list[Text] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        if self.input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(shape)}")
        for name in ("attention_mask", "response_mask"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} must have input_ids' shape {tuple(shape)}, got "
                                 f"{tuple(getattr(self, name).shape)}")
        for name in ("terminated", "prompt_index"):
            if getattr(self, name).shape != shape[:1]:
                raise ValueError(f"{name} must be [B={shape[0]}], got "
                                 f"{tuple(getattr(self, name).shape)}")
        if not 0 <= self.prompt_length <= shape[1]:
            raise ValueError(f"prompt_length must be in [0, {shape[1]}], got {self.prompt_length}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counting real tokens only (what ``generate`` used for left padding)."""
        return position_ids(self.attention_mask)

    @property
    def last_index(self) -> torch.Tensor:
        """[B]: the column of each response's last token (EOS when it terminated)."""
        return last_response_index(self.response_mask)

    @property
    def content_mask(self) -> torch.Tensor:
        """The response without its final EOS: the tokens a token- or segment-level reward
        model scores (METHODS.md section 3: EOS is never a segment end)."""
        rows = torch.arange(len(self), device=self.input_ids.device)
        mask = self.response_mask.clone()
        mask[rows, self.last_index] &= ~self.terminated.to(mask.device)
        return mask

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def to(self, device: str | torch.device) -> Rollout:
        return replace(self, **{name: getattr(self, name).to(device) for name in
                                ("input_ids", "attention_mask", "response_mask", "terminated",
                                 "prompt_index")})

    def select(self, rows: Sequence[int] | torch.Tensor) -> Rollout:
        """The rollout of some rows (a mini-batch), in that order."""
        index = torch.as_tensor(rows, dtype=torch.long)
        picked = index.tolist()
        tensors = {name: getattr(self, name)[index.to(getattr(self, name).device)]
                   for name in ("input_ids", "attention_mask", "response_mask", "terminated",
                                "prompt_index")}
        return replace(self, **tensors,
                       prompts=[self.prompts[i] for i in picked] if self.prompts else [],
                       responses=[self.responses[i] for i in picked] if self.responses else [])


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1``, 0 on padding: positions of real tokens whatever the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decode_step(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache: Any) -> tuple[torch.Tensor, Any]:
    """One step of incremental decoding: the logits of ``input_ids`` (the new tokens; the whole
    prompt on the first step, ``cache`` None) given the KV cache of the tokens before them, and
    the grown cache. ``attention_mask`` covers all tokens so far."""
    name = _cache_argument(type(model))
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids(attention_mask)[:, -input_ids.shape[1]:],
                use_cache=True, **{name: cache})
    return out.logits, getattr(out, name)


@functools.cache
def _cache_argument(model_class: type) -> str:
    """What the model's forward calls its KV cache: ``cache`` in current transformers, which
    deprecated ``past_key_values`` (removed in 5.40, a FutureWarning on every call until then);
    ``past_key_values`` in the versions before the rename."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def last_response_index(response_mask: torch.Tensor) -> torch.Tensor:
    """[B]: the last column where ``response_mask`` is true (0 for an empty row)."""
    columns = torch.arange(response_mask.shape[-1], device=response_mask.device)
    return torch.where(response_mask.bool(), columns, 0).amax(-1)


# ---- generation -----------------------------------------------------------------------------

@dataclass
class SamplingConfig:
    """How responses are generated.

    ``strategy``: "sample" (temperature, top-p, top-k), "greedy", or "diverse_beam" (diverse
    beam search, Vijayakumar et al. 2016: ``num_beams`` beams in ``num_beam_groups`` groups,
    each group penalized by ``diversity_penalty`` for every token the earlier groups chose at
    that step; RRHF's "DBS" candidates). ``num_return_sequences`` responses come back per
    prompt (for diverse beam search, the best by ``score / length ** length_penalty`` over all
    beams).
    """

    max_new_tokens: int = 64
    strategy: Strategy = "sample"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_return_sequences: int = 1
    num_beams: int | None = None
    num_beam_groups: int | None = None
    diversity_penalty: float = 1.0
    length_penalty: float = 1.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        for name in ("max_new_tokens", "num_return_sequences", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.diversity_penalty < 0:
            raise ValueError(f"diversity_penalty must be >= 0, got {self.diversity_penalty}")
        if self.strategy == "greedy" and self.num_return_sequences > 1:
            raise ValueError("strategy 'greedy' gives one response per prompt; "
                             f"num_return_sequences is {self.num_return_sequences}")
        if self.strategy == "diverse_beam":
            beams, groups = self.beams, self.groups
            if beams < self.num_return_sequences:
                raise ValueError(f"num_beams ({beams}) must be >= num_return_sequences "
                                 f"({self.num_return_sequences})")
            if groups < 1 or beams % groups:
                raise ValueError(f"num_beams ({beams}) must be a multiple of num_beam_groups "
                                 f"({groups})")

    @property
    def beams(self) -> int:
        return self.num_beams or self.num_return_sequences

    @property
    def groups(self) -> int:
        return self.num_beam_groups or self.beams


def generate_rollout(model: PreTrainedModel, tokenizer: Any,
                     prompts: Sequence[Text | PromptExample], config: SamplingConfig | None = None,
                     *, seed: int | None = None, max_prompt_length: int | None = None,
                     device: str | torch.device | None = None) -> Rollout:
    """Generate ``config.num_return_sequences`` responses to each prompt (rows grouped by
    prompt, in order) with the KV cache, ``config.batch_size`` prompts per call.

    Prompts are rendered as the data layer renders them before a response (chat template for
    conversations) and cut from the left to ``max_prompt_length`` tokens. Sampling draws from
    torch's generator seeded by ``(seed, batch)`` inside a forked RNG state (the caller's
    stream is untouched), so a seed gives the same rollout whatever ran before; ``seed=None``
    draws from the current global stream.
    """
    config = config or SamplingConfig()
    eos = tokenizer.eos_token_id
    pad = pad_token_id(tokenizer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    examples = [p if isinstance(p, PromptExample) else PromptExample(p) for p in prompts]
    if not examples:
        raise ValueError("no prompts to generate from")
    encoded = [tokenize_prompt(e, tokenizer, max_length=max_prompt_length, index=i).input_ids
               for i, e in enumerate(examples)]
    if any(not ids for ids in encoded):
        raise ValueError("a prompt has no tokens: generation needs at least one")
    n = config.num_return_sequences
    pieces = []
    was_training = model.training
    model.eval()
    try:
        for batch_number, start in enumerate(range(0, len(encoded), config.batch_size)):
            rows = encoded[start:start + config.batch_size]
            prompt_ids, prompt_mask = _left_pad(rows, pad)
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
            with _seeded(seed, batch_number, device):
                responses = _generate(model, prompt_ids, prompt_mask, config, eos, pad)
            pieces.append((prompt_ids.repeat_interleave(n, 0),
                           prompt_mask.repeat_interleave(n, 0), responses))
    finally:
        model.train(was_training)
    return _assemble(pieces, [e.prompt for e in examples], n, tokenizer, eos, pad)


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


@contextlib.contextmanager
def _seeded(seed: int | None, batch: int, device: torch.device):
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(random.Random(f"rlengine.rollout/{seed}/{batch}").getrandbits(63))
        yield


def _generate(model, prompt_ids, prompt_mask, config: SamplingConfig, eos, pad) -> torch.Tensor:
    """[b * n, L] response tokens (everything after the prompt, pad after EOS)."""
    if config.strategy == "diverse_beam":
        return diverse_beam_search(model, prompt_ids, prompt_mask, num_beams=config.beams,
                                   num_beam_groups=config.groups,
                                   diversity_penalty=config.diversity_penalty,
                                   length_penalty=config.length_penalty,
                                   max_new_tokens=config.max_new_tokens, eos_token_id=eos,
                                   pad_token_id=pad,
                                   num_return_sequences=config.num_return_sequences)
    sample = config.strategy == "sample"
    # A full GenerationConfig, not keyword overrides: a checkpoint's own generation_config
    # (top_k=50, repetition penalties, ...) must not leak into the rollout's distribution.
    from transformers import GenerationConfig

    generation = GenerationConfig(
        do_sample=sample, max_new_tokens=config.max_new_tokens,
        temperature=config.temperature if sample else None, top_p=config.top_p if sample else None,
        top_k=config.top_k if sample else None, num_return_sequences=config.num_return_sequences,
        eos_token_id=eos, pad_token_id=pad, use_cache=True)
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                         generation_config=generation)
    return out[:, prompt_ids.shape[1]:]


@torch.no_grad()
def diverse_beam_search(model: PreTrainedModel, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, *, num_beams: int, num_beam_groups: int,
                        diversity_penalty: float, max_new_tokens: int, eos_token_id: int | None,
                        pad_token_id: int, num_return_sequences: int,
                        length_penalty: float = 1.0) -> torch.Tensor:
    """Diverse beam search with Hamming diversity over left-padded prompts; returns the
    ``num_return_sequences`` best responses per prompt, ``[B * n, L]``, pad after EOS.

    The beams are split into groups of ``num_beams / num_beam_groups``; at every step group
    ``g`` extends its beams by ordinary beam search on ``log p - diversity_penalty * count``,
    where ``count[v]`` is how many beams of the groups before ``g`` chose token ``v`` at this
    step. A beam that produced EOS stays in its group with its score and continues with pad
    only. Responses are ranked by ``score / length ** length_penalty`` (length with EOS).
    """
    batch = input_ids.shape[0]
    width = num_beams // num_beam_groups
    device = input_ids.device
    ids = input_ids.repeat_interleave(num_beams, 0)
    mask = attention_mask.repeat_interleave(num_beams, 0)
    scores = torch.zeros(batch, num_beam_groups, width, device=device)
    scores[:, :, 1:] = float("-inf")  # each group starts from one beam: distinct first tokens
    scores = scores.view(batch, num_beams)
    finished = torch.zeros(batch * num_beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * num_beams, dtype=torch.long, device=device)
    tokens = torch.empty(batch * num_beams, 0, dtype=torch.long, device=device)
    offsets = (torch.arange(batch, device=device) * num_beams).unsqueeze(1)
    step_ids, cache = ids, None
    for _ in range(max_new_tokens):
        logits, cache = decode_step(model, step_ids, mask, cache)
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        vocab = logp.shape[-1]
        # a finished beam's only continuation: pad, at no cost
        logp = torch.where(finished.unsqueeze(1), float("-inf"), logp)
        logp[finished, pad_token_id] = 0.0
        logp = logp.view(batch, num_beams, vocab)
        done = finished.view(batch, num_beams)
        chosen_counts = torch.zeros(batch, vocab, device=device)
        new_scores, sources, new_tokens = [], [], []
        for group in range(num_beam_groups):
            beams = slice(group * width, (group + 1) * width)
            penalty = diversity_penalty * chosen_counts.unsqueeze(1)
            penalty = torch.where(done[:, beams].unsqueeze(-1), 0.0, penalty)
            candidates = scores[:, beams].unsqueeze(-1) + logp[:, beams] - penalty
            top, index = candidates.reshape(batch, width * vocab).topk(width, dim=-1)
            source = index // vocab + group * width
            token = index % vocab
            live = ~done.gather(1, source)
            chosen_counts.scatter_add_(1, token, live.float())
            new_scores.append(top)
            sources.append(source)
            new_tokens.append(token)
        scores = torch.cat(new_scores, 1)
        source = (torch.cat(sources, 1) + offsets).reshape(-1)
        token = torch.cat(new_tokens, 1).reshape(-1)
        was_finished = finished[source]
        lengths = lengths[source] + (~was_finished).long()
        finished = was_finished | ((token == eos_token_id) if eos_token_id is not None
                                   else torch.zeros_like(was_finished))
        tokens = torch.cat([tokens[source], token.unsqueeze(1)], 1)
        cache.reorder_cache(source)
        mask = torch.cat([mask[source], torch.ones_like(mask[:, :1])], 1)
        step_ids = token.unsqueeze(1)
        if bool(finished.all()):
            break
    normalized = scores / lengths.view(batch, num_beams).clamp(min=1).float() ** length_penalty
    best = normalized.topk(num_return_sequences, dim=-1).indices + offsets
    return tokens[best.reshape(-1)]


def _assemble(pieces, prompts: list[Text], n: int, tokenizer, eos: int | None, pad: int
              ) -> Rollout:
    """One rollout from the batches: prompts re-padded on the left to the widest, responses cut
    after their EOS and re-padded on the right to the longest."""
    prompt_width = max(p.shape[1] for p, _, _ in pieces)
    response_rows: list[torch.Tensor] = []
    terminated: list[bool] = []
    for _, _, responses in pieces:
        for row in responses.cpu():
            ends = (row == eos).nonzero() if eos is not None else torch.empty(0, 1)
            length = int(ends[0]) + 1 if len(ends) else len(row)
            response_rows.append(row[:length])
            terminated.append(bool(len(ends)))
    response_width = max(len(r) for r in response_rows)
    rows = len(response_rows)
    device = pieces[0][0].device
    input_ids = torch.full((rows, prompt_width + response_width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    at = 0
    for prompt_ids, prompt_mask, _ in pieces:
        width = prompt_ids.shape[1]
        input_ids[at:at + len(prompt_ids), prompt_width - width:prompt_width] = prompt_ids.cpu()
        attention_mask[at:at + len(prompt_ids), prompt_width - width:prompt_width] = \
            prompt_mask.cpu()
        at += len(prompt_ids)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    texts = []
    for i, row in enumerate(response_rows):
        input_ids[i, prompt_width:prompt_width + len(row)] = row
        attention_mask[i, prompt_width:prompt_width + len(row)] = 1
        response_mask[i, prompt_width:prompt_width + len(row)] = True
        content = row[:-1] if terminated[i] else row
        texts.append(tokenizer.decode(content.tolist(), skip_special_tokens=False))
    prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
    return Rollout(input_ids.to(device), attention_mask.to(device), response_mask.to(device),
                   torch.tensor(terminated, device=device), prompt_index.to(device), prompt_width,
                   [prompts[i] for i in prompt_index.tolist()], texts, eos)


# ---- log-probs ------------------------------------------------------------------------------

def fusable_head(model: PreTrainedModel, fused: bool | None = None) -> torch.nn.Linear | None:
    """The LM head to hand to ``fused_linear_logprobs`` instead of forming the logits, or None
    for the logits path. ``fused=None`` decides by the model type (FUSABLE_MODEL_TYPES),
    ``True`` insists (an error if the head is not a plain Linear), ``False`` never fuses."""
    if fused is False:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    has_body = getattr(model, "base_model", model) is not model
    usable = isinstance(head, torch.nn.Linear) and has_body
    if fused is True:
        if not usable:
            raise ValueError(f"fused=True needs a causal LM with a body (base_model) and a "
                             f"Linear LM head; {type(model).__name__} has "
                             f"{type(head).__name__ if head is not None else 'no head'}")
        return head
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return head if usable and model_type in FUSABLE_MODEL_TYPES else None


def sequence_logprobs(model: PreTrainedModel, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, response_mask: torch.Tensor, *,
                      temperature: float = 1.0, with_entropy: bool = False,
                      kernels: Kernels = "engine", fused: bool | None = None,
                      positions: torch.Tensor | None = None):
    """Token-aligned log-probs ``[B, T]`` (float32) of the tokens where ``response_mask`` is
    true under ``softmax(logits / temperature)``, 0 elsewhere; with ``with_entropy`` also the
    entropy of the distribution each of those tokens was drawn from (0 elsewhere).

    Differentiable. With a fusable head (see ``fusable_head``) the body's last hidden states
    and the head's weight go through ``fused_linear_logprobs``, so the ``[B, T, V]`` logits are
    never formed; otherwise the model's logits go through ``token_logprobs``. Only the columns
    from the first response token on are computed. ``positions`` defaults to
    ``cumsum(attention_mask) - 1`` (correct for left and right padding alike).
    """
    if response_mask.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and response_mask "
                         f"{tuple(response_mask.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)}")
    impl = kernel_ops(kernels)
    batch, width = input_ids.shape
    response_mask = response_mask.bool()
    if response_mask[:, 0].any():
        raise ValueError("response_mask is true in column 0: a response token needs a prompt "
                         "token before it to be predicted from")
    columns = response_mask.any(0).nonzero()
    zeros = torch.zeros(batch, width, dtype=torch.float32, device=input_ids.device)
    if len(columns) == 0:
        return (zeros, zeros.clone()) if with_entropy else zeros
    first = int(columns[0])
    positions = position_ids(attention_mask) if positions is None else positions
    # labels: token t + 1 predicted at position t, for t in [first - 1, T - 1)
    labels = torch.where(response_mask[:, first:], input_ids[:, first:], IGNORE_INDEX)
    head = fusable_head(model, fused)
    if head is not None:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=positions, use_cache=False).last_hidden_state
        hidden = hidden[:, first - 1:-1]
        weight = head.weight
        result = impl.fused_linear_logprobs(
            hidden.to(weight.dtype), weight, labels, head.bias, temperature=temperature,
            ignore_index=IGNORE_INDEX, with_entropy=with_entropy)
    else:
        kwargs = {}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = width - first + 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=positions, use_cache=False, **kwargs).logits
        logits = logits[:, logits.shape[1] - (width - first + 1):-1]
        result = impl.token_logprobs(logits, labels, temperature=temperature,
                                     ignore_index=IGNORE_INDEX, with_entropy=with_entropy)
    if not with_entropy:
        return F.pad(result.float(), (first, 0))
    logprobs, entropy = result
    return F.pad(logprobs.float(), (first, 0)), F.pad(entropy.float(), (first, 0))


def response_logprobs(model: PreTrainedModel, rollout: Rollout, *, temperature: float = 1.0,
                      with_entropy: bool = False, kernels: Kernels = "engine",
                      fused: bool | None = None):
    """``sequence_logprobs`` of a rollout's responses (EOS included): ``[B, T]`` log-probs,
    and entropies with ``with_entropy``. Call under ``torch.no_grad()`` for the frozen
    reference policy and for the behaviour log-probs of PPO."""
    return sequence_logprobs(model, rollout.input_ids, rollout.attention_mask,
                             rollout.response_mask, temperature=temperature,
                             with_entropy=with_entropy, kernels=kernels, fused=fused)


def next_token_entropy(entropy: torch.Tensor) -> torch.Tensor:
    """Token-aligned entropies (column t: the distribution that drew token t) shifted to the
    alignment of ``ops.entropy_segments`` (column t: the distribution that predicts token
    t + 1). The last column gets 0; it never matters, the last response token always ends its
    segment."""
    return F.pad(entropy[:, 1:], (0, 1))


class PolicyLogprobs(torch.nn.Module):
    """What data parallelism wraps for a trainer of the policy: the policy computing the
    token-aligned log-probs (and entropies with ``with_entropy``) of given responses through
    ``sequence_logprobs`` (the fused LM-head path inside), so that DDP's hooks reduce every
    parameter's gradient."""

    def __init__(self, policy: PreTrainedModel, kernels: Kernels = "engine", *,
                 temperature: float = 1.0, with_entropy: bool = False):
        super().__init__()
        self.policy = policy
        self.kernels = kernels
        self.temperature = temperature
        self.with_entropy = with_entropy

    def forward(self, input_ids, attention_mask, response_mask):
        return sequence_logprobs(self.policy, input_ids, attention_mask, response_mask,
                                 temperature=self.temperature, with_entropy=self.with_entropy,
                                 kernels=self.kernels)


# ---- sequence lengths -----------------------------------------------------------------------

def learned_position_limit(model: torch.nn.Module) -> int | None:
    """How many positions ``model`` (a causal LM, a base model or a RewardModel) has learned
    embeddings for (GPT-2's ``wpe``, OPT's ``embed_positions``): past it, its forward fails
    with an index error deep inside the embedding. None for models without such a table
    (rotary, ALiBi or relative positions), which have no hard limit."""
    body = model.backbone if isinstance(model, RewardModel) else getattr(model, "base_model",
                                                                         model)
    limit = getattr(getattr(body, "config", None), "max_position_embeddings", None)
    if limit is None:
        return None
    for name, module in body.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, torch.nn.Embedding) and ("pos" in leaf or leaf == "wpe"):
            return int(limit)
    return None


def check_sequence_length(models: dict[str, torch.nn.Module | None], longest: int,
                          what: str, advice: str) -> None:
    """A ValueError, before any step runs, when sequences of ``longest`` tokens (``what``
    says what they are) do not fit one of the named models' learned position tables."""
    for name, model in models.items():
        limit = None if model is None else learned_position_limit(model)
        if limit is not None and longest > limit:
            raise ValueError(f"{what} reach {longest} tokens, but the {name} has learned "
                             f"position embeddings for {limit} only; {advice}")


# ---- the critic -----------------------------------------------------------------------------

def make_critic(*, policy: PreTrainedModel | None = None,
                reward_model: RewardModel | None = None,
                head_init_std: float | None = None) -> RewardModel:
    """PPO's value model: a backbone with a bias-free value head at every position (a
    RewardModel, whose ``values [B, T]`` are V(s_t)). From ``policy``: a copy of its body with
    a fresh head (the segment-reward paper's choice; ``head_init_std`` as RewardModel's); from
    ``reward_model``: a copy of it, head included. The argument itself is never modified."""
    if (policy is None) == (reward_model is None):
        raise ValueError("make_critic needs exactly one of policy= or reward_model=")
    if reward_model is not None:
        if not isinstance(reward_model, RewardModel):
            raise TypeError(f"reward_model must be a RewardModel, got "
                            f"{type(reward_model).__name__}")
        return copy.deepcopy(reward_model)
    from transformers import PreTrainedModel

    if not isinstance(policy, PreTrainedModel):
        raise TypeError(f"policy must be a transformers PreTrainedModel, got "
                        f"{type(policy).__name__}")
    return RewardModel(copy.deepcopy(policy.base_model), head_init_std=head_init_std)


@torch.no_grad()
def critic_values(critic: RewardModel, rollout: Rollout) -> torch.Tensor:
    """The critic's values ``[B, T]`` on a rollout (left padding handled by position ids)."""
    return critic(rollout.input_ids, rollout.attention_mask, rollout.position_ids).values


def action_values(values: torch.Tensor) -> torch.Tensor:
    """Per-position critic values ``[B, T]`` (column t: the state after token t) shifted to the
    token alignment of log-probs and rewards: column t gets V of the state *before* token t,
    the state in which token t was chosen (column 0 gets 0; it is never a response token)."""
    return F.pad(values[:, :-1], (1, 0))
