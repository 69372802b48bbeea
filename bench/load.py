"""Another process's load, for measuring how rlengine behaves on a busy machine."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time


@contextlib.contextmanager
def busy_cpu(active: bool = True):
    """While active, a process that keeps one CPU busy (a pure-Python loop: no threads, no
    memory traffic), started half a second before the body runs."""
    if not active:
        yield
        return
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)
    try:
        yield
    finally:
        process.kill()
        process.wait()
