"""Reward models and their training (METHODS.md sections 1-3)."""

from rlengine.reward.config import RewardTrainerConfig
from rlengine.reward.denoise import PreparedPairs, prepare_pairs
from rlengine.reward.losses import (
    metarm_difference_objective,
    preference_strength,
    simcse_loss,
    sinkhorn_codes,
    swav_loss,
)
from rlengine.reward.metarm import MetaAscent, metarm_step
from rlengine.reward.model import (
    SCORE_MODES,
    RewardModel,
    RewardOutput,
    ScoreMode,
    export_sequence_classifier,
)
from rlengine.reward.strength import StrengthResult, vote
from rlengine.reward.trainer import RewardTrainer, RewardTrainResult, pair_metrics

__all__ = [
    "SCORE_MODES",
    "MetaAscent",
    "PreparedPairs",
    "RewardModel",
    "RewardOutput",
    "RewardTrainResult",
    "RewardTrainer",
    "RewardTrainerConfig",
    "ScoreMode",
    "StrengthResult",
    "export_sequence_classifier",
    "metarm_difference_objective",
    "metarm_step",
    "pair_metrics",
    "prepare_pairs",
    "preference_strength",
    "simcse_loss",
    "sinkhorn_codes",
    "swav_loss",
    "vote",
]
