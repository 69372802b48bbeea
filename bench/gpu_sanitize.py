"""Every rlengine kernel, forward and backward, once per dtype at small shapes that cross the
kernels' tile and block boundaries, with adversarial values: the workload that bench/gpu_run.sh
runs under compute-sanitizer (memcheck, racecheck), one family per process so that a report
names the family.

    compute-sanitizer --tool memcheck python bench/gpu_sanitize.py logprobs

Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that every tensor is its own allocation and an
access past a tensor's end is outside any allocation (torch's caching allocator would hide it
inside a larger block). On a machine without a GPU `--device cpu` runs the same calls, which
checks the script itself.
"""

from __future__ import annotations

import argparse
import sys

import torch

from rlengine import ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _backward(outputs, inputs):
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    outputs = [o for o in outputs if o.requires_grad]
    grads = [torch.randn_like(o) for o in outputs]
    return torch.autograd.grad(outputs, inputs, grads, allow_unused=True)


def logprobs(device):
    for dtype in DTYPES:
        for n, vocab in ((5, 1), (7, 1003), (33, 4096 + 5), (3, 70001)):
            padded = torch.randn(n, vocab + 1, device=device).to(dtype)
            for logits in (padded[:, :vocab], padded[:, 1:]):  # aligned and misaligned rows
                logits = logits.detach().requires_grad_()
                labels = torch.randint(0, vocab, (n,), device=device)
                labels[0] = -100
                if n > 2 and device.type == "cuda":
                    labels[1] = vocab + 7  # out of range: NaN, never read (no check on GPU)
                for with_entropy in (False, True):
                    out = ops.token_logprobs(logits, labels, temperature=0.7,
                                             with_entropy=with_entropy)
                    _backward(out, [logits])
            adversarial = torch.randn(4, vocab, device=device).to(dtype)
            adversarial[0] = float("-inf")
            adversarial[1, 0] = float("nan")
            adversarial[2, -1] = float("inf")
            ops.token_logprobs(adversarial, torch.zeros(4, dtype=torch.long, device=device),
                               with_entropy=True)
    logits = torch.randn(6, 3001, device=device, dtype=torch.bfloat16)
    activations = logits.clone().requires_grad_()
    out = ops.token_logprobs(activations.view_as(activations),
                             torch.randint(0, 3001, (6,), device=device), inplace_backward=True)
    _backward(out, [activations])


def ranking(device):
    for dtype in DTYPES:
        for batch, steps in ((1, 1), (5, 37), (70, 1025)):
            lp = torch.randn(batch, steps, device=device).to(dtype).requires_grad_()
            mask = torch.rand(batch, steps, device=device) > 0.3
            mask[0] = False
            _backward(ops.sequence_scores(lp, mask, length_penalty=1.0), [lp])
        for queries, k in ((1, 1), (9, 4), (300, 7)):
            scores = torch.randn(queries, k, device=device).to(dtype).requires_grad_()
            rewards = torch.randn(queries, k, device=device)
            valid = torch.rand(queries, k, device=device) > 0.2
            _backward(ops.rrhf_rank_loss(scores, rewards, valid), [scores])
            _backward(ops.rrhf_rank_loss(scores, rewards), [scores])
        for pairs in (1, 1000, 70001):
            chosen = torch.randn(pairs, device=device).to(dtype).requires_grad_()
            rejected = torch.randn(pairs, device=device).to(dtype).requires_grad_()
            margin = torch.rand(pairs, device=device).to(dtype)
            _backward(ops.bt_loss(chosen, rejected, margin=margin, label_smoothing=0.1),
                      [chosen, rejected])
            _backward(ops.bt_loss(chosen, rejected), [chosen, rejected])


def stats(device):
    for dtype in DTYPES:
        for shape in ((1, 1), (7, 33), (300, 1031)):
            x = torch.randn(shape, device=device).to(dtype).requires_grad_()
            mask = torch.rand(shape, device=device) > 0.4
            for dim in (None, 0, 1):
                _backward(ops.masked_mean(x, mask, dim), [x])
                _backward(ops.masked_var(x, mask, dim, unbiased=True), [x])
            _backward(ops.masked_whiten(x, mask), [x])
            _backward(ops.masked_whiten(x, mask, shift_mean=False, unbiased=False), [x])
            empty = torch.zeros(shape, dtype=torch.bool, device=device)
            ops.masked_mean(x, empty, 1)
            ops.masked_whiten(x, empty)


def gae(device):
    for dtype in DTYPES:
        for batch, steps in ((1, 1), (3, 37), (5, 5000), (2, 40000)):
            rewards = torch.randn(batch, steps, device=device).to(dtype).requires_grad_()
            values = torch.randn(batch, steps + 1, device=device).to(dtype)[:, :-1]
            values.requires_grad_()
            mask = torch.rand(batch, steps, device=device) > 0.2
            mask[0, : steps // 2] = False
            last = torch.randn(batch, device=device).to(dtype)
            _backward(ops.gae(rewards, values, mask, gamma=0.99, lam=0.95, last_values=last),
                      [rewards, values])
            _backward(ops.discounted_returns(rewards, mask, gamma=1.0), [rewards])


def segments(device):
    for dtype in DTYPES:
        for batch, steps in ((1, 1), (4, 37), (9, 3001)):
            entropy = torch.rand(batch, steps, device=device).to(dtype) * 3
            mask = torch.rand(batch, steps, device=device) > 0.1
            mask[0] = False
            for threshold in (-1e30, 1.5, 1e30):  # every token ends one; usual; none
                ids, counts = ops.entropy_segments(entropy, mask, threshold=threshold)
                values = torch.randn(batch, steps, device=device).to(dtype).requires_grad_()
                for reduce in ("end_mean", "end", "sum", "mean"):
                    _backward(ops.segment_reduce(values, ids, counts, reduce=reduce), [values])
                kmax = max(1, int(counts.max()))
                rewards = torch.randn(batch, kmax, device=device).to(dtype).requires_grad_()
                for spread in ("even", "repeat", "end"):
                    dense = ops.segment_rewards_to_dense(
                        rewards, ids, counts, mask, normalizer=(-0.1, 0.2, -0.3, 1.5),
                        spread=spread, clamp=5.0)
                    _backward(dense, [rewards])


def fused_linear(device):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, hidden, vocab in ((1, 16, 17), (37, 48, 203), (130, 256, 4099)):
            h = torch.randn(n, hidden, device=device).to(dtype).requires_grad_()
            w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype)
            w.requires_grad_()
            b = torch.randn(vocab, device=device).to(dtype).requires_grad_()
            labels = torch.randint(0, vocab, (n,), device=device)
            labels[0] = -100
            out = ops.fused_linear_logprobs(h, w, labels, b, temperature=0.9, with_entropy=True)
            _backward(out, [h, w, b])


FAMILIES = {f.__name__: f for f in (logprobs, ranking, stats, gae, segments, fused_linear)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES),
                        help=f"any of {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families: {', '.join(sorted(unknown))}")
    torch.manual_seed(0)
    device = torch.device(args.device)
    for name in args.families:
        FAMILIES[name](device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"gpu_sanitize: {name} ran on {device}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
