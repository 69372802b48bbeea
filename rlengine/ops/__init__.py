"""rlengine's kernels: typed wrappers around ``torch.ops.rlengine.*``."""

from rlengine.ops.logprobs import token_logprobs
from rlengine.ops.ranking import bt_loss, rrhf_rank_loss, sequence_scores

__all__ = ["bt_loss", "rrhf_rank_loss", "sequence_scores", "token_logprobs"]
