"""What every trainer of the engine shares: learning-rate schedules, metrics sinks (JSONL,
TensorBoard, a progress bar), checkpoints that resume bit for bit, and torch.distributed
set-up. The reward trainer uses them now; the policy trainers will."""

from rlengine.training.checkpoint import CheckpointManager
from rlengine.training.distributed import DistributedContext, init_distributed
from rlengine.training.metrics import MetricsLogger
from rlengine.training.schedules import SCHEDULES, make_scheduler

__all__ = [
    "SCHEDULES",
    "CheckpointManager",
    "DistributedContext",
    "MetricsLogger",
    "init_distributed",
    "make_scheduler",
]
