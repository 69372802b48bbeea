"""A live demo of the fused ops on a tiny random `transformers` model: each op runs on the model's
own outputs, is checked against its eager PyTorch equivalent, and both are timed then and there.

Eager equivalents: log_softmax + gather (and the entropy from the same log-softmax) for the
log-probs, as most trainers write it; for the other ops the plain-PyTorch definitions in
rlengine.ops.reference (GAE and discounted returns there are the Python loop over time that
TRL, OpenRLHF and veRL use).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlengine import ops
from rlengine.ops import reference


@dataclass
class OpTiming:
    op: str
    shape: str
    rlengine_ms: float
    eager_ms: float
    max_abs_diff: float

    @property
    def speedup(self) -> float:
        return self.eager_ms / self.rlengine_ms


def tiny_causal_lm(vocab_size: int = 32000, seed: int = 0):
    """A randomly initialised 2-layer Llama (hidden size 64) built locally: nothing is
    downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=4096)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call dispatch and allocation effects are not what is compared
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _max_abs_diff(a, b) -> float:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    worst = 0.0
    for x, y in zip(a, b):
        diff = (x.double() - y.double()).abs()
        finite = diff[torch.isfinite(diff)]
        worst = max(worst, float(finite.max()) if finite.numel() else 0.0)
    return worst


def eager_logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked, -(logp.exp() * logp).sum(-1)


def run(batch: int = 8, seq_len: int = 256, vocab_size: int = 32000, repeats: int = 3,
        seed: int = 0, progress: Callable[[str], None] | None = None) -> list[OpTiming]:
    """Run every fused op on the outputs of a tiny random model and time it against its eager
    equivalent. Returns one OpTiming per op."""
    say = progress or (lambda _msg: None)
    say(f"building a tiny random Llama (vocab {vocab_size}) and running it on "
        f"{batch} x {seq_len} random tokens")
    model = tiny_causal_lm(vocab_size, seed)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    logits = out.logits[:, :-1]          # position t predicts token t + 1: read in place
    labels = ids[:, 1:].clone()
    prompt_len = seq_len // 2            # the second half plays the response
    response = torch.zeros_like(labels, dtype=torch.bool)
    response[:, prompt_len:] = True
    labels[~response] = -100
    head = torch.nn.Linear(out.hidden_states[-1].shape[-1], 1, bias=False)
    with torch.no_grad():
        values = head(out.hidden_states[-1][:, :-1]).squeeze(-1)
    rows: list[OpTiming] = []

    def compare(op, shape, ours, eager):
        say(f"timing {op}")
        rows.append(OpTiming(op, shape, median_ms(ours, repeats), median_ms(eager, repeats),
                             _max_abs_diff(ours(), eager())))

    tokens = f"{batch}x{seq_len - 1} tokens, V={vocab_size}"
    compare("token_logprobs + entropy", tokens,
            lambda: ops.token_logprobs(logits, labels, with_entropy=True),
            lambda: tuple(torch.where(response, t, 0)
                          for t in eager_logprobs_entropy(logits, labels.clamp(min=0))))

    leaf = logits.detach().clone().requires_grad_()
    weights = torch.randn(labels.shape, generator=generator)

    def ours_backward():
        return torch.autograd.grad((ops.token_logprobs(leaf, labels) * weights).sum(), leaf)[0]

    def eager_backward():
        picked = torch.log_softmax(leaf, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
        return torch.autograd.grad((picked.squeeze(-1) * weights * response).sum(), leaf)[0]

    compare("token_logprobs forward+backward", tokens, ours_backward, eager_backward)

    token_lp = ops.token_logprobs(logits, labels)
    candidates = 4 if batch % 4 == 0 else 1
    rewards = torch.randn(batch // candidates, candidates, generator=generator)
    compare("sequence_scores + rrhf_rank_loss", f"{batch // candidates} queries x {candidates}",
            lambda: ops.rrhf_rank_loss(ops.sequence_scores(token_lp, response)
                                       .view(-1, candidates), rewards),
            lambda: reference.rrhf_rank_loss(reference.sequence_scores(token_lp, response)
                                             .view(-1, candidates), rewards))

    chosen, rejected = values[0::2].reshape(-1), values[1::2].reshape(-1)
    compare("bt_loss (label smoothing 0.1)", f"{chosen.numel()} pairs",
            lambda: ops.bt_loss(chosen, rejected, label_smoothing=0.1),
            lambda: reference.bt_loss(chosen, rejected, label_smoothing=0.1))

    step_rewards = torch.zeros_like(values)
    step_rewards[:, -1] = torch.randn(batch, generator=generator)
    compare("gae", f"{batch}x{seq_len - 1}",
            lambda: ops.gae(step_rewards, values, response, gamma=1.0, lam=0.95),
            lambda: reference.gae(step_rewards, values, response, gamma=1.0, lam=0.95))

    _, entropy = ops.token_logprobs(logits, labels, with_entropy=True)
    # Label-aligned arrays: the token at index j is ids[:, j + 1], and the entropy that decides
    # whether it ends a segment is that of the distribution after it, entropy[:, j + 1].
    entropy = torch.nn.functional.pad(entropy[:, 1:], (0, 1))
    threshold = float(entropy[response].median())
    compare("entropy_segments", f"{batch}x{seq_len - 1}",
            lambda: ops.entropy_segments(entropy, response, threshold=threshold),
            lambda: reference.entropy_segments(entropy, response, threshold=threshold))
    segment_ids, counts = ops.entropy_segments(entropy, response, threshold=threshold)
    compare("segment_reduce (end_mean)", f"{batch}x{seq_len - 1}",
            lambda: ops.segment_reduce(values, segment_ids, counts, reduce="end_mean"),
            lambda: reference.segment_reduce(values, segment_ids, counts, reduce="end_mean"))
    segment_rewards = ops.segment_reduce(values, segment_ids, counts, reduce="end")
    normalizer = (0.7668, 0.4705, 0.2569, 2.8339)
    compare("segment_rewards_to_dense", f"{batch}x{seq_len - 1}",
            lambda: ops.segment_rewards_to_dense(segment_rewards, segment_ids, counts, response,
                                                 normalizer=normalizer),
            lambda: reference.segment_rewards_to_dense(segment_rewards, segment_ids, counts,
                                                       response, normalizer=normalizer))

    advantages, _ = ops.gae(step_rewards, values, response, gamma=1.0, lam=0.95)
    compare("masked_whiten", f"{batch}x{seq_len - 1}",
            lambda: ops.masked_whiten(advantages, response),
            lambda: reference.masked_whiten(advantages, response))
    return rows


def format_table(rows: list[OpTiming]) -> str:
    header = ("op", "shape", "rlengine ms", "eager ms", "speedup", "max |diff|")
    body = [(r.op, r.shape, f"{r.rlengine_ms:.3f}", f"{r.eager_ms:.3f}", f"{r.speedup:.1f}x",
             f"{r.max_abs_diff:.1e}") for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
