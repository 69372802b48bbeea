"""``python -m rlengine.cli``: the `rlengine` command (torchrun runs it this way)."""

from rlengine.cli import entry_point

entry_point()
