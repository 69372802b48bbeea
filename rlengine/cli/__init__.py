"""The `rlengine` command.

Every command lives in a module of its own family (``COMMANDS``); only the chosen command's
module is imported, so that ``rlengine --help`` and a mistyped command answer at once instead
of after the seconds torch, transformers and the trainers take to import.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rlengine import __version__

# name: (the module whose add_parser(commands, name, summary) defines it, its one-line summary,
# whether it resumes from checkpoints when run again)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "quickstart": ("rlengine.quickstart.commands",
                   "the main job: the whole RLHF pipeline on the built-in task, with a report",
                   True),
    "kernels": ("rlengine.cli.kernels",
                "time every fused op against its eager equivalent, live", False),
    "train-rm": ("rlengine.reward.commands",
                 "train a reward model (BT with strength, denoising, contrastive, MetaRM and "
                 "segment options)", True),
    "strength": ("rlengine.reward.commands",
                 "preference strength by voting: M reward models differing by seed", True),
    "active-sim": ("rlengine.reward.active.commands",
                   "active reward modeling: strategies compared over labelling rounds", False),
    "select": ("rlengine.reward.active.commands",
               "choose the pairs to label next from an unlabelled pool", False),
    "sft": ("rlengine.policy.commands",
            "supervised fine-tuning of a policy on demonstrations (the start of RRHF and PPO)",
            True),
    "rrhf": ("rlengine.policy.commands",
             "train a policy with RRHF (ranked candidates + SFT on the best)", True),
    "ppo": ("rlengine.policy.commands",
            "train a policy with PPO (bandit, token or segment-dense rewards)", True),
    "fit-normalizer": ("rlengine.policy.commands",
                       "fit the location-aware normalizer of segment rewards", False),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with the full options of the command that ``argv`` names (if any) and the
    others as names with their summaries."""
    parser = argparse.ArgumentParser(prog="rlengine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"rlengine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, (module, summary, _) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(commands, name, summary)
        else:
            commands.add_parser(name, help=summary)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The errors that mean bad input, not a bug: a one-line message and exit code 2. Looked up
    in sys.modules: an error of a type whose module was never imported cannot have been
    raised."""
    found = []
    for module, name in (("rlengine.configs", "ConfigError"),
                         ("rlengine.data.sources", "DataFormatError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        resumes = COMMANDS[args.command][2]
        hint = " (run the same command again to resume from its newest checkpoint)" \
            if resumes else ""
        print(f"\nrlengine {args.command}: interrupted{hint}", file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
    except Exception as error:
        if not isinstance(error, _user_error_types()):
            raise
        parser.exit(2, f"rlengine {args.command}: error: {error}\n")


def entry_point() -> None:
    """The `rlengine` console script and ``python -m rlengine.cli``: the process-wide settings
    of a command, which must be made before torch and transformers are imported, then `main`:
    - threads: a short OpenMP spin and the load-aware default (rlengine.threads);
    - no transformers progress bars (loading and writing weights): the commands draw their own,
      and transformers decides at import whether to draw its."""
    from rlengine import threads

    threads.prepare_process()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        code = main()
    except KeyboardInterrupt:  # before a command ran (main reports one that was running)
        print("\nrlengine: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
