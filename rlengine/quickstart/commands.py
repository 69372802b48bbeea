"""The ``rlengine quickstart`` command."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from rlengine import configs
from rlengine.threads import configure as configure_threads


def add_parser(commands, name: str, summary: str) -> None:
    parser = commands.add_parser(
        name, help=summary,
        description="The whole RLHF pipeline on the built-in synthetic task, on this machine, "
                    "nothing downloaded: SFT of a tiny policy; candidate responses sampled from "
                    "it and labelled by a noisy simulated annotator; preference strength by a "
                    "voting ensemble; reward models (plain, strength-denoised, segment-level); "
                    "active selection (D-optimal against random); RRHF; PPO (gold reward, "
                    "bandit, segment-dense); every policy judged by the task's gold reward; and "
                    "the fused ops' speedups measured live. Writes report.md, PNG plots, "
                    "metrics.jsonl and the trained models to --out (the README gives measured wall "
                    "times). A stage whose outputs exist is "
                    "reused when run again (its settings and inputs unchanged); an interrupted "
                    "stage resumes.")
    parser.add_argument("--out", default="runs/quickstart",
                        help="the report folder (default: runs/quickstart)")
    parser.add_argument("--fast", action="store_true",
                        help="every stage at a small size: a smoke test")
    parser.add_argument("--skip", default="", metavar="STAGES",
                        help="comma-separated stages to leave out (their saved outputs are "
                             "still used); stages: " + ", ".join(_stage_names()))
    parser.add_argument("--rerun", default="", metavar="STAGES",
                        help="comma-separated stages to run again even if their outputs are "
                             "up to date ('all': every stage)")
    parser.add_argument("--only", default="", metavar="STAGES",
                        help="run only these stages (the others' saved outputs are used)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (default 0: the CPUs that other work leaves free, "
                             "chosen at the start)")
    parser.add_argument("--progress", type=_bool, default=True,
                        help="progress bars (default true)")
    parser.set_defaults(run=run_quickstart)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _stage_names() -> list[str]:
    from rlengine.quickstart.stages import all_stages

    return [stage.name for stage in all_stages()]


def _stage_list(text: str, option: str) -> set[str]:
    names = {part.strip() for part in text.split(",") if part.strip()}
    if option == "--rerun" and "all" in names:
        return set(_stage_names())
    unknown = sorted(names - set(_stage_names()))
    if unknown:
        raise configs.ConfigError(f"{option}: unknown stage(s) {', '.join(unknown)}; stages: "
                                  f"{', '.join(_stage_names())}")
    return names


def run_quickstart(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rlengine.quickstart import settings as presets
    from rlengine.quickstart.pipeline import Run, run_pipeline
    from rlengine.quickstart.report import findings, load_metrics
    from rlengine.quickstart.stages import all_stages
    from rlengine.training.progress import progress_bar, say, shared_display

    skip, rerun = _stage_list(args.skip, "--skip"), _stage_list(args.rerun, "--rerun")
    only = _stage_list(args.only, "--only")
    if only:
        skip |= set(_stage_names()) - only - {"report"}
    threads = configure_threads(args.threads)
    _quiet_libraries()
    settings = presets.FAST if args.fast else presets.DEFAULT
    out = Path(args.out)
    run = Run(out, settings, progress=args.progress)
    stages = all_stages()
    began = time.perf_counter()
    console = Console()
    with shared_display(console) if args.progress else contextlib.nullcontext():
        say(f"rlengine quickstart ({'fast' if args.fast else 'default'}) -> {out}, "
            f"{threads}")
        overall = progress_bar(args.progress, len(stages), 0, "quickstart", unit="stages")
        outcomes = run_pipeline(stages, run, skip=skip, rerun=rerun, overall=overall)
        overall.close()
    minutes = (time.perf_counter() - began) / 60
    ran = [o.stage for o in outcomes if o.status == "ran"]
    print(f"\nquickstart finished in {minutes:.1f} min (ran: {', '.join(ran) or 'nothing'})")
    if (out / "metrics.jsonl").exists():
        print("\nFindings:")
        for line in findings(load_metrics(out / "metrics.jsonl"), settings):
            print(f"- {line}")
        print(f"\nreport: {out / 'report.md'}  plots: {out / 'plots'}  "
              f"metrics: {out / 'metrics.jsonl'}")
    return 0


def _quiet_libraries() -> None:
    """transformers' own bars and warnings would interleave with the pipeline's bars."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
