"""MetaRM's step (METHODS.md section 1): ascend the meta set's difference objective, take the
BT gradient at the lifted parameters, apply it to the original ones (first order)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class MetaAscent:
    """``with MetaAscent(params, objective, eta):`` lifts the parameters to
    theta' = theta + eta * grad J(theta) on entry (J = ``objective()``, maximized) and puts theta
    back on exit, leaving the ``.grad`` that the block computed at theta' in place for the
    optimizer, which then applies it to theta: theta <- theta - alpha * grad L(theta').

    ``all_reduce`` (optional) averages the ascent gradient over processes in data-parallel runs,
    so that every process lifts to the same theta'. ``value`` holds J(theta) after entry.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], objective: Callable[[], torch.Tensor],
                 eta: float, *, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.objective = objective
        self.eta = eta
        self.all_reduce = all_reduce
        self.value: float | None = None
        self._saved: list[torch.Tensor] = []

    def __enter__(self) -> MetaAscent:
        value = self.objective()
        grads = torch.autograd.grad(value, self.params, allow_unused=True)
        deltas = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.params,
                                                                                    grads)]
        if self.all_reduce is not None:
            deltas = [self.all_reduce(d) for d in deltas]
        self.value = float(value.detach())
        with torch.no_grad():
            # theta is saved, not recomputed as theta' - eta * g, which would not round back
            self._saved = [p.detach().clone() for p in self.params]
            for p, d in zip(self.params, deltas):
                p.add_(d.to(p.dtype), alpha=self.eta)
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, self._saved):
                p.copy_(saved)
        self._saved = []


def metarm_step(params: Sequence[torch.nn.Parameter], meta_objective: Callable[[], torch.Tensor],
                task_loss: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, *,
                eta: float) -> tuple[float, float]:
    """One MetaRM update: returns (J(theta), L(theta')). With SGD(lr=alpha) it is exactly
    theta <- theta - alpha * grad L(theta + eta * grad J(theta))."""
    optimizer.zero_grad(set_to_none=True)
    with MetaAscent(params, meta_objective, eta) as ascent:
        loss = task_loss()
        loss.backward()
    optimizer.step()
    return ascent.value, float(loss.detach())
