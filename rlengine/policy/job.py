"""What an SFT, RRHF or PPO run or a normalizer fit works on, named by a config and built into
objects: the `rlengine sft`, `rrhf`, `ppo` and `fit-normalizer` commands are these plus the
trainer / the fit.

Data (RRHF queries): ``synthetic`` (the built-in task: prompts, each with noisy-expert
responses as the data set's candidates, and the gold reward) or a file / datasets folder:
prompts ``{prompt}``, pairs ``{prompt, chosen, rejected}`` (both responses become candidates),
ranked ``{prompt, responses, scores}`` or samples ``{prompt, responses}``. Response files of
other models (``{prompt, responses}`` rows) add candidates to the queries with the same prompt.
SFT demonstrations: see rlengine.data.load_demonstrations.

Policy: ``synthetic`` (the task's SFT policy; for SFT, its untrained model) or a local
causal-LM folder with its tokenizer (a run directory works too: its ``model`` folder is
used); SFT also builds ``tiny-llama`` / ``tiny-gpt2`` for a given or trained tokenizer.
Reward: the synthetic task's gold reward, a RewardModel folder (written by `rlengine
train-rm`; it must share the policy's tokenizer, which is checked), or the data's own scores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlengine.configs import ConfigError, option
from rlengine.data.loaders import (
    load_demonstrations,
    load_preferences,
    load_prompts,
    load_ranked,
    load_samples,
)
from rlengine.data.sources import iter_rows
from rlengine.data.tokenizer import (
    example_texts,
    load_tokenizer,
    tokenizer_folder,
    train_text_tokenizer,
)
from rlengine.data.types import Demonstration, RankedExample, Text
from rlengine.reward.job import synthetic_task
from rlengine.threads import THREADS_HELP
from rlengine.threads import configure as configure_threads

SYNTHETIC = "synthetic"
DataFormat = Literal["auto", "prompts", "pairs", "ranked", "samples"]


@dataclass
class RRHFJobConfig:
    model: str = option(SYNTHETIC, "the policy: 'synthetic' (the task's SFT policy) or a local "
                                   "causal-LM folder (with its tokenizer)")
    tokenizer: str | None = option(None, "a local tokenizer folder (default: the model's own)")
    data: str = option(SYNTHETIC, "queries: 'synthetic' or a .jsonl/.json/.parquet file or "
                                  "datasets folder of prompts, pairs, ranked or sampled responses")
    data_format: DataFormat = option("auto", "what data holds (auto: by the first row's fields: "
                                             "responses + scores = ranked, responses = samples, "
                                             "chosen = pairs, else prompts)")
    response_files: list[str] = option([], "files of other models' responses ({prompt, "
                                           "responses} rows), added as candidates to the "
                                           "queries with the same prompt")
    reward: Literal["auto", "gold", "model", "dataset"] = option(
        "auto", "candidate rewards: gold (the synthetic task's), model (reward_model), dataset "
                "(the ranked data's scores, no policy samples); auto: gold on synthetic data, "
                "else model if reward_model is set, else dataset")
    reward_model: str | None = option(None, "a RewardModel folder (rlengine train-rm's "
                                            "output/model) sharing the policy's tokenizer")
    reward_score_mode: Literal["last", "token_mean"] = option(
        "last", "the reward model's read-out: the value at the last token, or the mean over "
                "the response without EOS")
    limit: int | None = option(None, "use only the first N queries")
    split: str | None = option(None, "split to read from a DatasetDict folder")
    synthetic_task_seed: int = option(0, "synthetic: the task's seed")
    synthetic_queries: int = option(256, "synthetic: training prompts")
    synthetic_dataset_responses: int = option(2, "synthetic: noisy-expert responses per prompt "
                                                 "(the data set's candidates, like HH's chosen "
                                                 "and rejected; 0: policy samples only)")
    synthetic_eval_prompts: int = option(200, "synthetic: held-out prompts for the gold-reward "
                                              "evaluation after every round")
    data_seed: int = option(0, "seed of the synthetic data")
    kernels: Literal["engine", "reference"] = option(
        "engine", "the ops: engine (rlengine's fused kernels) or reference (eager PyTorch)")
    threads: int = option(0, THREADS_HELP)
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")

    def __post_init__(self) -> None:
        for name in ("synthetic_queries", "synthetic_eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.synthetic_dataset_responses < 0:
            raise ValueError(f"synthetic_dataset_responses must be >= 0, got "
                             f"{self.synthetic_dataset_responses}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class RRHFJob:
    """Everything RRHFTrainer needs besides its config."""

    policy: torch.nn.Module
    tokenizer: Any
    queries: list[Any]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    task: Any = None


def build_rrhf_job(config: RRHFJobConfig, *, policy_samples: int, log=print) -> RRHFJob:
    synthetic_data, task = _open_job(config, log)

    if synthetic_data:
        if config.synthetic_dataset_responses:
            queries = task.ranked_examples(config.synthetic_queries,
                                           k=max(config.synthetic_dataset_responses, 2),
                                           seed=config.data_seed + 1)
            for q in queries:
                q.responses = q.responses[:config.synthetic_dataset_responses]
                q.scores = q.scores[:config.synthetic_dataset_responses]
        else:
            queries = [RankedExample(p, [], []) for p in
                       task.prompts(config.synthetic_queries, seed=config.data_seed + 1)]
        if config.limit:
            queries = queries[:config.limit]
    else:
        queries = load_queries(config.data, config.data_format, split=config.split,
                               limit=config.limit)
    if config.response_files:
        queries = add_response_files(queries, config.response_files, log)

    # after the data, whose errors are cheap to find; the synthetic policy trains for seconds
    policy, tokenizer = _load_policy(config, task)

    reward = config.reward
    if reward == "auto":
        reward = "gold" if synthetic_data else ("model" if config.reward_model else "dataset")
    kwargs: dict[str, Any] = {}
    if reward == "gold":
        if task is None or not synthetic_data:
            raise ConfigError("reward 'gold' is the synthetic task's: it needs data 'synthetic'")
        kwargs["reward_fn"] = functools.partial(_gold, task)
    elif reward == "model":
        if not config.reward_model:
            raise ConfigError("reward 'model' needs reward_model: a RewardModel folder")
        kwargs["reward_model"] = load_reward_model(config.reward_model)
        check_reward_model_tokenizer(tokenizer, tokenizer_source(config), kwargs["reward_model"],
                                     config.reward_model)
        kwargs["reward_score_mode"] = config.reward_score_mode
    else:
        if policy_samples:
            raise ConfigError("reward 'dataset' scores only the data's own responses: policy "
                              "samples need reward 'gold' or 'model' (or set policy_samples 0)")
        missing = [i for i, q in enumerate(queries) if not isinstance(q, RankedExample)
                   or len(q.responses) < 2]
        if missing:
            raise ConfigError(f"reward 'dataset' needs ranked data (2+ scored responses per "
                              f"prompt); query {missing[0]} has fewer")
    if synthetic_data:
        kwargs["evaluate"], heldout = _synthetic_evaluation(config, task)
        log(f"synthetic task: {len(queries)} training prompts with "
            f"{config.synthetic_dataset_responses} noisy-expert response(s) each, gold reward, "
            f"{len(heldout)} held-out prompts for evaluation")
    kwargs["kernels"] = config.kernels
    return RRHFJob(policy, tokenizer, queries, kwargs, task)


def _open_job(config: RRHFJobConfig | PPOJobConfig, log) -> tuple[bool, Any]:
    """Sets torch's threads; whether the data is synthetic, and the synthetic task where the
    data or the model is (else None)."""
    configure_threads(config.threads, log=log)
    synthetic_data = config.data == SYNTHETIC
    task = synthetic_task(config.synthetic_task_seed) \
        if synthetic_data or config.model == SYNTHETIC else None
    return synthetic_data, task


def _load_policy(config: RRHFJobConfig | PPOJobConfig, task) -> tuple[torch.nn.Module, Any]:
    """The policy and its tokenizer: the synthetic task's SFT policy, or a local folder's."""
    if config.model == SYNTHETIC:
        if config.tokenizer:
            raise ConfigError(f"model 'synthetic' has its own tokenizer; tokenizer "
                              f"{config.tokenizer!r} cannot be used with it")
        return task.sft_policy(), task.tokenizer
    policy = load_causal_lm(config.model, "model")
    tokenizer = _load_tokenizer(config.tokenizer or config.model)
    check_vocabulary_fits(policy, f"the policy {config.model}", tokenizer,
                          tokenizer_source(config))
    return policy, tokenizer


def tokenizer_source(config: RRHFJobConfig | PPOJobConfig | SFTJobConfig) -> str:
    """Where a job's tokenizer came from, in words (for error messages)."""
    if config.model == SYNTHETIC:
        return "the synthetic task's tokenizer"
    if config.tokenizer == "train":
        return "the tokenizer trained on the data"
    folder = tokenizer_folder(config.tokenizer or config.model)
    return f"the tokenizer in {folder}"


