"""`rlengine train-rm` and `rlengine strength`: a YAML config (``--config``) and one flag per
option that overrides it (RewardJobConfig: data and model; RewardTrainerConfig: training).
Both run as one process or under torchrun (DDP: gloo on the CPU, NCCL on CUDA)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rlengine import configs
from rlengine.files import atomic_write
from rlengine.reward.config import RewardTrainerConfig
from rlengine.reward.job import SYNTHETIC, RewardJobConfig, build_job


def add_parser(commands, name: str, summary: str) -> None:
    {"train-rm": _add_train_rm, "strength": _add_strength}[name](commands, name, summary)


def _add_train_rm(commands, name: str, summary: str) -> None:
    train = commands.add_parser(
        name, help=summary,
        description="Train a reward model. Options come from --config (YAML, option: value), "
                    "then from the flags below, which override it (--print-config shows the "
                    "result). Writes checkpoints, metrics.jsonl (and TensorBoard logs), the "
                    "final model and final_metrics.json to --output-dir, and resumes from its "
                    "newest checkpoint when run again. Data parallel: `torchrun "
                    "--nproc-per-node N -m rlengine.cli train-rm ...` (batch_size is the global "
                    "batch, so the numbers match one process). Real text without network "
                    "access: --model tiny-llama --tokenizer train (a byte-level BPE trained on "
                    "the training texts), or a local checkpoint folder with its tokenizer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(train)
    train.set_defaults(run=run_train_rm)


def _add_strength(commands, name: str, summary: str) -> None:
    strength = commands.add_parser(
        name, help=summary,
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
    """(job, trainer) configs: defaults < YAML < flags (rlengine.configs.from_sources)."""
    (job, trainer), given = configs.from_sources([RewardJobConfig, RewardTrainerConfig], args,
                                                 config_path=args.config)
    if SYNTHETIC in (job.train, job.model) and "lr" not in given:
        # the tiny synthetic models want a far larger step than the paper's 7B models
        trainer.lr = 2e-3
    return job, trainer


def _print_config(job: RewardJobConfig, trainer: RewardTrainerConfig) -> None:
    print(configs.to_yaml(job) + configs.to_yaml(trainer), end="")


def _is_main_process() -> bool:
    # Under torchrun, before the trainer creates the process group: only rank 0 speaks.
    return int(os.environ.get("RANK", "0")) == 0


def _shut_down_process_group() -> None:
    """After a successful run: every process waits for the others to finish their work, then
    leaves the group. (After an error there is no clean shutdown to make: the process exits
    and torchrun stops the others; a collective call now could wait forever.)"""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_train_rm(args: argparse.Namespace) -> int:
    from rlengine.reward.trainer import RewardTrainer

    job_config, config = resolve(args)
    if args.print_config:
        if _is_main_process():
            _print_config(job_config, config)
        return 0
    log = print if _is_main_process() else (lambda *_: None)
    if not (config.progress and _is_main_process()):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # its "Writing model shards" bar
    job = build_job(job_config, need_entropy=config.score_mode == "segment",
                    need_meta=config.metarm_eta > 0, log=log)
    try:
        trainer = RewardTrainer(job.make_model(0), job.tokenizer, job.train_pairs, config,
                                device=job_config.device, log=log, **job.trainer_kwargs())
    except ValueError as error:   # an option that does not fit the data: exit 2, no traceback
        raise configs.ConfigError(str(error)) from None
    result = trainer.train()
    if trainer.dist.is_main:
        for name, values in result.metrics.items():
            print(f"validation {name}: accuracy {values['accuracy']:.4f}  loss "
                  f"{values['loss']:.4f}  reward mean {values['reward_mean']:.3f} std "
                  f"{values['reward_std']:.3f}  ({values['pairs']} pairs)")
        if result.model_dir:
            print(f"model: {result.model_dir}")
        if config.output_dir:
            # written last: its presence marks a finished run
            text = json.dumps({"steps": result.steps, "metrics": result.metrics}, indent=2)
            atomic_write(Path(config.output_dir) / "final_metrics.json",
                         lambda tmp: tmp.write_text(text + "\n"))
    _shut_down_process_group()
    return 0


def run_strength(args: argparse.Namespace) -> int:
    from rlengine.reward.strength_report import run_strength_command

    job_config, config = resolve(args)
    if args.print_config:
        _print_config(job_config, config)
        return 0
    return run_strength_command(job_config, config, voters=args.voters,
                                decile_steps=args.decile_steps)
