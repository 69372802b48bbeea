"""One PPO step and one RRHF step with the engine's ops against the same steps with the eager
references.

Implementations (the trainers' ``kernels`` option; everything else is identical):
  rlengine:  kernels="engine": rlengine.ops, the fused C++ kernels.
  reference: kernels="reference": rlengine.ops.reference, the plain-PyTorch definitions.

Steps (generation is left out: it is `transformers` generate in both, and sampling makes it
vary; every timed call repeats the same work on the same batch):
  ppo experience: PPOTrainer.score_rollout + shape_rewards on one fixed rollout: the policy's
                  log-probs and entropies and the reference's log-probs (fused_linear_logprobs
                  on the Llama head, or their logits-forming reference), the critic, the reward
                  model read as segment-dense rewards (entropy_segments, segment_reduce,
                  segment_rewards_to_dense), KL shaping, gae, masked_whiten.
  ppo update:     PPOTrainer._train_step on that experience as one mini-batch: the policy's
                  log-probs and entropies with gradients, the critic, the losses' token means
                  (masked_mean), backward, clipping, two AdamW steps.
  rrhf step:      RRHFTrainer._train_step(0) on the first round's candidates: log-probs of
                  every candidate, sequence_scores, rrhf_rank_loss, SFT, backward, AdamW.

Cases:
  synthetic:      the synthetic task's SFT policy (a 30-token vocabulary), 64 responses of up to
                  12 tokens; a reward model on its body; RRHF at `rlengine rrhf`'s synthetic
                  defaults (16 queries x 6 candidates).
  tiny-llama 32k: the `tiny-llama` shape (Llama, hidden 128, 2 layers) over a 32000-token
                  vocabulary (a byte-level BPE tokenizer trained on HH-RLHF prompts, padded to
                  32000 as checkpoints pad theirs), randomly initialised (the cost does not
                  depend on the weights; the LM head gets a rank-one spike so that entropies
                  vary, and the segment threshold sits in the widest gap of their middle fifth,
                  so about half the tokens end a segment); 16 HH prompts
                  cut to 96 tokens, 16 responses of 128 tokens; RRHF on 8 HH pairs (chosen and
                  rejected) + 2 policy samples of 64 tokens each, scored by the reward model.

Before timing, each step runs once per implementation and their numbers must agree. The
script interleaves the two implementations' steps (rounds alternate their order), prints the
median time of each, the median per-round ratio and the torch-allocator peak of one step
(bench/harness.py), and with --out writes cpu-policy-step-<date>.{json,md}:
    python bench/bench_policy_step.py [--rounds 10] [--cases synthetic,llama32k] [--threads N]
                                      [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_reward_step import HH_FILE  # noqa: E402  (bench/ is not a package)
from harness import peak_allocated_bytes, peak_rss_growth_mb, run  # noqa: E402

from rlengine.policy import PPOConfig, PPOTrainer, RRHFConfig, RRHFTrainer  # noqa: E402
from rlengine.reward import RewardModel  # noqa: E402

KERNELS = {"rlengine": "engine", "reference": "reference"}
LLAMA_VOCAB, LLAMA_PROMPT, LLAMA_RESPONSE, LLAMA_ROWS = 32000, 96, 128, 16


@dataclass
class Case:
    """One case: per step name, per implementation, the callable to time."""

    group: str
    steps: dict[str, dict[str, Callable[[], object]]]
    info: dict = field(default_factory=dict)


def _ppo_steps(policy, tokenizer, prompts, reward_model, config: PPOConfig, device: str):
    """PPO trainers per implementation on one rollout (generated once), the segment threshold
    at the median of the reference's entropies when ``config`` asks for a negative one."""
    trainers = {impl: PPOTrainer(copy.deepcopy(policy), tokenizer, prompts, config,
                                 reward_model=copy.deepcopy(reward_model),
                                 normalizer=(0.2, 0.1, 0.05, 1.0), kernels=kernels,
                                 device=device, log=lambda *_: None)
                for impl, kernels in KERNELS.items()}
    first = trainers["rlengine"]
    rollout = first._chunk_experience(0, 0, first._iteration_prompts(0)).rollout
    rows = torch.arange(len(rollout))
    experiences = {impl: t.shape_rewards(t.score_rollout(rollout)) for impl, t in trainers.items()}
    ours, theirs = experiences["rlengine"], experiences["reference"]
    for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=2e-3,
                                   rtol=2e-3, msg=lambda m, name=name: f"experience {name}: {m}")
    records = {impl: trainers[impl]._train_step(experiences[impl], rows) for impl in trainers}
    for key in ("policy", "value", "entropy"):
        a, b = float(records["rlengine"][key]), float(records["reference"][key])
        if abs(a - b) > 2e-3 * max(1.0, abs(b)):
            raise AssertionError(f"PPO update {key}: engine {a!r} vs reference {b!r}")
    steps = {
        "ppo experience": {impl: (lambda t=t: t.shape_rewards(t.score_rollout(rollout)))
                           for impl, t in trainers.items()},
        "ppo update": {impl: (lambda t=t, e=experiences[impl]: t._train_step(e, rows))
                       for impl, t in trainers.items()}}
    info = {"ppo_rows": len(rollout), "ppo_tokens": int(rollout.attention_mask.sum()),
            "ppo_response_tokens": int(rollout.response_mask.sum()),
            "segments_per_response": float(ours.segments.float().mean())}
    return steps, info


