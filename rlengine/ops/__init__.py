"""rlengine's kernels: typed wrappers around ``torch.ops.rlengine.*``."""

from rlengine.ops.gae import discounted_returns, gae
from rlengine.ops.logprobs import token_logprobs

__all__ = ["discounted_returns", "gae", "token_logprobs"]
