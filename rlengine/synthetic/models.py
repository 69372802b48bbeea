"""Tiny `transformers` models for the synthetic task: real model classes (so every trainer runs on
them unchanged and they save/load with save_pretrained), small enough to train on 2 CPU cores
in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers' model classes load when a model is first built (seconds)
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

ARCHITECTURES = ("llama", "gpt2")


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny models. ``dropout`` is attention dropout for llama (which has no other)
    and residual/embedding/attention dropout for gpt2; contrastive learning's dropout views
    need it > 0 on the reward model."""

    architecture: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 64
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got "
                             f"{self.architecture!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def transformers_config(config: ModelConfig,
                        tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The `transformers` config of a tiny model whose vocabulary is the tokenizer's."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if config.architecture == "llama":
        return LlamaConfig(
            hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads, max_position_embeddings=config.max_positions,
            attention_dropout=config.dropout, tie_word_embeddings=False, **ids)
    return GPT2Config(
        n_embd=config.hidden_size, n_inner=config.intermediate_size, n_layer=config.num_layers,
        n_head=config.num_heads, n_positions=config.max_positions, resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout, tie_word_embeddings=False, **ids)


def _seeded(build, seed: int):
    # A private RNG stream: building a model must not disturb the caller's global torch RNG,
    # and the same seed must give the same weights whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_causal_lm(config: ModelConfig, tokenizer: PreTrainedTokenizerFast,
                   seed: int) -> PreTrainedModel:
    """A randomly initialised causal LM (LlamaForCausalLM or GPT2LMHeadModel), weights a pure
    function of ``seed``."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    hf_config = transformers_config(config, tokenizer)
    cls = LlamaForCausalLM if config.architecture == "llama" else GPT2LMHeadModel
    return _seeded(lambda: cls(hf_config), seed)


def make_base_model(config: ModelConfig, tokenizer: PreTrainedTokenizerFast,
                    seed: int) -> PreTrainedModel:
    """The causal LM's body without its LM head (LlamaModel or GPT2Model): the backbone a reward
    model puts its head on. Its output's ``last_hidden_state`` is ``[B, T, hidden_size]``."""
    from transformers import GPT2Model, LlamaModel

    hf_config = transformers_config(config, tokenizer)
    cls = LlamaModel if config.architecture == "llama" else GPT2Model
    return _seeded(lambda: cls(hf_config), seed)


def base_model_of(causal_lm: PreTrainedModel) -> PreTrainedModel:
    """The body of a causal LM (shared, not copied): to build a reward model or critic from a
    trained (e.g. SFT) policy, deep-copy the policy first."""
    return causal_lm.base_model
