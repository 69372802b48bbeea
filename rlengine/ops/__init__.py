"""rlengine's kernels: typed wrappers around ``torch.ops.rlengine.*``."""

from rlengine.ops.logprobs import token_logprobs

__all__ = ["token_logprobs"]
