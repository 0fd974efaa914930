"""How much RAM this process may budget: psutil's figures, capped by a cgroup memory limit.

The CPU backend's "device memory" is this RAM; a container's limit is the real ceiling, not the host's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 reports "no limit" as a page-rounded 2**63 - 1; anything this large is no limit.
_NO_LIMIT_BYTES = 2**60


@dataclass(frozen=True)
class HostMemory:
    """Host RAM the process may use, in bytes, and what limits it (the host or a cgroup)."""
    total_bytes: int  # RAM the process could ever use (host total, or the cgroup limit if lower)
    available_bytes: int  # free for new allocations now
    limited_by: str  # "host" | "cgroup v2" | "cgroup v1"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    # "max" (v2 unlimited) reads as None; ASCII digits only (str.isdigit accepts '²', which int() refuses)
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 30 else None


def cgroup_limit_bytes(root: Path = CGROUP_ROOT) -> tuple[int, int, str] | None:
    """(limit, current usage, version) of this process's memory cgroup, or None when unlimited."""
    for limit_file, usage_file, version in (
        (root / "memory.max", root / "memory.current", "cgroup v2"),
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes", "cgroup v1"),
    ):
        limit = _read_int(limit_file)
        if limit is not None and limit < _NO_LIMIT_BYTES:
            return limit, _read_int(usage_file) or 0, version
    return None


def host_memory(root: Path = CGROUP_ROOT) -> HostMemory:
    """Host RAM now: psutil's figures, lowered to the cgroup limit under `root` when that is smaller."""
    vm = psutil.virtual_memory()
    total, available, limited_by = int(vm.total), int(vm.available), "host"
    cgroup = cgroup_limit_bytes(root)
    if cgroup is not None and cgroup[0] < total:
        limit, usage, limited_by = cgroup
        total = limit
        available = max(0, min(available, limit - usage))
    return HostMemory(total, available, limited_by)


def cpu_reserve_bytes(total_bytes: int) -> int:
    """RAM left to the OS, the interpreter and other programs: 10 % of the total, within 0.5–2 GiB."""
    return min(2 * 2**30, max(2**29, total_bytes // 10))
