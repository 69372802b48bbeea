"""rlengine's kernels: typed wrappers around ``torch.ops.rlengine.*``."""

from rlengine.ops.logprobs import token_logprobs
from rlengine.ops.segments import entropy_segments, segment_reduce, segment_rewards_to_dense

__all__ = ["entropy_segments", "segment_reduce", "segment_rewards_to_dense", "token_logprobs"]