def _rrhf_steps(policy, tokenizer, queries, config: RRHFConfig, device: str, **kwargs):
    trainers = {impl: RRHFTrainer(copy.deepcopy(policy), tokenizer, queries, config,
                                  kernels=kernels, device=device, log=lambda *_: None,
                                  **{k: copy.deepcopy(v) for k, v in kwargs.items()})
                for impl, kernels in KERNELS.items()}
    for t in trainers.values():
        t._build_round(0)
    records = {impl: t._train_step(0) for impl, t in trainers.items()}
    a, b = records["rlengine"]["train/loss"], records["reference"]["train/loss"]
    if abs(a - b) > 2e-3 * max(1.0, abs(b)):
        raise AssertionError(f"RRHF step loss: engine {a!r} vs reference {b!r}")
    candidates = trainers["rlengine"].round_candidates[:config.queries_per_step]
    steps = {"rrhf step": {impl: (lambda t=t: t._train_step(0)) for impl, t in trainers.items()}}
    return steps, {"rrhf_candidates": sum(len(c) for c in candidates),
                   "rrhf_tokens": int(records["rlengine"]["train/tokens"])}


def _synthetic(device: str) -> Case:
    from rlengine.policy.commands import PPO_SYNTHETIC_DEFAULTS, SYNTHETIC_DEFAULTS
    from rlengine.policy.job import RRHFJobConfig, build_rrhf_job

    job = build_rrhf_job(RRHFJobConfig(synthetic_queries=64), policy_samples=4,
                         log=lambda *_: None)
    task, policy = job.task, job.policy
    reward_model = RewardModel(task.make_reward_backbone(from_policy=policy))
    options = {**PPO_SYNTHETIC_DEFAULTS, "prompts_per_iteration": 16, "mini_batch_size": 64}
    ppo = PPOConfig(progress=False, reward_kind="segment", **options)
    steps, info = _ppo_steps(policy, task.tokenizer, task.prompts(64, seed=1), reward_model,
                             ppo, device)
    rrhf = dataclasses.replace(RRHFConfig(progress=False), **SYNTHETIC_DEFAULTS)
    more, more_info = _rrhf_steps(policy, task.tokenizer, job.queries, rrhf, device,
                                  reward_fn=job.trainer_kwargs["reward_fn"])
    return Case(f"synthetic V={len(task.tokenizer)}", {**steps, **more},
                {"vocab": len(task.tokenizer), **info, **more_info})


