"""The built-in synthetic RLHF task (see task.py): a small formal language with a programmatic
gold reward, its word-level tokenizer, tiny `transformers` models, a noisy expert for SFT
demonstrations and comparisons, and a simulated annotator (Bradley-Terry with a temperature plus
a chosen fraction of flipped labels)."""

from rlengine.synthetic.models import ModelConfig
from rlengine.synthetic.task import (
    Demonstration,
    GoldReward,
    SyntheticTask,
    TaskConfig,
    pair_accuracy,
)
from rlengine.synthetic.training import (
    ProbeRewardModel,
    generate,
    score_pairs,
    sft,
    train_probe_reward_model,
)
from rlengine.synthetic.vocabulary import build_tokenizer

__all__ = [
    "Demonstration",
    "GoldReward",
    "ModelConfig",
    "ProbeRewardModel",
    "SyntheticTask",
    "TaskConfig",
    "build_tokenizer",
    "generate",
    "pair_accuracy",
    "score_pairs",
    "sft",
    "train_probe_reward_model",
]
