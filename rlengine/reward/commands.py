"""`rlengine train-rm` and `rlengine strength`: a YAML config (``--config``) and one flag per
option that overrides it (RewardJobConfig: data and model; RewardTrainerConfig: training).
Both run as one process or under torchrun (DDP: gloo on the CPU, NCCL on CUDA)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlengine import configs
from rlengine.reward.config import RewardTrainerConfig
from rlengine.reward.job import SYNTHETIC, RewardJobConfig, build_job


def add_parsers(commands) -> None:
    train = commands.add_parser(
        "train-rm", help="train a reward model (BT with strength, denoising, contrastive, "
                         "MetaRM and segment options)",
        description="Train a reward model. Options come from --config (YAML, option: value), "
                    "then from the flags below, which override it. Writes checkpoints, "
                    "metrics.jsonl (and TensorBoard logs) and the final model to --output-dir, "
                    "and resumes from its newest checkpoint when run again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(train)
    train.set_defaults(run=run_train_rm)

    strength = commands.add_parser(
        "strength", help="preference strength by voting: M reward models differing by seed",
        description="Train --voters reward models that differ only by seed, score every "
                    "training pair with each, and write the pairs with columns strength_mu, "
                    "strength_sigma and strength_d0..d{M-1} to OUTPUT_DIR/strength.jsonl; "
                    "print the decile table and save plots. Train on the result with "
                    "`rlengine train-rm --train OUTPUT_DIR/strength.jsonl --margin strength ...`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    strength.add_argument("--voters", type=int, default=None,
                          help="reward models that vote (the paper: 10; default 10)")
    strength.add_argument("--decile-steps", type=int, default=None,
                          help="steps of each per-decile model (the plot of validation accuracy "
                               "by decile; 0 skips it; default: a third of the voters' steps)")
    _common(strength)
    strength.set_defaults(run=run_strength)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="a YAML file of option: value (any option below, with _ or -)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration and exit")
    configs.add_arguments(parser, RewardJobConfig, group="data and model")
    configs.add_arguments(parser, RewardTrainerConfig, group="training")


def resolve(args: argparse.Namespace) -> tuple[RewardJobConfig, RewardTrainerConfig]:
    """(job, trainer) configs: defaults < YAML < flags, split by field name."""
    values = configs.load_yaml(args.config) if args.config else {}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values.update({k[len("cfg__"):]: v for k, v in vars(args).items() if k.startswith("cfg__")})
    job_fields = {f for f in RewardJobConfig.__dataclass_fields__}
    trainer_fields = {f for f in RewardTrainerConfig.__dataclass_fields__}
    source = args.config or "defaults"
    unknown = sorted(set(values) - job_fields - trainer_fields)
    if unknown:
        raise configs.ConfigError(f"{source}: unknown option(s) {', '.join(unknown)} "
                                  f"(see --help)")
    job = configs.from_mapping(RewardJobConfig,
                               {k: v for k, v in values.items() if k in job_fields}, source)
    trainer = configs.from_mapping(RewardTrainerConfig,
                                   {k: v for k, v in values.items() if k in trainer_fields},
                                   source)
    if SYNTHETIC in (job.train, job.model) and "lr" not in values:
        # the tiny synthetic models want a far larger step than the paper's 7B models
        trainer.lr = 2e-3
    return job, trainer


def _print_config(job: RewardJobConfig, trainer: RewardTrainerConfig) -> None:
    print(configs.to_yaml(job) + configs.to_yaml(trainer), end="")


def run_train_rm(args: argparse.Namespace) -> int:
    from rlengine.reward.trainer import RewardTrainer

    job_config, config = resolve(args)
    if args.print_config:
        _print_config(job_config, config)
        return 0
    job = build_job(job_config, need_entropy=config.score_mode == "segment",
                    need_meta=config.metarm_eta > 0)
    trainer = RewardTrainer(job.make_model(0), job.tokenizer, job.train_pairs, config,
                            device=job_config.device, **job.trainer_kwargs())
    result = trainer.train()
    if trainer.dist.is_main:
        for name, values in result.metrics.items():
            print(f"validation {name}: accuracy {values['accuracy']:.4f}  loss "
                  f"{values['loss']:.4f}  reward mean {values['reward_mean']:.3f} std "
                  f"{values['reward_std']:.3f}  ({values['pairs']} pairs)")
        if result.model_dir:
            print(f"model: {result.model_dir}")
        if config.output_dir:
            (Path(config.output_dir) / "final_metrics.json").write_text(
                json.dumps({"steps": result.steps, "metrics": result.metrics}, indent=2) + "\n")
    return 0


def run_strength(args: argparse.Namespace) -> int:
    from rlengine.reward.strength_report import run_strength_command

    job_config, config = resolve(args)
    if args.print_config:
        _print_config(job_config, config)
        return 0
    return run_strength_command(job_config, config, voters=args.voters,
                                decile_steps=args.decile_steps)