def _llama32k(device: str) -> Case:
    from transformers import LlamaForCausalLM, LlamaModel

    from rlengine.data import load_preferences
    from rlengine.data.tokenizer import example_texts, train_text_tokenizer
    from rlengine.data.types import RankedExample
    from rlengine.synthetic.models import ModelConfig, transformers_config

    if not HH_FILE.is_file():
        raise FileNotFoundError(f"no HH-RLHF file at {HH_FILE} (set RLENGINE_HH_FILE)")
    pairs = [p for p in load_preferences(HH_FILE) if p.prompt is not None]
    tokenizer = train_text_tokenizer(example_texts(pairs), vocab_size=LLAMA_VOCAB)
    shape = ModelConfig(architecture="llama", hidden_size=128, num_layers=2, num_heads=4,
                        intermediate_size=512, max_positions=512)
    hf_config = transformers_config(shape, tokenizer)
    hf_config.vocab_size = LLAMA_VOCAB
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = LlamaForCausalLM(hf_config)
        # as in bench_reward_step: entropies that vary over positions (see there)
        with torch.no_grad():
            direction = torch.nn.functional.normalize(torch.randn(hf_config.hidden_size), dim=0)
            policy.lm_head.weight += 3.0 * torch.randn(LLAMA_VOCAB, 1) * direction
        reward_model = RewardModel(LlamaModel(hf_config))
    prompts = [p.prompt for p in pairs[:LLAMA_ROWS]]
    base = PPOConfig(progress=False, reward_kind="segment", prompts_per_iteration=LLAMA_ROWS,
                     mini_batch_size=LLAMA_ROWS, max_new_tokens=LLAMA_RESPONSE,
                     max_prompt_length=LLAMA_PROMPT, generation_batch_size=LLAMA_ROWS)
    probe = PPOTrainer(copy.deepcopy(policy), tokenizer, prompts, base, reward_model=reward_model,
                       device=device, log=lambda *_: None)
    experience = probe._chunk_experience(0, 0, probe._iteration_prompts(0))
    from rlengine.policy import response_logprobs

    with torch.no_grad():
        _, entropy = response_logprobs(probe.reference, experience.rollout, with_entropy=True)
    threshold = _middle_gap(entropy[experience.rollout.content_mask])
    steps, info = _ppo_steps(policy, tokenizer, prompts,
                             reward_model, dataclasses.replace(base, segment_threshold=threshold),
                             device)
    queries = [RankedExample(p.prompt, [p.chosen, p.rejected], [float("nan")] * 2)
               for p in pairs[:8]]
    rrhf = RRHFConfig(progress=False, queries_per_step=8, policy_samples=2, max_new_tokens=64,
                      max_prompt_length=LLAMA_PROMPT, max_response_length=LLAMA_RESPONSE,
                      lr=1e-4)
    more, more_info = _rrhf_steps(policy, tokenizer, queries, rrhf, device,
                                  reward_model=reward_model)
    return Case(f"tiny-llama V={LLAMA_VOCAB}", {**steps, **more},
                {"vocab": LLAMA_VOCAB, "segment_threshold": round(threshold, 4), **info,
                 **more_info})


