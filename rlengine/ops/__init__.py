"""rlengine's kernels: typed wrappers around ``torch.ops.rlengine.*``."""

from rlengine.ops.logprobs import token_logprobs
from rlengine.ops.stats import masked_mean, masked_var, masked_whiten

__all__ = ["masked_mean", "masked_var", "masked_whiten", "token_logprobs"]
