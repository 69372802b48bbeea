"""The `rlengine` command."""

from __future__ import annotations

import argparse
import sys

import torch


def _kernels(args: argparse.Namespace) -> int:
    from rlengine import kernel_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"rlengine kernels on {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    rows = kernel_demo.run(batch=args.batch, seq_len=args.seq_len, vocab_size=args.vocab,
                           repeats=args.repeats, seed=args.seed,
                           progress=lambda msg: print(f"  ... {msg}", flush=True))
    print()
    print(kernel_demo.format_table(rows))
    print("\nspeedup = eager median / rlengine median, both measured just now on this machine;"
          "\nmax |diff| = largest difference between the two results.")
    return 0


def _int_at_least(low: int):
    """An argparse type: an int >= low, with an error that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _add_kernel_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=_int_at_least(1), default=8, help="sequences (default 8)")
    # the second half of each sequence is the response: 3 tokens leave it at least one label
    parser.add_argument("--seq-len", type=_int_at_least(3), default=256,
                        help="tokens per sequence, at least 3 (default 256)")
    parser.add_argument("--vocab", type=_int_at_least(2), default=32000,
                        help="vocabulary size (default 32000)")
    parser.add_argument("--repeats", type=_int_at_least(1), default=5,
                        help="timed runs per op (default 5)")
    parser.add_argument("--threads", type=_int_at_least(0), default=0,
                        help="CPU threads (default 0: torch's)")
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlengine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from rlengine.quickstart import commands as quickstart_commands

    quickstart_commands.add_parser(commands)
    kernels = commands.add_parser(
        "kernels", help="time every fused op against its eager equivalent, live",
        description="Run every fused op on a tiny random transformers model's outputs, check it "
                    "against its eager equivalent and print both timings.")
    _add_kernel_options(kernels)
    kernels.set_defaults(run=_kernels)
    from rlengine.reward import commands as reward_commands

    reward_commands.add_parsers(commands)
    from rlengine.reward.active import commands as active_commands

    active_commands.add_parsers(commands)
    from rlengine.policy import commands as policy_commands

    policy_commands.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlengine.configs import ConfigError
    from rlengine.data.sources import DataFormatError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, DataFormatError) as error:
        parser.exit(2, f"rlengine {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