def check_vocabulary_fits(model: torch.nn.Module, model_name: str, tokenizer: Any,
                          source: str) -> None:
    """A ConfigError when ``tokenizer`` has ids past the model's embedding table (they would
    fail deep inside the model's forward)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ConfigError(f"{source} has {len(tokenizer)} tokens but {model_name} embeds only "
                          f"{rows}: they do not belong together")


def check_reward_model_tokenizer(tokenizer: Any, source: str, reward_model,
                                 reward_model_path: str | Path) -> None:
    """A ConfigError, naming both, when the policy's tokenizer is not the reward model's:
    RRHF and PPO hand the policy's token ids to the reward model as they are, so one id must
    mean one token to both. A reward model saved without a tokenizer is checked for fitting
    ids only."""
    folder = reward_model_folder(reward_model_path)
    if not (folder / "tokenizer_config.json").is_file() \
            and not (folder / "tokenizer.json").is_file():
        check_vocabulary_fits(reward_model.backbone, f"the reward model {folder}", tokenizer,
                              source)
        return
    theirs = _load_tokenizer(str(folder))
    differences = []
    mine_vocab, their_vocab = tokenizer.get_vocab(), theirs.get_vocab()
    if mine_vocab != their_vocab:
        differing = sorted(set(mine_vocab.items()) ^ set(their_vocab.items()),
                           key=lambda item: item[1])
        examples = ", ".join(f"{token!r}={index}" for token, index in differing[:3])
        differences.append(f"vocabularies of {len(mine_vocab)} and {len(their_vocab)} tokens, "
                           f"{len(differing)} (token, id) entries not shared (e.g. {examples})")
    for name in ("bos_token", "eos_token"):
        if getattr(tokenizer, name) != getattr(theirs, name):
            differences.append(f"{name} {getattr(tokenizer, name)!r} vs "
                               f"{getattr(theirs, name)!r}")
    if differences:
        raise ConfigError(
            f"the policy's tokenizer ({source}) is not the reward model's (the tokenizer in "
            f"{folder}): {'; '.join(differences)}. The reward model scores the policy's token "
            f"ids, so both must use one tokenizer: train the SFT policy with `rlengine sft "
            f"--tokenizer {folder} ...`, or give this command --tokenizer {folder} if the "
            f"policy was trained with it")


def _synthetic_evaluation(config: RRHFJobConfig | PPOJobConfig, task):
    """The held-out gold-reward evaluation of the synthetic task, and its prompts."""
    heldout = task.prompts(config.synthetic_eval_prompts, seed=config.data_seed + 900)
    return functools.partial(evaluate_synthetic, task, heldout, seed=config.data_seed), heldout


def _gold(task, prompt: str, response: str, terminated: bool) -> float:
    return task.gold_reward(prompt, response, terminated=terminated)


def evaluate_synthetic(task, prompts: list[str], policy, *, seed: int = 0) -> dict[str, float]:
    """The policy's mean gold reward on held-out prompts, greedy and sampled (temperature 1),
    and the share of perfect greedy answers."""
    greedy = task.evaluate_policy(policy, prompts, greedy=True)
    sampled = task.evaluate_policy(policy, prompts, greedy=False, seed=seed + 17)
    return {"gold_reward_greedy": greedy["mean_gold_reward"],
            "gold_reward_sampled": sampled["mean_gold_reward"],
            "perfect_greedy": greedy["perfect"]}


def detect_format(source: str, split: str | None = None) -> str:
    """prompts / pairs / ranked / samples, by the fields of the first row."""
    for row in _rows(source, split):
        data = row.data if not isinstance(row, Exception) else None
        if not isinstance(data, dict):
            break
        if "responses" in data:
            return "ranked" if "scores" in data else "samples"
        if "chosen" in data and "rejected" in data:
            return "pairs"
        return "prompts"
    raise ConfigError(f"{source}: cannot tell the data format from the first row; set "
                      f"data_format")


def _rows(source: str, split: str | None):
    if not Path(source).exists():
        raise ConfigError(f"data {source!r} is neither 'synthetic' nor an existing file or "
                          f"folder")
    try:
        yield from iter_rows(source, split=split)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def load_queries(source: str, data_format: str, *, split: str | None = None,
                 limit: int | None = None) -> list[RankedExample]:
    """Queries as RankedExamples (prompt + fixed candidates, scores NaN where the data has
    none)."""
    if data_format == "auto":
        data_format = detect_format(source, split)
    else:
        next(iter(_rows(source, split)), None)  # a missing file is a ConfigError
    nan = float("nan")
    if data_format == "prompts":
        return [RankedExample(p.prompt, [], [], p.source, p.extra)
                for p in load_prompts(source, split=split, limit=limit)]
    if data_format == "pairs":
        return [RankedExample(p.prompt, [p.chosen, p.rejected], [nan, nan], p.source,
                              {**p.extra, "candidate_sources": ["chosen", "rejected"]})
                for p in load_preferences(source, split=split, limit=limit)
                if p.prompt is not None]
    if data_format == "ranked":
        return load_ranked(source, split=split, limit=limit)
    samples = load_samples(source, split=split, limit=limit, min_responses=1)
    for s in samples:
        s.scores = [nan] * len(s.responses)
    return samples


def add_response_files(queries: list[Any], paths: list[str], log) -> list[RankedExample]:
    """Add each file's responses to the queries with the same prompt (exact text match)."""
    out = [q if isinstance(q, RankedExample) else RankedExample(q, [], []) for q in queries]
    by_prompt: dict[str, list[RankedExample]] = {}
    for q in out:
        by_prompt.setdefault(_key(q.prompt), []).append(q)
    for path in paths:
        next(iter(_rows(path, None)), None)
        matched = unmatched = 0
        name = Path(path).name
        for sample in load_samples(path, min_responses=1):
            targets = by_prompt.get(_key(sample.prompt))
            if not targets:
                unmatched += 1
                continue
            matched += 1
            for q in targets:
                sources = q.extra.setdefault("candidate_sources",
                                             ["dataset"] * len(q.responses))
                q.responses = [*q.responses, *sample.responses]
                q.scores = [*q.scores, *[float("nan")] * len(sample.responses)]
                sources.extend([name] * len(sample.responses))
        log(f"{path}: responses for {matched} prompt(s)"
            + (f"; {unmatched} row(s) match no query and are ignored" if unmatched else ""))
    return out


