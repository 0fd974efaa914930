"""Host memory the process may still use: psutil's available RAM, capped by a cgroup limit when set.

Pinned memory cannot be swapped, so the host store and the pinned ring are budgeted against this.
"""

from __future__ import annotations

from pathlib import Path

import psutil

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)
_NO_LIMIT = 2**60  # v1 reports "no limit" as a huge page-rounded number


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_room_bytes() -> int | None:
    """Limit minus usage of this process's memory cgroup, or None when unlimited or unreadable."""
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < _NO_LIMIT:
            return max(0, limit - usage)
    return None


def host_available_bytes() -> int:
    available = psutil.virtual_memory().available
    room = cgroup_room_bytes()
    return available if room is None else min(available, room)
