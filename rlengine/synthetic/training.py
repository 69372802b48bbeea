"""Small training and sampling helpers for the synthetic task: encoding, sampling from a policy,
SFT on demonstrations, and a probe reward model (backbone + linear head, plain BT loss).

They calibrate the task (does SFT raise the gold reward, how accurate is a small reward model
trained on clean or noisy labels) and give tests something to train; the real trainers
(rlengine.reward, rlengine.policy) are the engine's, built on rlengine.data.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerFast

from rlengine import ops
from rlengine.data.types import PreferencePair
from rlengine.policy.rollout import decode_step

if TYPE_CHECKING:  # transformers' model classes load when a model is first built (seconds)
    from transformers import PreTrainedModel

IGNORE = -100


def encode(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str | None = None, *,
           eos: bool = True) -> list[int]:
    """ids(prompt) + ids(response) + [EOS]; the prompt alone when response is None."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if response is None:
        return ids
    ids = ids + tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention mask [B, T]) with rows padded on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _row_seed(seed: int, index: int) -> int:
    return random.Random(f"rlengine.synthetic.generate/{int(seed)}/{index}").getrandbits(63)


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str],
             *, max_new_tokens: int, temperature: float = 1.0, greedy: bool = False,
             seed: int = 0, batch_size: int = 64) -> tuple[list[str], list[bool]]:
    """Sample a response to each prompt: (texts of the words before EOS, whether EOS came).

    Left-padded batches with a KV cache. Sampling is Gumbel-max with noise from a private
    generator per prompt, seeded by (seed, the prompt's index): a prompt's sample depends on
    the seed and its index only, not on batch_size or its batch mates, and the global RNG is
    untouched. Pad, BOS and UNK are never sampled: they are never part of an answer, and a tiny
    untrained model would otherwise emit them.
    """
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    banned = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id]
    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    texts: list[str] = []
    finished_all: list[bool] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rows = [encode(tokenizer, p) for p in prompts[start:start + batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = 1
            generators = [torch.Generator().manual_seed(_row_seed(seed, start + i))
                           for i in range(len(rows))]
            finished = torch.zeros(len(rows), dtype=torch.bool)
            new_tokens = []
            step_ids, cache = ids, None
            for _ in range(max_new_tokens):
                logits, cache = decode_step(model, step_ids, mask, cache)
                logits = logits[:, -1].float()
                logits[:, banned] = float("-inf")
                if greedy:
                    token = logits.argmax(-1)
                else:
                    uniform = torch.stack([torch.rand(logits.shape[-1], generator=g)
                                           for g in generators])
                    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
                    token = (logits / temperature + gumbel).argmax(-1)
                token = torch.where(finished, torch.full_like(token, eos), token)
                new_tokens.append(token)
                finished |= token == eos
                if bool(finished.all()):
                    break
                step_ids = token[:, None]
                mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            generated = torch.stack(new_tokens, 1).tolist()
            for row in generated:
                ended = eos in row
                words = row[:row.index(eos)] if ended else row
                texts.append(" ".join(tokenizer.convert_ids_to_tokens(words)))
                finished_all.append(ended)
    finally:
        model.train(was_training)
    return texts, finished_all


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Minibatch indices for ``steps`` steps: shuffled epochs over n items."""
    order = torch.randperm(n, generator=generator)
    at = 0
    for _ in range(steps):
        if at + batch_size > n:
            order, at = torch.randperm(n, generator=generator), 0
        yield order[at:at + batch_size].tolist()
        at += batch_size


def sft(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, demonstrations, *,
        steps: int = 300, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Teacher-forced SFT: AdamW on the mean negative log-likelihood of the response tokens and
    EOS (prompt tokens are context only), via rlengine.ops.token_logprobs. Trains ``model`` in
    place; returns the loss of every step."""
    rows, labels = [], []
    for demo in demonstrations:
        prompt_len = len(encode(tokenizer, demo.prompt))
        ids = encode(tokenizer, demo.prompt, demo.response)
        rows.append(ids)
        labels.append([IGNORE] * prompt_len + ids[prompt_len:])
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for batch in _batches(len(rows), min(batch_size, len(rows)), steps, generator):
        ids, mask = pad_right([rows[i] for i in batch], tokenizer.pad_token_id)
        target, _ = pad_right([labels[i] for i in batch], IGNORE)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logprobs = ops.token_logprobs(logits[:, :-1], target[:, 1:], ignore_index=IGNORE)
        loss = -logprobs.sum() / (target[:, 1:] != IGNORE).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


READOUTS = ("last", "token_mean", "token_sum")


class ProbeRewardModel(torch.nn.Module):
    """The plain reward model of METHODS.md section 1, for calibration: a backbone and a
    bias-free linear head. ``readout="last"`` reads the head at the last real token (EOS: the
    bandit reward model); ``"token_mean"`` averages the head's value over the response tokens
    except EOS (the token-level reward model of section 3, segments of one token), whose
    per-token values ``token_values`` can then localise errors."""

    def __init__(self, backbone: PreTrainedModel, seed: int = 0, readout: str = "last"):
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.backbone = backbone
        self.readout = readout
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1, bias=False)
        # Seeded, so that reward models sharing one backbone (e.g. the SFT policy's) still
        # differ by seed, as the voters of preference strength must.
        std = getattr(backbone.config, "initializer_range", 0.02)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape,
                                               generator=torch.Generator().manual_seed(seed)) * std)

    def token_values(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The head at every position, [B, T]."""
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(hidden).squeeze(-1)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        values = self.token_values(ids, mask)
        if self.readout == "last":
            return values[torch.arange(len(ids)), mask.sum(-1) - 1]
        if response_mask is None:
            raise ValueError(f"readout {self.readout!r} needs response_mask")
        weights = response_mask.to(values.dtype)
        total = (values * weights).sum(-1)
        return total if self.readout == "token_sum" else total / weights.sum(-1).clamp_min(1.0)


@dataclass
class ProbeResult:
    model: ProbeRewardModel
    losses: list[float]
    seconds: float
    steps: int
    history: list[tuple[int, float]] = field(default_factory=list)


def encode_scored(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str
                  ) -> tuple[list[int], int]:
    """(ids of prompt + response + EOS, number of prompt tokens)."""
    return encode(tokenizer, prompt, response), len(encode(tokenizer, prompt))


def batch_scored(rows: Sequence[tuple[list[int], int]], pad_id: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, response mask) of right-padded rows; the response mask is true on
    the response tokens before EOS."""
    ids, mask = pad_right([r for r, _ in rows], pad_id)
    positions = torch.arange(ids.shape[1])
    starts = torch.tensor([start for _, start in rows])
    response = (positions >= starts[:, None]) & (positions < mask.sum(-1, keepdim=True) - 1)
    return ids, mask, response


def _encode_pairs(tokenizer, pairs: Sequence[PreferencePair]):
    chosen = [encode_scored(tokenizer, p.prompt, p.chosen) for p in pairs]
    rejected = [encode_scored(tokenizer, p.prompt, p.rejected) for p in pairs]
    return chosen, rejected


@torch.no_grad()
def score_pairs(model: ProbeRewardModel, tokenizer: PreTrainedTokenizerFast,
                pairs: Sequence[PreferencePair], batch_size: int = 256
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards of chosen, rewards of rejected), float32 [n] each."""
    was_training = model.training
    model.eval()
    chosen, rejected = _encode_pairs(tokenizer, pairs)
    out = []
    for rows in (chosen, rejected):
        scores = []
        for start in range(0, len(rows), batch_size):
            scores.append(model(*batch_scored(rows[start:start + batch_size],
                                              tokenizer.pad_token_id)).float())
        out.append(torch.cat(scores))
    model.train(was_training)
    return out[0], out[1]


def train_probe_reward_model(backbone: PreTrainedModel, tokenizer: PreTrainedTokenizerFast,
                             pairs: Sequence[PreferencePair], *, steps: int = 300,
                             batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                             margins: Sequence[float] | None = None,
                             label_smoothing: Sequence[float] | float = 0.0,
                             readout: str = "last", evaluate=None,
                             evaluate_every: int = 0) -> ProbeResult:
    """Train a ProbeRewardModel on ``pairs`` with the BT loss (rlengine.ops.bt_loss; optional
    per-pair margins and label smoothing for quick denoising experiments). ``evaluate(model)``
    is called every ``evaluate_every`` steps and at the end, its values kept in ``history``."""
    model = ProbeRewardModel(backbone, seed, readout)
    chosen, rejected = _encode_pairs(tokenizer, pairs)
    margin_all = None if margins is None else torch.as_tensor(margins, dtype=torch.float32)
    smoothing_all = torch.as_tensor(label_smoothing, dtype=torch.float32)
    if smoothing_all.dim() == 0:
        smoothing_all = smoothing_all.expand(len(pairs))
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses, history = [], []
    began = time.perf_counter()
    for step, batch in enumerate(_batches(len(pairs), min(batch_size, len(pairs)), steps,
                                          generator), start=1):
        # Chosen and rejected in one forward: one padded batch of 2B rows.
        rewards = model(*batch_scored([chosen[i] for i in batch] + [rejected[i] for i in batch],
                                      tokenizer.pad_token_id))
        r_c, r_r = rewards[:len(batch)], rewards[len(batch):]
        loss = ops.bt_loss(r_c, r_r,
                           margin=None if margin_all is None else margin_all[batch],
                           label_smoothing=smoothing_all[batch]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if evaluate is not None and evaluate_every and step % evaluate_every == 0:
            history.append((step, evaluate(model)))
    seconds = time.perf_counter() - began
    if evaluate is not None and (not history or history[-1][0] != steps):
        history.append((steps, evaluate(model)))
    model.eval()
    return ProbeResult(model, losses, seconds, steps, history)
