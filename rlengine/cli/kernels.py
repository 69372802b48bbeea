"""`rlengine kernels`: every fused op against its eager equivalent, checked and timed live."""

from __future__ import annotations

import argparse


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


def add_parser(commands, name: str, summary: str) -> None:
    parser = commands.add_parser(
        name, help=summary,
        description="Run every fused op on a tiny random transformers model's outputs, check it "
                    "against its eager equivalent and print both timings.")
    parser.add_argument("--batch", type=_int_at_least(1), default=8, help="sequences (default 8)")
    # the second half of each sequence is the response: 3 tokens leave it at least one label
    parser.add_argument("--seq-len", type=_int_at_least(3), default=256,
                        help="tokens per sequence, at least 3 (default 256)")
    parser.add_argument("--vocab", type=_int_at_least(2), default=32000,
                        help="vocabulary size (default 32000)")
    parser.add_argument("--repeats", type=_int_at_least(1), default=5,
                        help="timed runs per op (default 5)")
    parser.add_argument("--threads", type=_int_at_least(0), default=0,
                        help="CPU threads (default 0: the CPUs that other work leaves free)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run_kernels)


def run_kernels(args: argparse.Namespace) -> int:
    import torch

    from rlengine import kernel_demo, threads

    choice = threads.configure(args.threads)
    print(f"rlengine kernels on {choice}, torch {torch.__version__}")
    rows = kernel_demo.run(batch=args.batch, seq_len=args.seq_len, vocab_size=args.vocab,
                           repeats=args.repeats, seed=args.seed,
                           progress=lambda msg: print(f"  ... {msg}", flush=True))
    print()
    print(kernel_demo.format_table(rows))
    print("\nspeedup = eager median / rlengine median, both measured just now on this machine;"
          "\nmax |diff| = largest difference between the two results.")
    return 0