def load_reward_model(path: str | Path):
    """A RewardModel from its folder, or from a `rlengine train-rm` output directory (its
    ``model`` folder); a ConfigError naming the path otherwise."""
    from rlengine.reward.model import RewardModel

    if not Path(path).is_dir():
        raise ConfigError(f"reward_model {path} is not a folder")
    path = reward_model_folder(path)
    try:
        return RewardModel.load(path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"reward_model: {error}") from None


def reward_model_folder(path: str | Path) -> Path:
    """``path``, or the ``model`` folder of a `rlengine train-rm` output directory."""
    return model_folder(path)


def model_folder(path: str | Path) -> Path:
    """``path``, or the ``model`` folder of a run directory (what `rlengine train-rm`, `sft`,
    `rrhf` and `ppo` write to --output-dir: the final model is in ``<output-dir>/model``)."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def _key(prompt: Text) -> str:
    return prompt if isinstance(prompt, str) else repr(prompt)


def load_causal_lm(path: str, what: str):
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise ConfigError(f"{what} {path!r} is neither 'synthetic' nor a local checkpoint folder "
                          f"(the hub is not used)")
    folder = model_folder(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{what} {path!r}: no config.json there (nor in {path}/model): not a "
                          f"transformers checkpoint folder or run directory")
    return AutoModelForCausalLM.from_pretrained(folder)


def _load_tokenizer(path: str):
    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokenizer {path!r}: {error}") from None


# ---- fit-normalizer -------------------------------------------------------------------------

@dataclass
class NormalizerJobConfig:
    reward_model: str | None = option(None, "the RewardModel folder to fit for (rlengine "
                                            "train-rm's output/model); required")
    output: str | None = option(None, "the JSON file to write the parameters to; required")
    data: str = option(SYNTHETIC, "fitting texts: 'synthetic' (the task's comparisons) or a "
                                  "file of pairs (both sides are used) or of {prompt, "
                                  "responses} samples")
    data_format: Literal["auto", "pairs", "samples"] = option(
        "auto", "what data holds (auto: 'responses' rows are samples, else pairs)")
    entropy_model: str | None = option(None, "the frozen causal LM (the SFT policy) whose "
                                             "entropies place segment ends: 'synthetic' (the "
                                             "task's SFT policy, the default on synthetic data) "
                                             "or a local folder")
    tokenizer: str | None = option(None, "a local tokenizer folder (default: the reward "
                                         "model's; 'synthetic': the task's)")
    threshold: float = option(1.75, "segmentation threshold c: fit for the threshold PPO uses")
    min_count: int = option(2, "locations with fewer segments are left out of the fit")
    limit: int | None = option(None, "use only the first N rows")
    split: str | None = option(None, "split to read from a DatasetDict folder")
    max_length: int | None = option(None, "truncate prompt + response to this many tokens")
    batch_size: int = option(32, "texts per forward pass")
    synthetic_task_seed: int = option(0, "synthetic: the task's seed")
    synthetic_pairs: int = option(1000, "synthetic: comparisons (2 responses each)")
    data_seed: int = option(0, "seed of the synthetic data")
    threads: int = option(0, THREADS_HELP)
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda if available)")

    def __post_init__(self) -> None:
        for name in ("min_count", "batch_size", "synthetic_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def run_fit_normalizer(config: NormalizerJobConfig, *, kernels: str = "engine", log=print):
    """Collect segment rewards over the fitting texts, fit, save; returns the normalizer."""
    if not config.reward_model:
        raise ConfigError("reward_model is required: the RewardModel folder to fit for")
    if not config.output:
        raise ConfigError("output is required: the JSON file to write")
    configure_threads(config.threads, log=log)
    path = Path(config.reward_model)
    reward_model = load_reward_model(path)
    synthetic_data = config.data == SYNTHETIC
    task = synthetic_task(config.synthetic_task_seed) if synthetic_data or SYNTHETIC in (
        config.entropy_model, config.tokenizer) else None
    entropy_name = config.entropy_model or (SYNTHETIC if synthetic_data else None)
    if entropy_name is None:
        raise ConfigError("entropy_model is required on a data file: the SFT policy's folder "
                          "(with the reward model's tokenizer)")
    entropy_model = task.sft_policy() if entropy_name == SYNTHETIC else \
        load_causal_lm(entropy_name, "entropy_model")
    if config.tokenizer == SYNTHETIC or (config.tokenizer is None and entropy_name == SYNTHETIC
                                         and not (path / "tokenizer.json").exists()):
        tokenizer = task.tokenizer
    else:
        tokenizer = _load_tokenizer(config.tokenizer or str(path))
    if synthetic_data:
        pairs = task.preference_pairs(config.synthetic_pairs, seed=config.data_seed + 300)
        texts = [(p.prompt, side) for p in pairs for side in (p.chosen, p.rejected)]
    else:
        texts = _fitting_texts(config)
    if config.limit and synthetic_data:
        texts = texts[:2 * config.limit]
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    normalizer, locations, rewards = fit_location_normalizer(
        reward_model, entropy_model, tokenizer, texts, threshold=config.threshold,
        min_count=config.min_count, batch_size=config.batch_size, max_length=config.max_length,
        kernels=kernels, device=device, model=str(config.reward_model), log=log)
    normalizer.save(config.output)
    return normalizer, locations, rewards


def fit_location_normalizer(reward_model, entropy_model, tokenizer, texts, *, threshold: float,
                            min_count: int = 2, batch_size: int = 32,
                            max_length: int | None = None, kernels: str = "engine",
                            device: str | torch.device = "cpu", model: str | None = None,
                            log=print):
    """Collect the raw segment rewards of ``(prompt, response)`` texts and fit the normalizer:
    ``(normalizer, locations, rewards)``; a ConfigError when the fit cannot be made."""
    from rlengine.policy.normalizer import LocationNormalizer, collect_segment_rewards

    reward_model.to(device)
    entropy_model.to(device)
    log(f"collecting segment rewards of {len(texts)} responses (threshold {threshold})")
    locations, rewards = collect_segment_rewards(
        reward_model, entropy_model, tokenizer, texts, threshold=threshold,
        batch_size=batch_size, max_length=max_length, kernels=kernels, device=device)
    try:
        normalizer = LocationNormalizer.fit(locations, rewards, min_count=min_count,
                                            threshold=threshold, model=model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return normalizer, locations, rewards


def _fitting_texts(config: NormalizerJobConfig) -> list[tuple[Text, Text]]:
    data_format = config.data_format
    if data_format == "auto":
        detected = detect_format(config.data, config.split)
        data_format = "samples" if detected in ("ranked", "samples") else "pairs"
    else:
        next(iter(_rows(config.data, config.split)), None)
    if data_format == "pairs":
        pairs = load_preferences(config.data, split=config.split, limit=config.limit)
        return [(p.prompt, side) for p in pairs if p.prompt is not None
                for side in (p.chosen, p.rejected)]
    samples = load_samples(config.data, split=config.split, limit=config.limit,
                           min_responses=1)
    return [(s.prompt, r) for s in samples for r in s.responses]


# ---- ppo ------------------------------------------------------------------------------------

@dataclass
class PPOJobConfig:
    model: str = option(SYNTHETIC, "the policy: 'synthetic' (the task's SFT policy) or a local "
                                   "causal-LM folder (with its tokenizer)")
    tokenizer: str | None = option(None, "a local tokenizer folder (default: the model's own)")
    data: str = option(SYNTHETIC, "prompts: 'synthetic' or a .jsonl/.json/.parquet file or "
                                  "datasets folder of {prompt} rows (or pairs, whose prompt is "
                                  "used)")
    reward: Literal["auto", "gold", "model", "train"] = option(
        "auto", "the task reward: gold (the synthetic task's function, at the last token), "
                "model (reward_model), train (synthetic: train a reward model on the task's "
                "preference pairs first, score mode from reward_kind); auto: model if "
                "reward_model is set, else gold on synthetic data")
    reward_model: str | None = option(None, "a RewardModel folder or a `rlengine train-rm` "
                                            "output directory, sharing the policy's tokenizer")
    normalizer: str = option("auto", "location normalizer of token and segment rewards: a JSON "
                                     "file (`rlengine fit-normalizer`), 'fit' (fit it now on "
                                     "the reward model, over the synthetic task's pairs or "
                                     "normalizer_data), 'none' (raw rewards); auto: fit for "
                                     "token and segment rewards, none for bandit")
    normalizer_data: str | None = option(None, "pairs or {prompt, responses} file to fit the "
                                               "normalizer on (default with synthetic data: "
                                               "the task's pairs)")
    critic: Literal["policy", "reward_model"] = option(
        "policy", "the critic's start: the policy's body with a fresh value head (the paper), "
                  "or a copy of the reward model, head included")
    limit: int | None = option(None, "use only the first N prompts")
    split: str | None = option(None, "split to read from a DatasetDict folder")
    synthetic_task_seed: int = option(0, "synthetic: the task's seed")
    synthetic_prompts: int = option(512, "synthetic: training prompts")
    synthetic_eval_prompts: int = option(200, "synthetic: held-out prompts for the gold-reward "
                                              "evaluation")
    synthetic_rm_pairs: int = option(2000, "reward 'train': the task's noisy preference pairs "
                                           "(20% flipped labels)")
    synthetic_rm_steps: int = option(600, "reward 'train': optimizer steps of 32 pairs")
    synthetic_normalizer_pairs: int = option(1000, "normalizer 'fit' on synthetic data: pairs "
                                                   "(both responses used)")
    data_seed: int = option(0, "seed of the synthetic data")
    kernels: Literal["engine", "reference"] = option(
        "engine", "the ops: engine (rlengine's fused kernels) or reference (eager PyTorch)")
    threads: int = option(0, THREADS_HELP)
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")

    def __post_init__(self) -> None:
        for name in ("synthetic_prompts", "synthetic_eval_prompts", "synthetic_rm_pairs",
                     "synthetic_rm_steps", "synthetic_normalizer_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


@dataclass
class PPOJob:
    """Everything PPOTrainer needs besides its config."""

    policy: torch.nn.Module
    tokenizer: Any
    prompts: list[Any]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


# A reward model's sequence score for each PPO reward kind: what it is trained on.
SCORE_MODE_OF_REWARD_KIND = {"bandit": "last", "token": "token_mean", "segment": "segment"}
# Token-level rewards are segments of one token: every entropy is above this threshold.
TOKEN_LEVEL_THRESHOLD = -1.0


def train_synthetic_reward_model(task, policy, *, reward_kind: str, pairs: int, steps: int,
                                 seed: int = 0, segment_threshold: float = 1.75,
                                 kernels: str = "engine", device: str | None = None, log=print):
    """A RewardModel trained by RewardTrainer on the task's noisy preference pairs, started from
    ``policy``'s body, its score mode the one ``reward_kind`` reads (bandit: last; token:
    token_mean; segment: segment, with ``policy`` as the entropy model)."""
    from rlengine.reward.config import RewardTrainerConfig
    from rlengine.reward.job import seeded_reward_model
    from rlengine.reward.trainer import RewardTrainer

    score_mode = SCORE_MODE_OF_REWARD_KIND[reward_kind]
    train_pairs = task.preference_pairs(pairs, seed=seed + 1)
    # the reward acceptance's settings for the tiny task (rlengine/reward/acceptance.py)
    config = RewardTrainerConfig(lr=2e-3, batch_size=32, steps=steps, schedule="constant",
                                 adam_beta2=0.999, max_grad_norm=None, score_mode=score_mode,
                                 segment_threshold=segment_threshold, seed=seed, progress=False,
                                 log_every=0, save_model=False)
    model = seeded_reward_model(task.make_reward_backbone(from_policy=policy), 97 * seed)
    log(f"training a {score_mode} reward model on {pairs} synthetic pairs ({steps} steps)")
    RewardTrainer(model, task.tokenizer, train_pairs, config,
                  entropy_model=policy if score_mode == "segment" else None, device=device,
                  kernels=kernels, log=lambda *_: None).train()
    return model.eval()


def build_ppo_job(config: PPOJobConfig, *, reward_kind: str, segment_threshold: float,
                  prompts_per_iteration: int = 1, log=print) -> PPOJob:
    """The policy, prompts, reward (and normalizer), critic and evaluation that ``config``
    names; a ConfigError for a combination that cannot work."""
    from rlengine.policy.normalizer import LocationNormalizer
    from rlengine.policy.rollout import make_critic

    synthetic_data, task = _open_job(config, log)
    if synthetic_data:
        prompts: list[Any] = task.prompts(config.synthetic_prompts, seed=config.data_seed + 1)
        if config.limit:
            prompts = prompts[:config.limit]
    else:
        next(iter(_rows(config.data, config.split)), None)  # a missing file is a ConfigError
        prompts = [p.prompt for p in load_prompts(config.data, split=config.split,
                                                  limit=config.limit)]
    if len(prompts) < prompts_per_iteration:
        raise ConfigError(f"prompts_per_iteration ({prompts_per_iteration}) is larger than the "
                          f"number of prompts ({len(prompts)})")
    reward = config.reward
    if reward == "auto":
        reward = "model" if config.reward_model else ("gold" if synthetic_data else None)
        if reward is None:
            raise ConfigError("no reward: set reward_model (a RewardModel folder) for data "
                              f"{config.data!r}")
    if reward in ("gold", "train") and not synthetic_data:
        raise ConfigError(f"reward {reward!r} is the synthetic task's: it needs data "
                          f"'synthetic'")
    if reward == "model" and not config.reward_model:
        raise ConfigError("reward 'model' needs reward_model: a RewardModel folder")
    if reward == "gold" and reward_kind != "bandit":
        raise ConfigError(f"reward 'gold' is one number per response (reward_kind 'bandit'); "
                          f"reward_kind {reward_kind!r} needs a reward model (reward 'model' or "
                          f"'train')")
    if config.critic == "reward_model" and reward == "gold":
        raise ConfigError("critic 'reward_model' needs a reward model (reward 'model' or "
                          "'train')")
    normalizer_file = config.normalizer not in ("auto", "fit", "none")
    if normalizer_file and not Path(config.normalizer).is_file():
        raise ConfigError(f"normalizer {config.normalizer!r} is neither auto, fit, none nor an "
                          f"existing JSON file")
    if reward_kind == "bandit" and config.normalizer not in ("auto", "none"):
        raise ConfigError("a location normalizer applies to token and segment rewards; "
                          "reward_kind is 'bandit'")
    reward_model = load_reward_model(config.reward_model) if reward == "model" else None

    # after the cheap checks: the synthetic policy trains for seconds
    policy, tokenizer = _load_policy(config, task)
    if reward_model is not None:
        check_reward_model_tokenizer(tokenizer, tokenizer_source(config), reward_model,
                                     config.reward_model)

    kwargs: dict[str, Any] = {"kernels": config.kernels}
    if synthetic_data:
        gold = functools.partial(_gold, task)
        kwargs["gold_fn"] = gold
        kwargs["evaluate"], _ = _synthetic_evaluation(config, task)
        if reward == "gold":
            kwargs["reward_fn"] = gold
    if reward == "train":
        reward_model = train_synthetic_reward_model(
            task, policy, reward_kind=reward_kind, pairs=config.synthetic_rm_pairs,
            steps=config.synthetic_rm_steps, seed=config.data_seed,
            segment_threshold=segment_threshold, kernels=config.kernels, device=config.device,
            log=log)
    normalizer = None
    if reward_model is not None:
        kwargs["reward_model"] = reward_model
        if normalizer_file:
            normalizer = LocationNormalizer.load(config.normalizer)
            if reward_kind == "segment" and normalizer.threshold is not None \
                    and normalizer.threshold != segment_threshold:
                log(f"warning: normalizer {config.normalizer} was fitted at threshold "
                    f"{normalizer.threshold}, PPO segments at {segment_threshold}")
        elif reward_kind != "bandit" and config.normalizer in ("auto", "fit"):
            normalizer = _fit_normalizer_now(config, task, reward_model, policy, tokenizer,
                                             reward_kind, segment_threshold, log)
        if normalizer is not None:
            kwargs["normalizer"] = normalizer.parameters
        if config.critic == "reward_model":
            kwargs["critic"] = make_critic(reward_model=reward_model)
    log(f"prompts: {len(prompts)}; reward: {reward}"
        + (f" ({reward_kind})" if reward != "gold" else "")
        + (f"; normalizer mu(p) = {normalizer.a_mu:.3f} log p + {normalizer.b_mu:.3f}, "
           f"sigma(p) = {normalizer.a_sigma:.3f} log p + {normalizer.b_sigma:.3f}"
           if normalizer is not None else ""))
    return PPOJob(policy, tokenizer, prompts, kwargs)


def _fit_normalizer_now(config: PPOJobConfig, task, reward_model, policy, tokenizer,
                        reward_kind: str, segment_threshold: float, log):
    """The normalizer of this reward model and threshold, fitted on the synthetic task's pairs
    or on normalizer_data, with the (initial) policy as entropy model."""
    if config.normalizer_data:
        fit_config = NormalizerJobConfig(data=config.normalizer_data, reward_model="-",
                                         output="-")
        texts = _fitting_texts(fit_config)
    elif task is not None and config.data == SYNTHETIC:
        pairs = task.preference_pairs(config.synthetic_normalizer_pairs,
                                      seed=config.data_seed + 300)
        texts = [(p.prompt, side) for p in pairs for side in (p.chosen, p.rejected)]
    else:
        raise ConfigError("fitting the normalizer needs texts: set normalizer_data (a file of "
                          "pairs or {prompt, responses}) or give a normalizer JSON file")
    threshold = segment_threshold if reward_kind == "segment" else TOKEN_LEVEL_THRESHOLD
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    normalizer, _, _ = fit_location_normalizer(
        reward_model, policy, tokenizer, texts, threshold=threshold, kernels=config.kernels,
        device=device, model=config.reward_model or "trained now", log=log)
    return normalizer


# ---- sft ------------------------------------------------------------------------------------

@dataclass
class SFTJobConfig:
    data: str = option(SYNTHETIC, "demonstrations: 'synthetic' (the task's noisy expert) or a "
                                  ".jsonl/.json/.parquet file or datasets folder of {prompt, "
                                  "response} / {prompt, completion} rows, preference pairs "
                                  "(the chosen response), HH-RLHF transcripts or {messages} "
                                  "conversations")
    eval: dict[str, str] = option({}, "held-out demonstrations as name=path[,name=path]")
    eval_fraction: float = option(0.0, "hold out this fraction of the training examples as the "
                                       "'heldout' evaluation set (shuffled with data_seed)")
    limit: int | None = option(None, "use only the first N training examples")
    split: str | None = option(None, "split to read from a DatasetDict folder")
    data_seed: int = option(0, "seed of the held-out split and of the synthetic data")
    model: str = option(SYNTHETIC, "the policy to fine-tune: 'synthetic' (the task's tiny "
                                   "llama, random init), 'tiny-llama' / 'tiny-gpt2' (a small "
                                   "random-init model sized to the tokenizer) or a local "
                                   "causal-LM folder")
    tokenizer: str | None = option(None, "a local tokenizer folder or run directory (a "
                                         "`rlengine train-rm` output, so that the policy shares "
                                         "the reward model's tokenizer), or 'train' (byte-level "
                                         "BPE on the training texts); default: the model's own")
    tokenizer_vocab: int = option(4096, "vocabulary of a trained tokenizer")
    tiny_hidden: int = option(128, "tiny-*: hidden size")
    tiny_layers: int = option(2, "tiny-*: layers")
    tiny_dropout: float = option(0.0, "tiny-*: dropout")
    model_seed: int = option(0, "seed of a randomly initialised model")
    synthetic_task_seed: int = option(0, "synthetic: the task's seed")
    synthetic_demonstrations: int = option(4000, "synthetic: the noisy expert's demonstrations")
    synthetic_error_rate: float = option(0.1, "synthetic: the expert's error rate")
    synthetic_eval_prompts: int = option(200, "synthetic: held-out prompts for the gold-reward "
                                              "evaluation")
    kernels: Literal["engine", "reference"] = option(
        "engine", "the ops: engine (rlengine's fused kernels) or reference (eager PyTorch)")
    threads: int = option(0, THREADS_HELP)
    device: str | None = option(None, "cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("synthetic_demonstrations", "synthetic_eval_prompts", "tokenizer_vocab",
                     "tiny_hidden", "tiny_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not 0.0 <= self.synthetic_error_rate <= 1.0:
            raise ValueError(f"synthetic_error_rate must be in [0, 1], got "
                             f"{self.synthetic_error_rate}")


@dataclass
class SFTJob:
    """Everything SFTTrainer needs besides its config."""

    policy: torch.nn.Module
    tokenizer: Any
    examples: list[Demonstration]
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def build_sft_job(config: SFTJobConfig, *, max_length: int | None = None, log=print) -> SFTJob:
    """The demonstrations, held-out sets, tokenizer and policy that ``config`` names;
    ``max_length`` (the trainer's) sizes the position table of a tiny model. A ConfigError for
    a combination that cannot work."""
    from rlengine.reward.job import TINY_MODELS, _split_heldout

    configure_threads(config.threads, log=log)
    synthetic_data = config.data == SYNTHETIC
    task = synthetic_task(config.synthetic_task_seed) \
        if synthetic_data or config.model == SYNTHETIC else None
    if synthetic_data:
        examples = task.demonstrations(config.synthetic_demonstrations,
                                       config.synthetic_error_rate, seed=config.data_seed + 1)
        if config.limit:
            examples = examples[:config.limit]
    else:
        next(iter(_rows(config.data, config.split)), None)  # a missing file is a ConfigError
        examples = load_demonstrations(config.data, split=config.split, limit=config.limit)
        if not examples:
            raise ConfigError(f"data {config.data}: no rows")
    examples, heldout = _split_heldout(examples, config)
    eval_sets: dict[str, list[Demonstration]] = {"heldout": heldout} if heldout else {}
    for name, path in config.eval.items():
        next(iter(_rows(path, config.split)), None)
        eval_sets[name] = load_demonstrations(path, split=config.split)

    if config.model == SYNTHETIC:
        if config.tokenizer:
            raise ConfigError(f"model 'synthetic' has its own tokenizer; tokenizer "
                              f"{config.tokenizer!r} cannot be used with it")
        tokenizer = task.tokenizer
        policy = task.make_policy(config.model_seed)
    elif config.model in TINY_MODELS:
        if not config.tokenizer:
            raise ConfigError(f"model {config.model!r} is built for a tokenizer: give tokenizer "
                              f"as a local folder (the reward model's: its `rlengine train-rm` "
                              f"output directory) or 'train'")
        tokenizer = _sft_tokenizer(config, examples)
        policy = _tiny_policy(config, tokenizer, max_length)
    else:
        if config.tokenizer == "train":
            raise ConfigError(f"tokenizer 'train' makes new token ids, which mean nothing to the "
                              f"trained model {config.model!r}: use its own tokenizer (leave "
                              f"tokenizer unset) or a tiny-* model")
        policy = load_causal_lm(config.model, "model")
        tokenizer = _load_tokenizer(config.tokenizer or config.model)
        check_vocabulary_fits(policy, f"the policy {config.model}", tokenizer,
                              tokenizer_source(config))
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{tokenizer_source(config)} has no EOS token: an SFT policy must learn "
                          f"to stop, and RRHF and PPO end its samples at EOS")

    kwargs: dict[str, Any] = {"eval_sets": eval_sets, "kernels": config.kernels}
    if synthetic_data:
        kwargs["evaluate"], prompts = _synthetic_evaluation(config, task)
        log(f"synthetic task: {len(examples)} noisy-expert demonstrations (error rate "
            f"{config.synthetic_error_rate}), gold reward on {len(prompts)} held-out prompts")
    return SFTJob(policy, tokenizer, examples, kwargs)


def _sft_tokenizer(config: SFTJobConfig, examples: list[Demonstration]):
    if config.tokenizer == "train":
        return train_text_tokenizer(example_texts(examples), vocab_size=config.tokenizer_vocab)
    return _load_tokenizer(config.tokenizer)


def _tiny_policy(config: SFTJobConfig, tokenizer: Any, max_length: int | None):
    from rlengine.synthetic.models import ModelConfig, make_causal_lm

    # the position table covers the longest training text; RRHF and PPO later generate
    # prompt + response within it too
    positions = max(max_length or 1024, 64)
    try:
        model_config = ModelConfig(architecture=config.model.removeprefix("tiny-"),
                                   hidden_size=config.tiny_hidden, num_layers=config.tiny_layers,
                                   num_heads=4, intermediate_size=4 * config.tiny_hidden,
                                   max_positions=positions, dropout=config.tiny_dropout)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return make_causal_lm(model_config, tokenizer, config.model_seed)