def _middle_gap(entropies: torch.Tensor) -> float:
    """A threshold in the widest gap between the middle entropies: about half of the tokens
    end a segment, and no float rounding of the two implementations moves one across it."""
    ordered = entropies.sort().values
    middle = ordered[len(ordered) * 2 // 5: len(ordered) * 3 // 5 + 1]
    widest = int((middle[1:] - middle[:-1]).argmax())
    return float((middle[widest] + middle[widest + 1]) / 2)


BUILDERS = {"synthetic": _synthetic, "llama32k": _llama32k}
CASE_NAMES = list(BUILDERS)


@functools.cache
def build_case(name: str, device: str = "cpu") -> Case:
    with torch.random.fork_rng(devices=[]):
        return BUILDERS[name](device)


@pytest.mark.parametrize("case_name, step, impl", [
    (c, s, i) for c in CASE_NAMES for s in ("ppo experience", "ppo update", "rrhf step")
    for i in KERNELS])
def bench_policy_step(benchmark, case_name, step, impl):
    try:
        case = build_case(case_name)
    except FileNotFoundError as missing:
        pytest.skip(str(missing))
    benchmark.group = f"{step} {case.group}"
    fn = case.steps[step][impl]
    rss = peak_rss_growth_mb(fn)
    run(benchmark, fn, rounds=5, warmup_rounds=1, **case.info,
        **({"rss_peak_extra_mb": round(rss, 1)} if rss is not None else {}))


def interleaved(names: list[str], rounds: int) -> list[dict]:
    """Per case and step: the median time of each implementation over rounds in which their
    steps alternate, the median per-round ratio, and one step's allocator and RSS peaks."""
    results = []
    for name in names:
        case = build_case(name)
        for step, fns in case.steps.items():
            for fn in fns.values():
                fn()  # warm-up
            peaks = {impl: peak_allocated_bytes(fn) / 2**20 for impl, fn in fns.items()}
            rss = {impl: peak_rss_growth_mb(fn) for impl, fn in fns.items()}
            times: dict[str, list[float]] = {impl: [] for impl in fns}
            for r in range(rounds):
                for impl in (list(fns) if r % 2 == 0 else list(reversed(fns))):
                    gc.collect()
                    begin = time.perf_counter()
                    fns[impl]()
                    times[impl].append(time.perf_counter() - begin)
            ratio = statistics.median(b / a for a, b in zip(times["rlengine"],
                                                            times["reference"]))
            row = {"case": case.group, "step": step, "ratio": ratio,
                   **{f"{impl}_ms": statistics.median(t) * 1e3 for impl, t in times.items()},
                   **{f"{impl}_peak_mb": peaks[impl] for impl in fns},
                   **{f"{impl}_rss_peak_mb": rss[impl] for impl in fns}, "info": case.info}
            results.append(row)
            print(f"| {row['case']} | {step} | {row['rlengine_ms']:.1f} | "
                  f"{row['reference_ms']:.1f} | {ratio:.2f}x | {peaks['rlengine']:.0f} | "
                  f"{peaks['reference']:.0f} |", flush=True)
    return results


HEADER = ("| case | step | rlengine ms | reference ms | reference / rlengine (median of rounds) "
          "| rlengine peak MB | reference peak MB |\n|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cases", default=",".join(CASE_NAMES),
                        help=f"comma-separated, of: {', '.join(CASE_NAMES)}")
    parser.add_argument("--out", default=None, help="folder for cpu-policy-step-<date>.{json,md}")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default; on a shared machine 1 keeps "
                             "threads from spinning on each other)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = set(names) - set(CASE_NAMES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{load_before}", flush=True)
    print(HEADER, flush=True)
    results = interleaved(names, args.rounds)
    load_after = os.getloadavg()
    print(f"load average after: {load_after}")
    if args.out:
        date = datetime.date.today().isoformat()
        meta = {"date": date, "torch": torch.__version__, "python": platform.python_version(),
                "threads": torch.get_num_threads(), "rounds": args.rounds,
                "load_average_before": load_before, "load_average_after": load_after,
                "cpu": _cpu_name(), "logical_cpus": os.cpu_count()}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"cpu-policy-step-{date}.json").write_text(
            json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        lines = [HEADER] + [
            f"| {r['case']} | {r['step']} | {r['rlengine_ms']:.1f} | {r['reference_ms']:.1f} | "
            f"{r['ratio']:.2f}x | {r['rlengine_peak_mb']:.0f} | {r['reference_peak_mb']:.0f} |"
            for r in results]
        (out / f"cpu-policy-step-{date}.md").write_text(
            f"# PPO and RRHF steps: engine ops vs eager references ({date})\n\n"
            f"{meta['cpu']}, {meta['logical_cpus']} logical CPUs, shared with other jobs "
            f"(load average {load_before[0]:.1f} before, {load_after[0]:.1f} after); torch "
            f"{meta['torch']}, {meta['threads']} thread(s), Python {meta['python']}; "
            f"{args.rounds} interleaved rounds. `python bench/bench_policy_step.py` (its "
            f"docstring: the steps and cases). Peak MB: torch-allocator peak of one step "
            f"above what was allocated before it.\n\n" + "\n".join(lines) + "\n")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
