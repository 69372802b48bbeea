"""Progress bars, drawn with rich.

A trainer asks for a bar with ``progress_bar(...)``. On its own (``rlengine train-rm``) the bar
gets a live display of its own; inside ``shared_display()`` (the quickstart pipeline, which
runs many trainers one after another) every bar joins the one display the pipeline opened, so
nested bars stack under the pipeline's own instead of fighting over the terminal. ``say``
prints a line above the bars of that display (a plain print would tear them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_shared: Progress | None = None


def _columns() -> tuple:
    return (TextColumn("[bold]{task.description}"), BarColumn(bar_width=30),
            MofNCompleteColumn(), TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
            TextColumn("<"), TimeRemainingColumn(), TextColumn("{task.fields[postfix]}"))


def new_display(console: Console | None = None, *, transient: bool = False) -> Progress:
    """A rich Progress with the engine's columns (description, bar, n/total, unit, elapsed,
    remaining, the latest metrics)."""
    return Progress(*_columns(), console=console, transient=transient, refresh_per_second=4)


@contextlib.contextmanager
def shared_display(console: Console | None = None) -> Iterator[Progress]:
    """One live display for everything that runs inside; bars opened by ``progress_bar`` join
    it and leave it when closed."""
    global _shared
    previous = _shared
    display = new_display(console)
    _shared = display
    try:
        with display:
            yield display
    finally:
        _shared = previous


def say(message: str) -> None:
    """Print a line: above the shared display's bars when one is open, else plainly."""
    if _shared is not None:
        _shared.console.print(message, markup=False, highlight=False, soft_wrap=True)
    else:
        print(message, flush=True)


class Bar:
    """One task of a rich display, with the small interface the trainers use (tqdm's names:
    update, set_postfix, close)."""

    def __init__(self, display: Progress, task: TaskID, *, owns_display: bool):
        self.display = display
        self.task = task
        self.owns_display = owns_display

    def update(self, n: int = 1) -> None:
        self.display.advance(self.task, n)

    def set_postfix(self, **values: Any) -> None:
        text = " ".join(f"{key}={value}" for key, value in values.items())
        self.display.update(self.task, postfix=text)

    def close(self) -> None:
        if self.owns_display:
            self.display.stop()
        else:
            self.display.remove_task(self.task)


class NoProgress:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, **values: Any) -> None: ...
    def close(self) -> None: ...


def progress_bar(enabled: bool, total: int | None, initial: int, desc: str, unit: str = "step"
                 ) -> Bar | NoProgress:
    """A bar from ``initial`` to ``total`` (None: not known ahead): in the shared display when
    one is open, else in a display of its own; a stand-in that does nothing when not
    ``enabled``."""
    if not enabled:
        return NoProgress()
    display = _shared
    owns = display is None
    if display is None:
        display = new_display()
        display.start()
    task = display.add_task(desc, total=total, completed=initial, unit=unit, postfix="")
    return Bar(display, task, owns_display=owns)
