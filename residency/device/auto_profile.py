"""This machine's profile: measured once (quick mode) and cached, read from the cache after that.

What `profile="auto"` means for `residency.attach` and what `run`/`play`/`demo` use without `--profile`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from residency import userpath
from residency.device.measure import MEASUREMENT_VERSION, measure_profile
from residency.device.profile import DeviceProfile
from residency.device.profile_io import load_profile, save_profile
from residency.errors import ResidencyError

KINDS = ("cpu", "cuda")  # a cached profile per kind of device


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/residency, else ~/.cache/residency."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "residency"


def cached_profile_path(kind: str) -> Path:
    """Named by the measurement method's version: an upgrade that measures differently measures again."""
    return cache_dir() / f"profile-{kind}-m{MEASUREMENT_VERSION}.json"


def device_kind() -> str:
    """'cuda' when torch sees a CUDA or ROCm GPU, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def machine_profile(kind: str | None = None, *, say: Callable[[str], None] = _to_stderr,
                    measure: Callable[..., DeviceProfile] = measure_profile) -> DeviceProfile:
    """This machine's `kind` ('cpu' or 'cuda'; None: the GPU if there is one) profile: read from the cache,
    or measured in quick mode by `measure` (~25–60 s on 2 cores, by CPU) and cached. `say` gets one line before a
    measurement and one for a damaged or unwritable cache (default: stderr); neither stops it.

    Raises ResidencyError for an unknown kind, or when the measurement itself fails."""
    kind = kind or device_kind()
    if kind not in KINDS:
        raise ResidencyError(f"machine profile kind {kind!r}", hint="one of: " + ", ".join(KINDS))
    path = cached_profile_path(kind)
    if userpath.path_kind(path)[0] == userpath.FILE:  # XDG_CACHE_HOME may name anything
        try:
            return load_profile(path)
        except ResidencyError as e:  # a damaged cache costs a re-measure, not the run
            say(f"the cached profile is unreadable ({e.message}); measuring again")
    problem = _uncacheable(path.parent)
    if problem is None:
        say(f"measuring this machine's {kind} profile once (quick mode, ~25–60 s); cached in {path}")
    else:  # said before the measurement: after it, every later command had cost its ~40 s again unannounced
        say(f"measuring this machine's {kind} profile (quick mode, ~25–60 s); it cannot be cached ({problem}), so "
            "every command will measure it again\nhint: set XDG_CACHE_HOME to a writable directory")
    profile = measure("cuda:0" if kind == "cuda" else "cpu", quick=True,
                      source=f"residency (cached profile, quick) on {kind}")
    if problem is not None:  # said before the measurement: saying it again after adds nothing
        return profile
    try:  # its directory was made by _uncacheable
        save_profile(profile, path)
    except (OSError, ResidencyError) as e:  # a read-only home only costs a re-measure next time
        why, hint = (e.message, e.hint) if isinstance(e, ResidencyError) else (str(e), None)
        say(f"could not cache the profile: {why}; it will be measured again next time"
            + (f"\nhint: {hint}" if hint else ""))
    return profile


def _uncacheable(directory: Path) -> str | None:
    """Why a profile cannot be cached in `directory` (a file where a directory should be, a directory that cannot be
    created or written), or None. The directory is created here, where the profile will be saved."""
    kind = userpath.path_kind(directory)[0]
    if kind not in (userpath.DIRECTORY, userpath.MISSING):
        return userpath.not_a_directory(directory)[0]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why, creatable = userpath.not_a_directory(directory)  # a file further up is the clearer reason
        return why if not creatable else f"{directory} cannot be created: {e.strerror or e}"
    return None if os.access(directory, os.W_OK | os.X_OK) else f"directory {directory} is not writable"
