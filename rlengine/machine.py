"""What machine a measurement ran on, for the reports that record it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe_cpu() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one) and the logical CPU count."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"
