"""Reward models and their training (METHODS.md sections 1-3)."""

from rlengine.reward.losses import (
    metarm_difference_objective,
    preference_strength,
    simcse_loss,
    sinkhorn_codes,
    swav_loss,
)
from rlengine.reward.model import (
    SCORE_MODES,
    RewardModel,
    RewardOutput,
    ScoreMode,
    export_sequence_classifier,
)

__all__ = [
    "SCORE_MODES",
    "RewardModel",
    "RewardOutput",
    "ScoreMode",
    "export_sequence_classifier",
    "metarm_difference_objective",
    "preference_strength",
    "simcse_loss",
    "sinkhorn_codes",
    "swav_loss",
]
