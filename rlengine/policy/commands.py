"""`rlengine sft`, `rlengine ppo`, `rlengine rrhf` and `rlengine fit-normalizer`: a YAML config
(``--config``) and one flag per option that overrides it. `sft`, `ppo` and `rrhf` run as one
process or under torchrun (DDP: gloo on the CPU, NCCL on CUDA)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rlengine import configs
from rlengine.files import atomic_write
from rlengine.policy.job import (
    SYNTHETIC,
    NormalizerJobConfig,
    PPOJobConfig,
    RRHFJobConfig,
    SFTJobConfig,
    build_ppo_job,
    build_rrhf_job,
    build_sft_job,
    run_fit_normalizer,
)
from rlengine.policy.ppo_config import PPOConfig
from rlengine.policy.rrhf_config import RRHFConfig
from rlengine.policy.sft_config import SFTConfig
from rlengine.reward.commands import _is_main_process, _shut_down_process_group

# The tiny synthetic policy wants a far larger step than the paper's 7B models, and its
# default run should show RRHF's effect in about a minute on one thread.
SYNTHETIC_DEFAULTS = {"lr": 1e-3, "max_new_tokens": 12, "rounds": 4, "epochs": 2.0}
# PPO's on the synthetic policy: rates and batch found by a small sweep (30 iterations of
# 32 prompts x 4 samples raise the held-out gold reward in about 10 s on one thread).
PPO_SYNTHETIC_DEFAULTS = {"actor_lr": 2e-4, "critic_lr": 1e-3, "max_new_tokens": 12,
                          "iterations": 30, "prompts_per_iteration": 32, "samples_per_prompt": 4,
                          "mini_batch_size": 32, "evaluate_every": 10}
# SFT of the synthetic task's tiny model: the settings of its own SFT policy
# (SyntheticTask.sft_policy: 700 steps of 32 at 3e-3); of a tiny-* model built fresh: a rate
# that moves a random-init model in a few hundred steps (TRL's 2e-5 is for pretrained ones).
SFT_SYNTHETIC_DEFAULTS = {"lr": 3e-3, "batch_size": 32, "steps": 700, "eval_every": 100}
SFT_TINY_DEFAULTS = {"lr": 1e-3}


def add_parser(commands, name: str, summary: str) -> None:
    adders = {"sft": _add_sft, "rrhf": _add_rrhf, "ppo": _add_ppo,
              "fit-normalizer": _add_fit_normalizer}
    adders[name](commands, name, summary)


def _add_sft(commands, name: str, summary: str) -> None:
    sft = commands.add_parser(
        name, help=summary,
        description="SFT: train a causal LM on the response tokens of demonstrations (the "
                    "prompt is context only; loss averaged over response tokens, EOS included), "
                    "with log-probs through the engine's fused ops. Data: {prompt, response} or "
                    "{prompt, completion} rows, preference pairs (trained on chosen), HH-RLHF "
                    "transcripts or {messages} conversations. Model: a local causal-LM folder, "
                    "or --model tiny-llama / tiny-gpt2 built fresh for --tokenizer (the reward "
                    "model's: its train-rm output directory, so that RRHF and PPO can score the "
                    "policy's tokens; or 'train'). With no options it trains the synthetic "
                    "task's tiny model on its noisy-expert demonstrations. Options come from "
                    "--config (YAML), then from the flags below. Writes checkpoints, "
                    "metrics.jsonl (and TensorBoard logs), the final policy with its tokenizer "
                    "in OUTPUT_DIR/model (`rlengine rrhf --model` and `rlengine ppo --model` "
                    "take it) and final_metrics.json, and resumes from its newest checkpoint "
                    "when run again. Data parallel: `torchrun --nproc-per-node N -m "
                    "rlengine.cli sft ...` (batch_size is the global batch).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sft.add_argument("--config", metavar="YAML", default=None,
                     help="a YAML file of option: value (any option below, with _ or -)")
    sft.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration and exit")
    configs.add_arguments(sft, SFTJobConfig, group="data, policy and tokenizer")
    configs.add_arguments(sft, SFTConfig, group="training")
    sft.set_defaults(run=run_sft)


def _add_rrhf(commands, name: str, summary: str) -> None:
    rrhf = commands.add_parser(
        name, help=summary,
        description="RRHF: each round samples candidates from the current policy (sampling or "
                    "diverse beam search), adds the data's responses (chosen/rejected, ranked "
                    "responses, other models' response files), scores them with the gold "
                    "reward, a reward model or the data's scores, and trains on the ranking "
                    "loss plus SFT on each query's best candidate. With no data options it runs "
                    "the built-in synthetic task: the SFT policy, the gold reward, a few rounds, "
                    "and the held-out gold reward after each. Options come from --config (YAML), "
                    "then from the flags below. Writes checkpoints, metrics.jsonl (and "
                    "TensorBoard logs), the final policy and final_metrics.json to "
                    "--output-dir, and resumes from its newest checkpoint when run again. Data "
                    "parallel: `torchrun --nproc-per-node N -m rlengine.cli rrhf ...` "
                    "(queries_per_step is the global batch).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rrhf.add_argument("--config", metavar="YAML", default=None,
                      help="a YAML file of option: value (any option below, with _ or -)")
    rrhf.add_argument("--print-config", action="store_true",
                      help="print the resolved configuration and exit")
    configs.add_arguments(rrhf, RRHFJobConfig, group="data, policy and reward")
    configs.add_arguments(rrhf, RRHFConfig, group="training")
    rrhf.set_defaults(run=run_rrhf)


def _add_ppo(commands, name: str, summary: str) -> None:
    ppo = commands.add_parser(
        name, help=summary,
        description="PPO: each iteration samples responses with the current policy, scores "
                    "them (the synthetic task's gold reward, or a reward model read as bandit, "
                    "token-level or segment-dense rewards with the location-aware normalizer), "
                    "subtracts the KL penalty to the initial policy, computes GAE and whitened "
                    "advantages, and trains the policy (clipped surrogate) and the critic "
                    "(clipped value loss) for a few epochs of mini-batches. With no options it "
                    "runs the built-in synthetic task: the SFT policy, the gold reward and the "
                    "held-out gold reward before, during and after; --reward train trains a "
                    "reward model on the task's preference pairs first. Options come from "
                    "--config (YAML), then from the flags below. Writes checkpoints, "
                    "metrics.jsonl (and TensorBoard logs), the final policy and critic and "
                    "final_metrics.json to --output-dir, and resumes from its newest checkpoint "
                    "when run again. Data parallel: `torchrun --nproc-per-node N -m rlengine.cli "
                    "ppo ...` (prompts_per_iteration and mini_batch_size are global).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ppo.add_argument("--config", metavar="YAML", default=None,
                     help="a YAML file of option: value (any option below, with _ or -)")
    ppo.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration and exit")
    configs.add_arguments(ppo, PPOJobConfig, group="data, policy and reward")
    configs.add_arguments(ppo, PPOConfig, group="training")
    ppo.set_defaults(run=run_ppo)


def _add_fit_normalizer(commands, name: str, summary: str) -> None:
    fit = commands.add_parser(
        name, help=summary,
        description="Segment every fitting response by the entropy model's next-token "
                    "entropies (threshold c), read the reward model's value at each segment "
                    "end, and fit mu(p) and sigma(p) of the rewards at location p = k/K by "
                    "Huber regression on log p (METHODS.md section 3). Writes {a_mu, b_mu, "
                    "a_sigma, b_sigma, threshold, model, n} as JSON to --output; PPO's segment "
                    "rewards load it. Refit for every reward model and threshold.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    fit.add_argument("--config", metavar="YAML", default=None,
                     help="a YAML file of option: value (any option below, with _ or -)")
    fit.add_argument("--print-config", action="store_true",
                     help="print the resolved configuration and exit")
    configs.add_arguments(fit, NormalizerJobConfig)
    fit.set_defaults(run=run_fit_normalizer_command)


def resolve_sft(args: argparse.Namespace) -> tuple[SFTJobConfig, SFTConfig]:
    from rlengine.reward.job import TINY_MODELS

    (job, trainer), given = configs.from_sources([SFTJobConfig, SFTConfig], args,
                                                 config_path=args.config)
    defaults = (SFT_SYNTHETIC_DEFAULTS if job.model == SYNTHETIC
                else SFT_TINY_DEFAULTS if job.model in TINY_MODELS else {})
    try:
        trainer = dataclasses.replace(trainer, **{name: value for name, value in defaults.items()
                                                  if name not in given})
    except ValueError as error:
        raise configs.ConfigError(str(error)) from None
    return job, trainer


def run_sft(args: argparse.Namespace) -> int:
    from rlengine.policy.sft import SFTTrainer

    opened = _open_run(args, resolve_sft)
    if opened is None:
        return 0
    job_config, config, log = opened
    job = build_sft_job(job_config, max_length=config.max_length, log=log)
    trainer = _make_trainer(SFTTrainer, job, job.examples, config, device=job_config.device,
                            log=log)
    result = trainer.train()
    if trainer.dist.is_main:
        logged = [(r["step"], r["train/loss"]) for r in result.history if "train/loss" in r]
        if logged:
            print("training loss: " + ", ".join(f"{loss:.4f} at step {step}" for step, loss
                                                 in dict([logged[0], logged[-1]]).items()))
        if len(result.evaluations) >= 2:
            first, last = result.evaluations[0], result.evaluations[-1]
            for key in first:
                if key.startswith("eval/") and not key.endswith(("/tokens", "/examples")):
                    print(f"{key.removeprefix('eval/')}: {first[key]:.4f} before, "
                          f"{last[key]:.4f} after {last['step']} step(s)")
        if result.model_dir:
            print(f"policy: {result.model_dir}  (rlengine rrhf / ppo --model {result.model_dir})")
        if config.output_dir:
            # written last: its presence marks a finished run
            text = json.dumps({"steps": result.steps, "metrics": result.metrics,
                               "evaluations": result.evaluations}, indent=2) + "\n"
            atomic_write(Path(config.output_dir) / "final_metrics.json",
                         lambda tmp: tmp.write_text(text))
    _shut_down_process_group()
    return 0


def resolve_rrhf(args: argparse.Namespace) -> tuple[RRHFJobConfig, RRHFConfig]:
    (job, trainer), given = configs.from_sources([RRHFJobConfig, RRHFConfig], args,
                                                 config_path=args.config)
    if job.model == SYNTHETIC:
        for name, value in SYNTHETIC_DEFAULTS.items():
            if name not in given:
                setattr(trainer, name, value)
    return job, trainer


def _open_run(args: argparse.Namespace, resolve):
    """The (job config, trainer config) that ``resolve`` makes of the arguments and the log
    function of this process; None after --print-config has printed them."""
    job_config, config = resolve(args)
    main = _is_main_process()
    if args.print_config:
        if main:
            print(configs.to_yaml(job_config) + configs.to_yaml(config), end="")
        return None
    log = print if main else (lambda *_: None)
    if not (config.progress and main):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    return job_config, config, log


def _make_trainer(trainer_class, job, data, config, *, device, log):
    """``trainer_class`` on a job's policy and data; its option errors are ConfigErrors."""
    try:
        return trainer_class(job.policy, job.tokenizer, data, config, device=device, log=log,
                             **job.trainer_kwargs)
    except ValueError as error:
        raise configs.ConfigError(str(error)) from None


