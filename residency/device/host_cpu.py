"""The host CPU as the CPU backend sees it: the cores this process may run on, and the CPU's model name.

The one core count: the measurement and the CPU backend both leave one of these cores to the copy thread.
"""

from __future__ import annotations

import os
import platform


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows, else "cpu"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
