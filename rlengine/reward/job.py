"""What a reward-model run trains on and with: the data, tokenizer, backbone, entropy model and
meta set named by a RewardJobConfig, built into objects for RewardTrainer. The `rlengine
train-rm` and `rlengine strength` commands are this plus the trainer.

Data: ``synthetic`` (the built-in task: noisy-annotator pairs for training, gold-labelled
clean pairs for validation) or a file/folder that rlengine.data.load_preferences reads (jsonl,
json, parquet, a `datasets` save_to_disk folder; TRL formats and HH-RLHF transcripts).

Model: ``synthetic`` (the task's tiny Llama, initialised from its SFT policy as RLHF practice
does, or at random; with its own tokenizer, also on a data file in the task's language such
as `rlengine strength`'s output), ``tiny-llama`` / ``tiny-gpt2`` (a small random-init
transformers model sized to the tokenizer: for real text without network access), or a local
transformers checkpoint folder.

Tokenizer for real text: the checkpoint's own when the model is a folder; else a folder given
as ``tokenizer``; else ``tokenizer: train`` trains a byte-level BPE tokenizer on the training
texts (rlengine.data.train_text_tokenizer, offline, seconds).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from rlengine.configs import ConfigError, option
from rlengine.data.loaders import load_preferences, load_samples
from rlengine.data.tokenizer import example_texts, load_tokenizer, train_text_tokenizer
from rlengine.data.types import PreferencePair
from rlengine.reward.model import RewardModel
from rlengine.threads import THREADS_HELP
from rlengine.threads import configure as configure_threads

SYNTHETIC = "synthetic"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")


@dataclass
class RewardJobConfig:
    train: str = option(SYNTHETIC, "training pairs: 'synthetic' or a .jsonl/.json/.parquet file or "
                                   "datasets folder")
    eval: dict[str, str] = option({}, "validation sets as name=path[,name=path]; with "
                                      "train=synthetic, a gold-labelled 'clean' set is added")
    eval_fraction: float = option(0.0, "hold out this fraction of the training pairs as the "
                                       "'heldout' validation set (shuffled with data_seed)")
    limit: int | None = option(None, "use only the first N training pairs")
    split: str | None = option(None, "split to read from a DatasetDict folder")
    data_seed: int = option(0, "seed of the held-out split and of the synthetic data")
    model: str = option(SYNTHETIC, "backbone: 'synthetic', 'tiny-llama', 'tiny-gpt2' or a local "
                                   "transformers checkpoint folder")
    tokenizer: str | None = option(None, "a local tokenizer folder, or 'train' (byte-level BPE "
                                         "on the training texts); default: the model's own")
    tokenizer_vocab: int = option(4096, "vocabulary of a trained tokenizer")
    tiny_hidden: int = option(128, "tiny-*: hidden size")
    tiny_layers: int = option(2, "tiny-*: layers")
    tiny_dropout: float = option(0.0, "tiny-*: dropout (SimCSE views need > 0)")
    max_length: int | None = option(None, "truncate prompt + response to this many tokens")
    max_prompt_length: int | None = option(None, "share of max_length the prompt may keep")
    entropy_model: str | None = option(None, "score_mode=segment: a local causal-LM folder "
                                             "(default with synthetic: the SFT policy)")
    meta_set: str | None = option(None, "MetaRM: 'synthetic' (samples of the SFT policy) or a "
                                        "file of unlabeled {prompt, responses} rows, k >= 2 "
                                        "samples of the current policy each")
    meta_prompts: int = option(256, "MetaRM with meta_set=synthetic: prompts sampled")
    meta_k: int = option(4, "MetaRM with meta_set=synthetic: samples per prompt")
    synthetic_task_seed: int = option(0, "synthetic: the task's seed")
    synthetic_pairs: int = option(2000, "synthetic: training pairs")
    synthetic_flip: float = option(0.2, "synthetic: fraction of flipped labels")
    synthetic_eval_pairs: int = option(1000, "synthetic: clean validation pairs")
    synthetic_init: Literal["sft", "random"] = option("sft", "synthetic: start the reward model "
                                                             "from the SFT policy or at random")
    model_seed: int = option(0, "seed of a randomly initialised backbone")
    threads: int = option(0, THREADS_HELP)
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class RewardJob:
    """Everything RewardTrainer needs besides its config. ``make_model(seed)`` builds a fresh
    reward model (voters of `rlengine strength` differ by seed)."""

    tokenizer: Any
    train_pairs: list[PreferencePair]
    eval_sets: dict[str, list[PreferencePair]]
    make_model: Any
    entropy_model: torch.nn.Module | None
    meta_set: list | None
    max_length: int | None
    max_prompt_length: int | None
    task: Any = None

    def trainer_kwargs(self) -> dict[str, Any]:
        return {"eval_sets": self.eval_sets, "entropy_model": self.entropy_model,
                "meta_set": self.meta_set, "max_length": self.max_length,
                "max_prompt_length": self.max_prompt_length}


def build_job(config: RewardJobConfig, *, need_entropy: bool = False, need_meta: bool = False,
              log=print) -> RewardJob:
    """The data, tokenizer, model factory, entropy model (``need_entropy``: segment scores) and
    MetaRM meta set (``need_meta``) that ``config`` names; a ConfigError for a combination that
    cannot work."""
    configure_threads(config.threads, log=log)
    synthetic_data = config.train == SYNTHETIC
    synthetic_model = config.model == SYNTHETIC
    # the task: the data's source, or the language of a file written from it (`rlengine
    # strength`'s output) when the model is the task's own
    task = (synthetic_task(config.synthetic_task_seed)
            if synthetic_data or synthetic_model else None)
    if synthetic_data:
        pairs = task.preference_pairs(config.synthetic_pairs,
                                      flip_fraction=config.synthetic_flip,
                                      seed=config.data_seed + 1)
        if config.limit:
            pairs = pairs[:config.limit]
    else:
        pairs = load_preferences(config.train, split=config.split, limit=config.limit)
    pairs, heldout = _split_heldout(pairs, config)
    eval_sets = {}
    if synthetic_data:
        eval_sets["clean"] = task.clean_pairs(config.synthetic_eval_pairs,
                                              seed=config.data_seed + 100)
    if heldout:
        eval_sets["heldout"] = heldout
    eval_sets.update(_eval_files(config))

    # the SFT policy's own tokens are the synthetic model's: only then can it be the default
    # entropy model
    entropy_from_policy = need_entropy and not config.entropy_model and synthetic_model
    meta_from_policy = need_meta and (config.meta_set == SYNTHETIC
                                      or (config.meta_set is None and synthetic_data))
    if meta_from_policy and task is None:
        raise ConfigError("meta_set 'synthetic' samples the synthetic task's SFT policy: it needs "
                          "train or model 'synthetic'")
    needs_policy = synthetic_model and config.synthetic_init == "sft"
    policy = (task.sft_policy() if needs_policy or entropy_from_policy or meta_from_policy
              else None)

    if synthetic_model:
        if config.tokenizer:
            raise ConfigError(f"model 'synthetic' has its own tokenizer; tokenizer "
                              f"{config.tokenizer!r} cannot be used with it")
        tokenizer = task.tokenizer
        make_model = _synthetic_model_factory(config, task, policy)
    else:
        tokenizer = _tokenizer(config, pairs)
        make_model = _model_factory(config, tokenizer)

    entropy_model = None
    if need_entropy:
        if config.entropy_model:
            entropy_model = _load_causal_lm(config.entropy_model)
        elif entropy_from_policy:
            entropy_model = policy
        else:
            raise ConfigError("score_mode=segment needs entropy_model: a local causal-LM folder "
                              "(the SFT policy) with the reward model's tokenizer (only the "
                              "synthetic model has a default, its SFT policy)")
    meta_set = None
    if meta_from_policy:
        meta_set = _policy_samples(config, task, policy, log)
    elif need_meta:
        if not config.meta_set:
            raise ConfigError("MetaRM on a data file needs meta_set: a file of {prompt, "
                              "responses} rows (samples of the current policy)")
        meta_set = _meta_file(config.meta_set, log)
    return RewardJob(tokenizer, pairs, eval_sets, make_model, entropy_model, meta_set,
                     config.max_length, config.max_prompt_length, task)


def _split_heldout(pairs: list[PreferencePair], config: RewardJobConfig
                   ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    if not config.eval_fraction:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(f"rlengine.heldout/{config.data_seed}").shuffle(order)
    cut = int(round(config.eval_fraction * len(pairs)))
    if cut == 0 or cut == len(pairs):
        raise ConfigError(f"eval_fraction {config.eval_fraction} of {len(pairs)} pairs leaves an "
                          f"empty training or held-out set")
    held = sorted(order[:cut])
    kept = sorted(order[cut:])
    return [pairs[i] for i in kept], [pairs[i] for i in held]


def _eval_files(config: RewardJobConfig) -> dict[str, list[PreferencePair]]:
    return {name: load_preferences(path, split=config.split) for name, path in config.eval.items()}


@functools.lru_cache(maxsize=4)
def synthetic_task(seed: int):
    """One task object per seed and process: its SFT policy (about 10 s) is cached per object,
    and `rlengine strength` or a test may build several jobs in one process."""
    from rlengine.synthetic import SyntheticTask

    return SyntheticTask(seed)


def _synthetic_model_factory(config: RewardJobConfig, task, policy):
    def make_model(seed: int) -> RewardModel:
        if config.synthetic_init == "sft":
            backbone = task.make_reward_backbone(from_policy=policy)
        else:
            backbone = task.make_reward_backbone(config.model_seed + seed)
        return seeded_reward_model(backbone, seed)
    return make_model


def seeded_reward_model(backbone, seed: int) -> RewardModel:
    """A RewardModel on ``backbone`` whose head draw is a function of ``seed`` alone (voters of
    `rlengine strength` differ by it), leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10_007 + seed)
        return RewardModel(backbone)