def run_rrhf(args: argparse.Namespace) -> int:
    from rlengine.policy.rrhf import RRHFTrainer

    opened = _open_run(args, resolve_rrhf)
    if opened is None:
        return 0
    job_config, config, log = opened
    job = build_rrhf_job(job_config, policy_samples=config.policy_samples, log=log)
    trainer = _make_trainer(RRHFTrainer, job, job.queries, config, device=job_config.device,
                            log=log)
    result = trainer.train()
    if trainer.dist.is_main:
        if not result.evaluations:
            # no held-out evaluation (real data): the reward of each round's candidates, the
            # first round's sampled from the starting policy
            by_round = {int(r["train/round"]): r for r in result.history if "train/round" in r}
            for key, label in (("round/policy_sample_reward_mean", "policy samples' reward"),
                               ("round/best_reward_mean", "best candidates' reward")):
                if all(key in r for r in by_round.values()) and by_round:
                    print(f"{label} by round: " + ", ".join(
                        f"{i}: {r[key]:.4f}" for i, r in sorted(by_round.items())))
        _report(result, config.output_dir, "round", {"steps": result.steps})
    _shut_down_process_group()
    return 0


def _report(result, output_dir: str | None, unit: str, totals: dict) -> None:
    """The evaluations before and after, where the policy went, and final_metrics.json."""
    evaluations = result.evaluations
    if len(evaluations) >= 2:
        first, last = evaluations[0], evaluations[-1]
        for key in first:
            if key.startswith("eval/") and key != f"eval/{unit}":
                print(f"{key.removeprefix('eval/')}: {first[key]:.4f} before, "
                      f"{last[key]:.4f} after {last[f'eval/{unit}']} {unit}(s)")
    if result.model_dir:
        print(f"policy: {result.model_dir}")
    if output_dir:
        # written last: its presence marks a finished run
        text = json.dumps({**totals, "evaluations": evaluations}, indent=2) + "\n"
        atomic_write(Path(output_dir) / "final_metrics.json", lambda tmp: tmp.write_text(text))


