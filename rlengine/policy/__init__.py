"""Policy optimization (METHODS.md sections 3-5): rollouts and log-probs through the engine's
kernels, per-token rewards (bandit, token-level, segment-dense with the location-aware
normalizer, gold functions; KL shaping and controllers), PPO and RRHF."""

from rlengine.policy.normalizer import (
    LocationNormalizer,
    collect_segment_rewards,
    huber_line_fit,
    location_statistics,
)
from rlengine.policy.ppo import (
    Experience,
    PPOLoss,
    PPOResult,
    PPOTrainer,
    clipped_surrogate,
    clipped_value_loss,
    explained_variance,
    ppo_loss,
)
from rlengine.policy.ppo_config import PPOConfig
from rlengine.policy.rewards import (
    AdaptiveKLController,
    FixedKLController,
    FunctionRewards,
    RewardModelRewards,
    RolloutRewards,
    Segments,
    apply_eos_penalty,
    bandit_rewards,
    clip_rewards,
    kl_estimate,
    kl_shaped_rewards,
    make_kl_controller,
    segment_dense_rewards,
    segment_rewards,
    sequence_rewards_at_last_token,
    token_level_rewards,
    whiten_rewards,
)
from rlengine.policy.rollout import (
    PolicyLogprobs,
    Rollout,
    SamplingConfig,
    action_values,
    critic_values,
    diverse_beam_search,
    generate_rollout,
    make_critic,
    next_token_entropy,
    response_logprobs,
    sequence_logprobs,
)
from rlengine.policy.rrhf import RRHFLoss, RRHFResult, RRHFTrainer, rrhf_loss
from rlengine.policy.rrhf_config import RRHFConfig
from rlengine.policy.sft import SFTResult, SFTTrainer
from rlengine.policy.sft_config import SFTConfig

__all__ = [
    "AdaptiveKLController", "Experience", "FixedKLController", "FunctionRewards",
    "LocationNormalizer", "PPOConfig", "PPOLoss", "PPOResult", "PPOTrainer", "PolicyLogprobs",
    "RRHFConfig", "RRHFLoss", "RRHFResult", "RRHFTrainer", "RewardModelRewards", "Rollout",
    "RolloutRewards", "SFTConfig", "SFTResult", "SFTTrainer", "SamplingConfig", "Segments",
    "action_values", "apply_eos_penalty", "bandit_rewards", "clip_rewards", "clipped_surrogate",
    "clipped_value_loss", "collect_segment_rewards", "critic_values", "diverse_beam_search",
    "explained_variance", "generate_rollout", "huber_line_fit", "kl_estimate", "kl_shaped_rewards",
    "location_statistics", "make_critic", "make_kl_controller", "next_token_entropy", "ppo_loss",
    "response_logprobs", "rrhf_loss", "segment_dense_rewards", "segment_rewards",
    "sequence_logprobs", "sequence_rewards_at_last_token", "token_level_rewards", "whiten_rewards",
]
