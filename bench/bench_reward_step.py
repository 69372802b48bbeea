"""One reward-model optimizer step (RewardTrainer._train_step) with the engine's ops against the
same step with the eager references.

Implementations (the trainer's ``kernels`` option; everything else in the step is identical):
  rlengine:  kernels="engine": rlengine.ops, the fused C++ kernels.
  reference: kernels="reference": rlengine.ops.reference, the plain-PyTorch definitions.
The ops a step uses are bt_loss (always) and, with score_mode="segment", token_logprobs with
entropy over the entropy model's logits [2B, T - 1, V], entropy_segments and segment_reduce; the
backbone's forward and backward and AdamW are the same code in both.

Cases (one optimizer step = forward, backward, clipping and AdamW on one batch):
  last synthetic:     the synthetic task's reward model initialised from its SFT policy,
                      score_mode="last", 32 pairs (the task's word-level vocabulary).
  segment synthetic:  the same with score_mode="segment", the SFT policy as entropy model.
  segment hh V=32000: HH-RLHF pairs (shared/data, the harmless test split), a byte-level BPE
                      tokenizer trained on them offline, the `tiny-llama` reward model of
                      `rlengine train-rm` (Llama, hidden 128, 2 layers) and a causal LM of the
                      same shape as entropy model, both over a 32000-token vocabulary (the
                      corpus yields ~15k BPE tokens; the rest is padding, as checkpoints pad
                      theirs); max_length 256, 8 pairs.
                      Both models are randomly initialised (the step's cost does not depend on
                      the weights; the entropy model's head gets a rank-one spike so that its
                      entropies vary over positions), and the segment threshold is put at the
                      median entropy of the batch's response tokens so that about half of them
                      end a segment.

Each case is built once per process: two trainers on deep copies of one model. Before any
timing, step 0 runs once on each and their losses and gradient norms must agree; that is also
the first warm-up. Every timed round repeats step 0's batch (the weights move, the work does
not). Besides the time and the torch-allocator peak of bench/harness.py, each result records
``tokens`` (attention-mask tokens in the step: report.py turns it into tokens/s) and
``rss_peak_extra_mb`` (the process's resident-memory high-water during one step above its
resident memory before it, which also sees memory allocated outside torch's allocator).

Run as a script for an interleaved comparison on a busy machine: the two implementations'
steps alternate, and the median of the per-round time ratios is printed with each median:
    python bench/bench_reward_step.py [--rounds 10] [--cases last,segment,hh]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import peak_rss_growth_mb, run  # noqa: E402  (bench/ is not a package)

from rlengine.reward import RewardModel, RewardTrainer, RewardTrainerConfig  # noqa: E402

KERNELS = {"rlengine": "engine", "reference": "reference"}
STEP = 0


def _find_hh_file() -> Path:
    """$RLENGINE_HH_FILE, else shared/data/ beside the checkout or beside a folder holding it
    (a git worktree under wt/)."""
    if "RLENGINE_HH_FILE" in os.environ:
        return Path(os.environ["RLENGINE_HH_FILE"])
    checkout = Path(__file__).resolve().parents[1]
    candidates = [folder / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
                  for folder in checkout.parents]
    return next((c for c in candidates if c.is_file()), candidates[0])


HH_FILE = _find_hh_file()
HH_VOCAB, HH_MAX_LENGTH, HH_PAIRS = 32000, 256, 8
SYNTHETIC_PAIRS = 32


@dataclass
class Case:
    group: str
    trainers: dict[str, RewardTrainer]
    rounds: int
    info: dict = field(default_factory=dict)

    def step(self, impl: str):
        trainer = self.trainers[impl]
        return lambda: trainer._train_step(STEP)


def _trainers(model: RewardModel, tokenizer, pairs, config: RewardTrainerConfig, device: str,
              **kwargs) -> dict[str, RewardTrainer]:
    return {impl: RewardTrainer(copy.deepcopy(model), tokenizer, pairs, config, kernels=kernels,
                                device=device, log=lambda *_: None, **kwargs)
            for impl, kernels in KERNELS.items()}


@functools.cache
def _synthetic_job():
    """What `rlengine train-rm` trains on by default: noisy pairs of the synthetic task and its
    SFT policy (the reward model's initialisation and the entropy model); built once."""
    from rlengine.reward.job import RewardJobConfig, build_job

    return build_job(RewardJobConfig(synthetic_pairs=512, synthetic_eval_pairs=1),
                     need_entropy=True, log=lambda *_: None)


def _synthetic(score_mode: str, device: str) -> Case:
    job = _synthetic_job()
    config = RewardTrainerConfig(batch_size=SYNTHETIC_PAIRS, score_mode=score_mode, lr=2e-3,
                                 progress=False, save_model=False)
    entropy_model = copy.deepcopy(job.entropy_model) if score_mode == "segment" else None
    trainers = _trainers(job.make_model(0), job.tokenizer, job.train_pairs, config, device,
                         entropy_model=entropy_model)
    vocab = len(job.tokenizer)
    return Case(f"rm step {score_mode} synthetic B={SYNTHETIC_PAIRS} pairs V={vocab}", trainers,
                rounds=20, info={"pairs": SYNTHETIC_PAIRS, "vocab": vocab})


def _hh_segment(device: str) -> Case:
    from transformers import LlamaForCausalLM, LlamaModel

    from rlengine.data import load_preferences
    from rlengine.data.tokenizer import example_texts, train_text_tokenizer
    from rlengine.synthetic.models import ModelConfig, transformers_config

    if not HH_FILE.is_file():
        raise FileNotFoundError(f"no HH-RLHF file at {HH_FILE} (set RLENGINE_HH_FILE)")
    pairs = load_preferences(HH_FILE)
    # The 2312 dialogues hold ~15k BPE merges' worth of text, not 32k: the models' vocabulary
    # is padded to 32000 (as checkpoints pad theirs), so every logit row spans 32000 entries.
    tokenizer = train_text_tokenizer(example_texts(pairs), vocab_size=HH_VOCAB)
    # `rlengine train-rm --model tiny-llama` at its defaults (rlengine/reward/job.py).
    shape = ModelConfig(architecture="llama", hidden_size=128, num_layers=2, num_heads=4,
                        intermediate_size=512, max_positions=HH_MAX_LENGTH)
    hf_config = transformers_config(shape, tokenizer)
    hf_config.vocab_size = HH_VOCAB
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RewardModel(LlamaModel(hf_config))
        entropy_model = LlamaForCausalLM(hf_config)
        # A random Gaussian LM head gives entropy ~ln V at every position (the final norm fixes
        # |h|): a rank-one spike makes the logits' spread follow h's component along one
        # direction, so that, as under a trained LM, entropies range over positions and a
        # threshold can sit where no float rounding moves a token across it.
        with torch.no_grad():
            direction = torch.nn.functional.normalize(torch.randn(hf_config.hidden_size), dim=0)
            entropy_model.lm_head.weight += 3.0 * torch.randn(HH_VOCAB, 1) * direction
    train = pairs[:256]
    config = RewardTrainerConfig(batch_size=HH_PAIRS, score_mode="segment", lr=2e-3,
                                 progress=False, save_model=False)
    config = dataclasses.replace(config, segment_threshold=_median_entropy_threshold(
        model, tokenizer, train, config, entropy_model, device))
    trainers = _trainers(model, tokenizer, train, config, device, entropy_model=entropy_model,
                         max_length=HH_MAX_LENGTH)
    return Case(f"rm step segment hh B={HH_PAIRS} pairs T<={HH_MAX_LENGTH} V={HH_VOCAB}",
                trainers, rounds=8, info={"pairs": HH_PAIRS, "vocab": HH_VOCAB,
                                          "segment_threshold": config.segment_threshold})


def _median_entropy_threshold(model, tokenizer, pairs, config, entropy_model, device) -> float:
    """A threshold in the widest gap between the middle entropies of step 0's response tokens,
    so that about half of them end a segment and the kernels' and the reference's float
    rounding cannot put a token on different sides of it."""
    probe = RewardTrainer(model, tokenizer, pairs, config, entropy_model=entropy_model,
                          device=device, max_length=HH_MAX_LENGTH, log=lambda *_: None)
    batch = probe._batch(probe.train_data, probe._step_indices(STEP))
    input_ids, attention_mask, response_mask, last_index = probe._pair_rows(batch)
    content = probe._content_mask(input_ids, response_mask, last_index)
    entropy = probe._entropy(input_ids, attention_mask)[content].sort().values
    middle = entropy[len(entropy) * 2 // 5: len(entropy) * 3 // 5 + 1]
    widest = int((middle[1:] - middle[:-1]).argmax())
    return float((middle[widest] + middle[widest + 1]) / 2)


BUILDERS = {"last": lambda device: _synthetic("last", device),
            "segment": lambda device: _synthetic("segment", device), "hh": _hh_segment}


@functools.cache
def build_case(name: str, device: str = "cpu") -> Case:
    """The case's two trainers on ``device``, after checking that their first steps agree."""
    case = BUILDERS[name](device)
    records = {impl: case.step(impl)() for impl in case.trainers}
    ours, theirs = records["rlengine"], records["reference"]
    for key in ("train/loss", "train/grad_norm", "train/tokens"):
        if abs(ours[key] - theirs[key]) > 1e-4 * max(1.0, abs(theirs[key])):
            raise AssertionError(f"{case.group}: step {STEP}'s {key} differs between the "
                                 f"engine ({ours[key]!r}) and the reference ({theirs[key]!r})")
    trainer = case.trainers["rlengine"]
    batch = trainer._batch(trainer.train_data, trainer._step_indices(STEP))
    rows, seq_len = batch["chosen_input_ids"].shape[0] * 2, max(
        batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    case.info.update(tokens=int(ours["train/tokens"]), rows=rows, padded_length=seq_len,
                     loss=round(ours["train/loss"], 6))
    if trainer.config.score_mode == "segment":
        case.info["entropy_logits_mb"] = round(rows * (seq_len - 1) * case.info["vocab"] * 4
                                               / 2**20, 1)
    return case


CASE_NAMES = ["last", "segment", "hh"]


@pytest.mark.parametrize("case_name, impl", [(c, i) for c in CASE_NAMES for i in KERNELS])
def bench_reward_step(benchmark, case_name, impl):
    try:
        case = build_case(case_name)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    step = case.step(impl)
    benchmark.group = case.group
    rss = peak_rss_growth_mb(step)
    run(benchmark, step, rounds=case.rounds, warmup_rounds=1, **case.info,
        **({"rss_peak_extra_mb": round(rss, 1)} if rss is not None else {}))


def interleaved(names: list[str], rounds: int) -> str:
    """Markdown table: per case and implementation, the median step time and tokens/s over
    rounds in which the two implementations' steps alternate, and the median per-round ratio."""
    lines = ["| case | rlengine ms | reference ms | reference / rlengine (median of rounds) "
             "| rlengine tokens/s | reference tokens/s |", "|---|---|---|---|---|---|"]
    for name in names:
        case = build_case(name)
        times: dict[str, list[float]] = {impl: [] for impl in KERNELS}
        steps = {impl: case.step(impl) for impl in KERNELS}
        for impl in KERNELS:
            steps[impl]()
        for r in range(rounds):
            order = list(KERNELS) if r % 2 == 0 else list(reversed(KERNELS))
            for impl in order:
                gc.collect()
                begin = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - begin)
        ratio = statistics.median(b / a for a, b in zip(times["rlengine"], times["reference"]))
        med = {impl: statistics.median(t) for impl, t in times.items()}
        tokens = case.info["tokens"]
        lines.append(f"| {case.group} | {med['rlengine'] * 1e3:.1f} | "
                     f"{med['reference'] * 1e3:.1f} | {ratio:.2f}x | "
                     f"{tokens / med['rlengine']:.0f} | {tokens / med['reference']:.0f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cases", default=",".join(CASE_NAMES),
                        help=f"comma-separated, of: {', '.join(CASE_NAMES)}")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = set(names) - set(CASE_NAMES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()}", flush=True)
    print(interleaved(names, args.rounds))
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