def resolve_ppo(args: argparse.Namespace) -> tuple[PPOJobConfig, PPOConfig]:
    (job, trainer), given = configs.from_sources([PPOJobConfig, PPOConfig], args,
                                                 config_path=args.config)
    if job.model == SYNTHETIC:
        try:
            trainer = dataclasses.replace(trainer, **{name: value for name, value in
                                                      PPO_SYNTHETIC_DEFAULTS.items()
                                                      if name not in given})
        except ValueError as error:
            raise configs.ConfigError(str(error)) from None
    return job, trainer


def run_ppo(args: argparse.Namespace) -> int:
    from rlengine.policy.ppo import PPOTrainer

    opened = _open_run(args, resolve_ppo)
    if opened is None:
        return 0
    job_config, config, log = opened
    job = build_ppo_job(job_config, reward_kind=config.reward_kind,
                        segment_threshold=config.segment_threshold,
                        prompts_per_iteration=config.prompts_per_iteration, log=log)
    trainer = _make_trainer(PPOTrainer, job, job.prompts, config, device=job_config.device,
                            log=log)
    result = trainer.train()
    if trainer.dist.is_main:
        rewards = [(r["step"], r["rollout/reward"]) for r in result.history
                   if "rollout/reward" in r]
        if not result.evaluations and rewards:
            # no held-out evaluation (real data): the reward of the rollouts as training went,
            # averaged over the first and the last quarter of the iterations (one is noisy)
            window = max(1, len(rewards) // 4)
            parts = [rewards[:window], rewards[-window:]] if len(rewards) > 1 else [rewards]
            print("rollout reward: " + ", then ".join(
                f"{sum(v for _, v in part) / len(part):.4f} over iteration(s) {part[0][0]}"
                + (f"-{part[-1][0]}" if len(part) > 1 else "") for part in parts))
        _report(result, config.output_dir, "iteration",
                {"iterations": result.iterations, "steps": result.steps})
    _shut_down_process_group()
    return 0


def run_fit_normalizer_command(args: argparse.Namespace) -> int:
    (config,), _ = configs.from_sources([NormalizerJobConfig], args, config_path=args.config)
    if args.print_config:
        print(configs.to_yaml(config), end="")
        return 0
    normalizer, locations, _ = run_fit_normalizer(config)
    print(f"fitted on {len(locations)} segments at {len(set(locations.tolist()))} locations")
    print(f"mu(p)    = {normalizer.a_mu:.4f} log p + {normalizer.b_mu:.4f}")
    print(f"sigma(p) = {normalizer.a_sigma:.4f} log p + {normalizer.b_sigma:.4f}")
    for p in (0.1, 0.5, 1.0):
        print(f"  p = {p}: mu {normalizer.mu(p):.4f}, sigma {normalizer.sigma(p):.4f}")
    print(f"written to {config.output}")
    return 0
