"""The trainers' progress bars (rich): a bar on its own display, bars joining a shared one,
lines printed above the bars, and the do-nothing stand-in."""

import io

from rich.console import Console

from rlengine.training.progress import NoProgress, progress_bar, say, shared_display


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=120), buffer


def test_bars_join_the_shared_display_and_leave_it_when_closed():
    console, buffer = _console()
    with shared_display(console) as display:
        outer = progress_bar(True, 3, 0, "pipeline", unit="stages")
        inner = progress_bar(True, 10, 4, "train", unit="step")
        assert len(display.tasks) == 2
        inner.update(6)
        inner.set_postfix(loss="0.123")
        task = display.tasks[1]
        assert task.completed == 10 and task.fields["postfix"] == "loss=0.123"
        inner.close()
        assert [t.description for t in display.tasks] == ["pipeline"]
        say("a line above the bars")
        outer.update(3)
        outer.close()
    assert "a line above the bars" in buffer.getvalue()


def test_a_bar_without_a_shared_display_has_its_own(capsys):
    bar = progress_bar(True, 5, 0, "alone")
    assert bar.owns_display
    bar.update(5)
    bar.close()
    say("plain line")
    assert "plain line" in capsys.readouterr().out


def test_disabled_bars_do_nothing():
    bar = progress_bar(False, 5, 0, "off")
    assert isinstance(bar, NoProgress)
    bar.update(1)
    bar.set_postfix(loss=1)
    bar.close()