def _tokenizer(config: RewardJobConfig, pairs: list[PreferencePair]):
    if config.tokenizer == "train":
        return train_text_tokenizer(example_texts(pairs), vocab_size=config.tokenizer_vocab)
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    if config.model in TINY_MODELS:
        raise ConfigError(f"model {config.model!r} on a data file needs a tokenizer: 'train' (a "
                          f"byte-level BPE trained on the training texts, offline) or a local "
                          f"tokenizer folder")
    return load_tokenizer(config.model)


def _model_factory(config: RewardJobConfig, tokenizer):
    if config.model in TINY_MODELS:
        from rlengine.synthetic.models import ModelConfig, make_base_model

        positions = max(config.max_length or 512, 64)
        model_config = ModelConfig(architecture=config.model.removeprefix("tiny-"),
                                   hidden_size=config.tiny_hidden, num_layers=config.tiny_layers,
                                   num_heads=4, intermediate_size=4 * config.tiny_hidden,
                                   max_positions=positions, dropout=config.tiny_dropout)

        def make_model(seed: int) -> RewardModel:
            backbone = make_base_model(model_config, tokenizer, config.model_seed + seed)
            return seeded_reward_model(backbone, seed)
        return make_model
    path = Path(config.model)
    if not path.is_dir():
        raise ConfigError(f"model {config.model!r} is neither 'synthetic', one of {TINY_MODELS} "
                          f"nor a local checkpoint folder (the hub is not used)")

    def make_pretrained(seed: int) -> RewardModel:
        from transformers import AutoModel

        return seeded_reward_model(AutoModel.from_pretrained(path), seed)
    return make_pretrained


def _load_causal_lm(path: str):
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise ConfigError(f"entropy_model {path!r} is not a local checkpoint folder")
    return AutoModelForCausalLM.from_pretrained(path)


def _policy_samples(config: RewardJobConfig, task, policy, log) -> list:
    """The synthetic meta set: meta_k samples of the SFT policy for each of meta_prompts."""
    prompts = task.prompts(config.meta_prompts, seed=config.data_seed + 500)
    repeated = [p for p in prompts for _ in range(config.meta_k)]
    texts = task.generate(policy, repeated, seed=config.data_seed + 501)
    log(f"meta set: {len(prompts)} prompts x {config.meta_k} samples of the SFT policy")
    return [(p, texts[i * config.meta_k:(i + 1) * config.meta_k])
            for i, p in enumerate(prompts)]


def _meta_file(path: str, log) -> list:
    """A meta set file: {prompt?, responses} rows, unlabeled (any scores column is ignored)."""
    examples = load_samples(path, split=None, min_responses=2)
    if not examples:
        raise ConfigError(f"meta_set {path}: no rows")
    log(f"meta set: {len(examples)} prompts from {path}")
    return [(e.prompt, e.responses) for e in examples]
