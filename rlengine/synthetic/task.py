"""The built-in synthetic RLHF task: a small formal language with a programmatic gold reward.

A prompt asks for a transformation of a few symbol words and ends with the answer marker::

    prompt   "reverse cat owl ant ="
    response "ant owl cat"                       (EOS follows when tokenized)

The gold reward r*(prompt, response) is a sum of per-word scores (correct word at its
position, wrong symbol, filler word, word past the expected end) plus a global part (a bonus
for exactly the right length, a penalty for a response that never ended). The per-word part
makes quality local, so segment- and token-level rewards have something to localise; the global
part needs the whole response.

Everything is a pure function of the task seed and the seed passed to each method. Texts are
plain strings of space-separated words; prompt and response are separate strings.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerFast

from rlengine.data.types import (
    Demonstration,
    PreferencePair,
    PromptExample,
    RankedExample,
    Source,
)
from rlengine.synthetic import models as _models
from rlengine.synthetic import training as _training
from rlengine.synthetic.vocabulary import (
    ALL_OPS,
    ALL_SYMBOLS,
    ANSWER_MARKER,
    FILLERS,
    build_tokenizer,
    vocabulary,
)

if TYPE_CHECKING:  # transformers' model classes load when a model is first built (seconds)
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class TaskConfig:
    """Everything that defines the synthetic task. The defaults are tuned so that a tiny reward
    model learns it well but not perfectly in seconds on 2 CPU cores, and 20% flipped labels
    hurt it enough for denoising to show (numbers: rlengine/synthetic/calibrate.py)."""

    # The language.
    ops: tuple[str, ...] = ALL_OPS
    n_symbols: int = 16
    min_symbols: int = 3
    max_symbols: int = 8
    # Gold reward, per response word: the right word at its position, another symbol, a word
    # that is not a symbol (filler, op, marker, unknown), a symbol past the answer's length.
    correct_reward: float = 1.0
    wrong_symbol_reward: float = 0.0
    forbidden_reward: float = -1.0
    extra_reward: float = -0.5
    # Gold reward, global: exactly the expected number of words; the response never ended
    # (no EOS: generation hit its length limit).
    length_bonus: float = 1.0
    unterminated_penalty: float = 2.0
    # Noisy expert: each answer word is wrong with probability error_rate; a wrong word is a
    # filler with probability filler_share, else another symbol drawn from the prompt's own
    # symbols with probability in_prompt_share (the hard case: a reward model must compare
    # positions to see it) or from all symbols otherwise. With probability
    # error_rate * length_error_share the response also stops early (with probability
    # stop_share) or rambles on. An early stop is visible only at EOS: a reward model that
    # reads content tokens only (segment / token level) cannot see it.
    filler_share: float = 0.35
    in_prompt_share: float = 0.35
    length_error_share: float = 0.5
    stop_share: float = 0.5
    # Comparisons: each of the two responses of a pair gets its own error rate drawn uniformly
    # from this range, so pairs range from easy (one clean, one bad) to hard (both alike).
    pair_error_rates: tuple[float, float] = (0.0, 0.5)
    # Simulated annotator: P(a > b) = sigmoid((r*(a) - r*(b)) / temperature); 0 means the gold
    # preference itself.
    annotator_temperature: float = 0.3
    # Tiny models.
    model: _models.ModelConfig = field(default_factory=_models.ModelConfig)

    def __post_init__(self) -> None:
        if not self.ops or len(set(self.ops)) != len(self.ops) or not set(self.ops) <= set(ALL_OPS):
            raise ValueError(f"ops must be distinct names from {ALL_OPS}, got {self.ops}")
        if not 2 <= self.n_symbols <= len(ALL_SYMBOLS):
            raise ValueError(f"n_symbols must be in [2, {len(ALL_SYMBOLS)}], got {self.n_symbols}")
        if not 1 <= self.min_symbols <= self.max_symbols <= self.n_symbols:
            raise ValueError("need 1 <= min_symbols <= max_symbols <= n_symbols, got "
                             f"{self.min_symbols}, {self.max_symbols}, {self.n_symbols}")
        # These orderings make the target the unique best response and every error cost reward.
        if not self.correct_reward > self.wrong_symbol_reward >= self.forbidden_reward:
            raise ValueError("need correct_reward > wrong_symbol_reward >= forbidden_reward")
        if not (self.extra_reward < 0 and self.length_bonus > 0 and self.unterminated_penalty >= 0):
            raise ValueError("need extra_reward < 0, length_bonus > 0, unterminated_penalty >= 0")
        for name in ("filler_share", "in_prompt_share", "length_error_share", "stop_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        low, high = self.pair_error_rates
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"pair_error_rates must be 0 <= low <= high <= 1, got "
                             f"{self.pair_error_rates}")
        if self.annotator_temperature < 0:
            raise ValueError(f"annotator_temperature must be >= 0, got "
                             f"{self.annotator_temperature}")
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", _models.ModelConfig(**self.model))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GoldReward:
    """The gold reward of one response, split into its parts: ``token_rewards`` has one entry
    per response word (in order), ``global_reward`` holds the length bonus and the
    unterminated penalty; ``total`` is their sum."""

    token_rewards: tuple[float, ...]
    global_reward: float

    @property
    def total(self) -> float:
        return math.fsum(self.token_rewards) + self.global_reward


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class SyntheticTask:
    """The synthetic task: its language, gold reward, tokenizer, tiny models and data sets.

    ``SyntheticTask(seed=0, n_symbols=12, ...)`` takes TaskConfig fields as keywords, or a
    whole ``config=TaskConfig(...)``. ``seed`` is mixed into every random stream of the task (a
    method's own ``seed`` picks a stream within it), so two tasks with different seeds draw
    different data and models from the same method seeds.
    """

    def __init__(self, seed: int = 0, config: TaskConfig | None = None, **overrides: Any):
        if config is not None and overrides:
            raise TypeError("pass either config or TaskConfig fields as keywords, not both")
        if config is None:
            known = {f.name for f in fields(TaskConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise TypeError(f"unknown TaskConfig fields: {unknown}")
            config = TaskConfig(**overrides)
        self.seed = int(seed)
        self.config = config
        self.symbols: tuple[str, ...] = ALL_SYMBOLS[:config.n_symbols]
        self._symbol_rank = {s: i for i, s in enumerate(self.symbols)}
        self.words = vocabulary(config.ops, config.n_symbols)
        self.tokenizer: PreTrainedTokenizerFast = build_tokenizer(self.words)
        self._sft_cache: dict[tuple, PreTrainedModel] = {}

    # ---- randomness ------------------------------------------------------------------------

    def _rng(self, stream: str, seed: int) -> random.Random:
        # random.Random seeded by a string hashes it with SHA-512: stable across platforms and
        # Python versions, and independent streams per (task seed, purpose, seed).
        return random.Random(f"rlengine.synthetic/{self.seed}/{stream}/{int(seed)}")

    def _torch_seed(self, stream: str, seed: int | None) -> int:
        return self._rng(stream, self.seed if seed is None else seed).getrandbits(63)

    # ---- the language ----------------------------------------------------------------------

    def parse_prompt(self, prompt: str) -> tuple[str, list[str]]:
        """(op, symbols) of a prompt; ValueError if it is not one of this task's prompts."""
        words = prompt.split()
        if len(words) < 3 or words[0] not in self.config.ops or words[-1] != ANSWER_MARKER:
            raise ValueError(f"not a synthetic task prompt (expected '<op> <symbols...> "
                             f"{ANSWER_MARKER}' with op in {self.config.ops}): {prompt!r}")
        symbols = words[1:-1]
        bad = [s for s in symbols if s not in self._symbol_rank]
        if bad:
            raise ValueError(f"prompt {prompt!r} has words that are not symbols: {bad}")
        return words[0], symbols

    def transform(self, op: str, symbols: Sequence[str]) -> list[str]:
        if op == "copy":
            return list(symbols)
        if op == "reverse":
            return list(reversed(symbols))
        if op == "sort":
            return sorted(symbols, key=self._symbol_rank.__getitem__)
        raise ValueError(f"unknown op {op!r}")

    def target(self, prompt: str) -> str:
        """The perfect response to a prompt."""
        return " ".join(self.transform(*self.parse_prompt(prompt)))

    def make_prompt(self, op: str, symbols: Sequence[str]) -> str:
        return " ".join([op, *symbols, ANSWER_MARKER])

    def _draw_prompt(self, rng: random.Random) -> tuple[str, list[str]]:
        c = self.config
        op = rng.choice(c.ops)
        # Distinct symbols: sort is then a permutation, and a wrong symbol is unambiguous.
        symbols = rng.sample(self.symbols, rng.randint(c.min_symbols, c.max_symbols))
        return op, symbols

    # ---- gold reward -----------------------------------------------------------------------

    def gold(self, prompt: str, response: str, *, terminated: bool = True) -> GoldReward:
        """The gold reward of ``response`` to ``prompt``, split into per-word and global parts.

        ``terminated=False`` marks a response that never produced EOS (cut at the generation
        limit); texts from data sets are terminated (the tokenizer user appends EOS)."""
        c = self.config
        target = self.transform(*self.parse_prompt(prompt))
        words = response.split()
        token_rewards = []
        for position, word in enumerate(words):
            if word not in self._symbol_rank:
                token_rewards.append(c.forbidden_reward)
            elif position >= len(target):
                token_rewards.append(c.extra_reward)
            elif word == target[position]:
                token_rewards.append(c.correct_reward)
            else:
                token_rewards.append(c.wrong_symbol_reward)
        global_reward = (c.length_bonus if len(words) == len(target) else 0.0) - (
            0.0 if terminated else c.unterminated_penalty)
        return GoldReward(tuple(token_rewards), global_reward)

    def gold_reward(self, prompt: str, response: str, *, terminated: bool = True) -> float:
        """r*(prompt, response): the sum of the per-word rewards and the global part."""
        return self.gold(prompt, response, terminated=terminated).total

    def gold_token_rewards(self, prompt: str, response: str) -> list[float]:
        """The per-word part of the gold reward: one value per response word."""
        return list(self.gold(prompt, response).token_rewards)

    def max_gold_reward(self, prompt: str) -> float:
        """The gold reward of the perfect response (the unique maximum)."""
        n = len(self.parse_prompt(prompt)[1])
        return n * self.config.correct_reward + self.config.length_bonus

    def gold_rewards(self, prompts: Sequence[str], responses: Sequence[str],
                     terminated: Sequence[bool] | None = None) -> list[float]:
        """Gold rewards of many (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        flags = [True] * len(prompts) if terminated is None else list(terminated)
        return [self.gold_reward(p, r, terminated=t) for p, r, t in zip(prompts, responses, flags)]

    # ---- the noisy expert ------------------------------------------------------------------

    def expert_response(self, prompt: str, error_rate: float, rng: random.Random
                        ) -> tuple[str, list[tuple[int, str]]]:
        """A response by the noisy expert and its injected errors as (position, kind), kind one
        of "filler", "symbol" (a wrong symbol), "stop" (the response ends at that position),
        "ramble" (extra words from that position on)."""
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        c = self.config
        op, symbols = self.parse_prompt(prompt)
        words = self.transform(op, symbols)
        errors: list[tuple[int, str]] = []
        for position, right in enumerate(words):
            if rng.random() >= error_rate:
                continue
            if rng.random() < c.filler_share:
                words[position] = rng.choice(FILLERS)
                errors.append((position, "filler"))
            else:
                in_prompt = [s for s in symbols if s != right]
                pool = in_prompt if in_prompt and rng.random() < c.in_prompt_share else [
                    s for s in self.symbols if s != right]
                words[position] = rng.choice(pool)
                errors.append((position, "symbol"))
        if rng.random() < error_rate * c.length_error_share:
            if rng.random() < c.stop_share:
                stop = rng.randrange(len(words))
                words = words[:stop]
                errors = [e for e in errors if e[0] < stop] + [(stop, "stop")]
            else:
                errors.append((len(words), "ramble"))
                words += [rng.choice(self.symbols) for _ in range(rng.randint(1, 3))]
        return " ".join(words), errors

    def demonstrations(self, n: int, error_rate: float = 0.1, seed: int = 0) -> list[Demonstration]:
        """n SFT demonstrations by the noisy expert at ``error_rate``."""
        rng = self._rng("demonstrations", seed)
        out = []
        for i in range(n):
            prompt = self.make_prompt(*self._draw_prompt(rng))
            response, errors = self.expert_response(prompt, error_rate, rng)
            out.append(Demonstration(prompt, response, extra={
                "errors": errors, "gold_reward": self.gold_reward(prompt, response), "index": i}))
        return out

    # ---- prompts -----------------------------------------------------------------------------

    def prompts(self, n: int, seed: int = 0) -> list[str]:
        """n prompts."""
        rng = self._rng("prompts", seed)
        return [self.make_prompt(*self._draw_prompt(rng)) for _ in range(n)]

    def prompt_examples(self, n: int, seed: int = 0) -> list[PromptExample]:
        """n prompts as PromptExample (for PPO), with the op, the target and the best reward in
        ``extra``."""
        name = f"synthetic:prompts/seed={seed}"
        return [PromptExample(p, Source(name, i), {
                    "op": p.split()[0], "target": self.target(p),
                    "max_gold_reward": self.max_gold_reward(p)})
                for i, p in enumerate(self.prompts(n, seed))]

    # ---- comparisons -------------------------------------------------------------------------

    def _error_rate(self, rng: random.Random, error_rates: tuple[float, float] | None) -> float:
        low, high = self.config.pair_error_rates if error_rates is None else error_rates
        return rng.uniform(low, high)

    def response_pairs(self, n: int, seed: int = 0,
                       error_rates: tuple[float, float] | None = None
                       ) -> tuple[list[str], list[str], list[str]]:
        """(prompts, responses_a, responses_b): n prompts with two noisy-expert responses each,
        at error rates drawn uniformly from ``error_rates`` (default: the config's
        ``pair_error_rates``). Pairs whose gold rewards tie are redrawn, so every pair has a
        gold preference."""
        rng = self._rng("pairs", seed)
        prompts, first, second = [], [], []
        attempts = 0
        while len(prompts) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise ValueError(f"error rates {error_rates or self.config.pair_error_rates} "
                                 "almost never give two responses of different gold reward")
            prompt = self.make_prompt(*self._draw_prompt(rng))
            a, _ = self.expert_response(prompt, self._error_rate(rng, error_rates), rng)
            b, _ = self.expert_response(prompt, self._error_rate(rng, error_rates), rng)
            if self.gold_reward(prompt, a) == self.gold_reward(prompt, b):
                continue
            prompts.append(prompt)
            first.append(a)
            second.append(b)
        return prompts, first, second

    def annotate(self, prompts: Sequence[str], responses_a: Sequence[str],
                 responses_b: Sequence[str], *, flip_fraction: float = 0.0,
                 temperature: float | None = None, seed: int = 0,
                 terminated_a: Sequence[bool] | None = None,
                 terminated_b: Sequence[bool] | None = None,
                 name: str | None = None) -> list[PreferencePair]:
        """The simulated annotator: labels each (a, b) pair by Bradley-Terry on the gold reward,
        P(a > b) = sigmoid((r*(a) - r*(b)) / temperature) (temperature 0: the gold preference,
        a fair coin on ties), then flips exactly round(flip_fraction * n) labels chosen at
        random. Works on any responses, e.g. samples of a policy.

        Each pair's ``extra`` keeps what the tests need: ``gold_chosen``, ``gold_rejected``,
        ``gold_prefers_chosen`` (True, False, or None on a gold tie), ``flipped``,
        ``p_chosen`` (the annotator's probability of preferring the presented chosen response
        before flipping), ``op``.
        """
        n = len(prompts)
        if not len(responses_a) == len(responses_b) == n:
            raise ValueError(f"need as many responses as prompts: {n} prompts, "
                             f"{len(responses_a)} responses_a, {len(responses_b)} responses_b")
        if not 0.0 <= flip_fraction <= 1.0:
            raise ValueError(f"flip_fraction must be in [0, 1], got {flip_fraction}")
        temperature = self.config.annotator_temperature if temperature is None else temperature
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        gold_a = self.gold_rewards(prompts, responses_a, terminated_a)
        gold_b = self.gold_rewards(prompts, responses_b, terminated_b)
        rng = self._rng("annotator", seed)
        prefers_a, p_a = [], []
        for ra, rb in zip(gold_a, gold_b):
            p = _sigmoid((ra - rb) / temperature) if temperature > 0 else (
                0.5 if ra == rb else float(ra > rb))
            p_a.append(p)
            prefers_a.append(rng.random() < p)
        flipped = set(rng.sample(range(n), round(flip_fraction * n)))
        name = name or f"synthetic:pairs/seed={seed}"
        pairs = []
        for i in range(n):
            a_chosen = prefers_a[i] != (i in flipped)
            chosen, rejected = (responses_a[i], responses_b[i]) if a_chosen else (
                responses_b[i], responses_a[i])
            g_c, g_r = (gold_a[i], gold_b[i]) if a_chosen else (gold_b[i], gold_a[i])
            pairs.append(PreferencePair(
                prompt=prompts[i], chosen=chosen, rejected=rejected, source=Source(name, i),
                extra={"gold_chosen": g_c, "gold_rejected": g_r,
                       "gold_prefers_chosen": None if g_c == g_r else g_c > g_r,
                       "flipped": i in flipped,
                       "p_chosen": p_a[i] if a_chosen else 1.0 - p_a[i],
                       "op": prompts[i].split()[0]}))
        return pairs

    def preference_pairs(self, n: int, *, flip_fraction: float = 0.2,
                         temperature: float | None = None, seed: int = 0,
                         error_rates: tuple[float, float] | None = None) -> list[PreferencePair]:
        """n noisy-expert comparisons labelled by the simulated annotator (see ``annotate``),
        with ``flip_fraction`` of the labels flipped. The same seed gives the same prompts and
        responses whatever the flip fraction and temperature, so noisy and clean versions of
        one data set can be compared pair by pair."""
        prompts, a, b = self.response_pairs(n, seed, error_rates)
        return self.annotate(prompts, a, b, flip_fraction=flip_fraction, temperature=temperature,
                             seed=seed, name=f"synthetic:pairs/seed={seed}")

    def clean_pairs(self, n: int, seed: int = 0,
                    error_rates: tuple[float, float] | None = None) -> list[PreferencePair]:
        """A clean set: labels are the gold preference (temperature 0, no flips). Use a seed
        not used for training data to get a held-out validation set."""
        return self.preference_pairs(n, flip_fraction=0.0, temperature=0.0, seed=seed,
                                     error_rates=error_rates)

    def ranked_examples(self, n: int, k: int = 4, seed: int = 0,
                        error_rates: tuple[float, float] | None = None) -> list[RankedExample]:
        """n prompts with k noisy-expert responses each (error rates drawn uniformly from
        ``error_rates``), scored by the gold reward: RRHF's input."""
        if k < 2:
            raise ValueError(f"k must be >= 2, got {k}")
        rng = self._rng("ranked", seed)
        name = f"synthetic:ranked/seed={seed}"
        out = []
        for i in range(n):
            prompt = self.make_prompt(*self._draw_prompt(rng))
            rates = [self._error_rate(rng, error_rates) for _ in range(k)]
            responses = [self.expert_response(prompt, r, rng)[0] for r in rates]
            out.append(self.rank(prompt, responses, source=Source(name, i),
                                 extra={"error_rates": rates}))
        return out

    def rank(self, prompt: str, responses: Sequence[str], *,
             terminated: Sequence[bool] | None = None, source: Source | None = None,
             extra: dict[str, Any] | None = None) -> RankedExample:
        """Any responses to one prompt (e.g. policy samples) scored by the gold reward."""
        scores = self.gold_rewards([prompt] * len(responses), responses, terminated)
        return RankedExample(prompt, list(responses), scores, source,
                             {"op": prompt.split()[0], "target": self.target(prompt),
                              **(extra or {})})

    # ---- models ------------------------------------------------------------------------------

    def make_policy(self, seed: int | None = None) -> PreTrainedModel:
        """A randomly initialised tiny causal LM over the task's vocabulary (LlamaForCausalLM by
        default, see TaskConfig.model); the weights are a pure function of (task seed, seed)."""
        return _models.make_causal_lm(self.config.model, self.tokenizer,
                                      self._torch_seed("policy", seed))

    def make_reward_backbone(self, seed: int | None = None, *,
                             from_policy: PreTrainedModel | None = None) -> PreTrainedModel:
        """A base model (LlamaModel by default: the causal LM without its LM head) for a reward
        model to put its head on: randomly initialised from (task seed, seed), or a copy of
        ``from_policy``'s body (RLHF practice: the reward model starts from the SFT policy, which
        already knows the task; see ``sft_policy``)."""
        if from_policy is not None:
            return copy.deepcopy(_models.base_model_of(from_policy))
        return _models.make_base_model(self.config.model, self.tokenizer,
                                       self._torch_seed("reward", seed))

    def sft_policy(self, seed: int | None = None, *, n_demonstrations: int = 4000,
                   error_rate: float = 0.1, steps: int = 700, lr: float = 3e-3,
                   batch_size: int = 32) -> PreTrainedModel:
        """A policy SFT-trained on noisy-expert demonstrations: the usual starting point of
        reward modeling, PPO and RRHF. A pure function of its arguments; computed once per task
        object and argument set (about 10 s on 2 cores at the defaults), a fresh copy returned
        on every call. At the defaults it is imperfect, which leaves PPO and RRHF room to
        improve: measured for task seeds 0 and 1, greedy answers are exactly right for 40% and
        73% of prompts, with a mean gold reward of 4.2 and 5.8 out of 6.5."""
        key = (seed, n_demonstrations, error_rate, steps, lr, batch_size)
        if key not in self._sft_cache:
            policy = self.make_policy(seed)
            demos = self.demonstrations(n_demonstrations, error_rate,
                                        seed=self.seed if seed is None else seed)
            self.sft(policy, demos, steps=steps, lr=lr, batch_size=batch_size,
                     seed=self._torch_seed("sft", seed))
            self._sft_cache[key] = policy
        return copy.deepcopy(self._sft_cache[key])

    def encode(self, prompt: str, response: str | None = None, *, eos: bool = True) -> list[int]:
        """Token ids of prompt (+ response + EOS): the layout the task's own helpers use."""
        return _training.encode(self.tokenizer, prompt, response, eos=eos)

    def generate(self, model: PreTrainedModel, prompts: Sequence[str | PromptExample], *,
                 max_new_tokens: int | None = None, temperature: float = 1.0,
                 greedy: bool = False, seed: int = 0, batch_size: int = 64,
                 return_terminated: bool = False
                 ) -> list[str] | tuple[list[str], list[bool]]:
        """Sample one response per prompt from a causal LM; returns the response texts (the
        words before EOS), and with ``return_terminated`` also whether each produced EOS
        (pass those flags to ``gold_rewards`` so unterminated responses are penalised).
        ``max_new_tokens`` defaults to the longest answer plus 4."""
        texts = [p.prompt if isinstance(p, PromptExample) else p for p in prompts]
        limit = max_new_tokens if max_new_tokens is not None else self.config.max_symbols + 4
        responses, terminated = _training.generate(
            model, self.tokenizer, texts, max_new_tokens=limit, temperature=temperature,
            greedy=greedy, seed=seed, batch_size=batch_size)
        return (responses, terminated) if return_terminated else responses

    def evaluate_policy(self, model: PreTrainedModel, prompts: Sequence[str], *,
                        greedy: bool = False, seed: int = 0) -> dict[str, float]:
        """Mean gold reward of the model's samples, the share that are perfect and the share
        that ended with EOS."""
        responses, terminated = self.generate(model, prompts, greedy=greedy, seed=seed,
                                              return_terminated=True)
        rewards = self.gold_rewards(prompts, responses, terminated)
        perfect = [t and r == self.target(p) for p, r, t in zip(prompts, responses, terminated)]
        return {"mean_gold_reward": sum(rewards) / len(rewards),
                "perfect": sum(perfect) / len(perfect),
                "terminated": sum(terminated) / len(terminated)}

    def sft(self, model: PreTrainedModel, demonstrations: Sequence[Demonstration], **kwargs
            ) -> list[float]:
        """Teacher-forced SFT of ``model`` on demonstrations; see `training.sft`."""
        return _training.sft(model, self.tokenizer, demonstrations, **kwargs)


def pair_accuracy(scores_chosen: torch.Tensor | Sequence[float],
                  scores_rejected: torch.Tensor | Sequence[float],
                  pairs: Sequence[PreferencePair], *, against: str = "gold") -> float:
    """Share of pairs a scorer orders like the reference: ``against="gold"`` compares with the
    gold preference (pairs with gold ties are skipped), ``"label"`` with the pairs' labels
    (chosen above rejected). A score tie counts as half right."""
    sc = torch.as_tensor(scores_chosen, dtype=torch.float64).flatten()
    sr = torch.as_tensor(scores_rejected, dtype=torch.float64).flatten()
    if not len(sc) == len(sr) == len(pairs):
        raise ValueError(f"{len(sc)} chosen scores, {len(sr)} rejected scores, {len(pairs)} pairs")
    if against not in ("gold", "label"):
        raise ValueError(f"against must be 'gold' or 'label', got {against!r}")
    right, total = 0.0, 0
    for c, r, pair in zip(sc.tolist(), sr.tolist(), pairs):
        want = True if against == "label" else pair.extra["gold_prefers_chosen"]
        if want is None:
            continue
        total += 1
        right += 0.5 if c == r else float((c > r) == want)
    return right / total if total else float("nan")
