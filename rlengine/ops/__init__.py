"""rlengine's kernels: typed wrappers around ``torch.ops.rlengine.*``.

Each op's schema is in csrc/registration.cpp, its CPU kernel in csrc/cpu/<family>.cpp, its
wrapper, fake kernel and autograd formula in rlengine/ops/<family>.py, and its plain-PyTorch
definition in rlengine/ops/reference.py. fused_linear_logprobs is the exception: its ops are
defined in Python (rlengine/ops/fused_linear.py), with Triton kernels in rlengine/ops/triton/.
"""

# The extension first: it defines the ops whose fake kernels and autograd the modules below
# register (and it says how to build it when it is missing).
from rlengine import _extension  # noqa: F401, I001
from rlengine.ops.fused_linear import fused_linear_logprobs
from rlengine.ops.gae import discounted_returns, gae
from rlengine.ops.logprobs import token_logprobs
from rlengine.ops.ranking import bt_loss, rrhf_rank_loss, sequence_scores
from rlengine.ops.segments import entropy_segments, segment_reduce, segment_rewards_to_dense
from rlengine.ops.stats import masked_mean, masked_var, masked_whiten

__all__ = [
    "token_logprobs",
    "fused_linear_logprobs",
    "sequence_scores",
    "rrhf_rank_loss",
    "bt_loss",
    "gae",
    "discounted_returns",
    "entropy_segments",
    "segment_reduce",
    "segment_rewards_to_dense",
    "masked_mean",
    "masked_var",
    "masked_whiten",
]
