"""The cache of calibrated profiles: one JSON per (base profile, workload) under cache_dir()/calibrated/.

A calibrated profile (residency.telemetry.calibration) is its base profile with the per-engine rates and the
per-component compute scales a run measured. It is saved as `<base>--<workload fingerprint>.json` and named
"<base> (calibrated)"; the base profile's name is recorded as the provenance entry "base_profile" (kind
"calibrated", source = the base's name), its fingerprint in `Calibration.base_fingerprint`.

`--profile calibrated` resolves through `profile_for`: the calibration of this machine's cached profile for the
model's workload, else one for another model of the same base with its compute scales dropped (they belong to
the model measured; the per-engine rates describe the machine and transfer). A file whose base fingerprint no
longer matches the base (re-measured or edited) is deleted; an unreadable one is skipped and kept.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from residency import userpath
from residency.device.auto_profile import cache_dir, cached_profile_path, device_kind
from residency.device.profile import DeviceProfile, Provenance
from residency.device.profile_io import (
    load_profile,
    read_profile,
    resolve_profile,
    save_profile,
    shipped_profile_names,
)
from residency.errors import ResidencyError, UsageError
from residency.units import plural
from residency.validate import did_you_mean, show

CALIBRATED = "calibrated"  # the --profile value that asks for a calibrated profile
BASE_KEY = "base_profile"  # provenance entry holding the base profile's name
NAME_SUFFIX = " (calibrated)"
MAX_SLUG = 60  # characters of the base name kept in a file name
FULL_FIT_FRAMES = 16  # a calibration on this many frames (the fit's target window) replaces any cached one
# Fewer fitted frames than this are not saved: a 1- or 2-frame fit (a short demo) left every figure at the
# profile's value ("before -32.9 %, after -32.9 %") and would then be what `--profile calibrated` reads
MIN_SAVED_FIT_FRAMES = 3


def _to_stderr(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)  # as the CLI says its other notes (`residency profiles` too)


def calibrated_dir() -> Path:
    """cache_dir()/calibrated (it may not exist yet)."""
    return cache_dir() / "calibrated"


def base_name(profile: DeviceProfile) -> str:
    """The name of the profile a calibrated `profile` started from (its own name when it records none)."""
    entry = profile.provenance.get(BASE_KEY)
    return entry.source if entry is not None else profile.name


def calibrated_path(base: str, workload_fingerprint: str) -> Path:
    """The cache file of the calibration of base profile `base` (a name) for the workload `workload_fingerprint`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")[:MAX_SLUG] or "profile"
    return calibrated_dir() / f"{slug}--{workload_fingerprint}.json"


def cache_path_of(profile: DeviceProfile) -> Path:
    """The cache file the calibrated `profile` is saved to (it carries a calibration record)."""
    return calibrated_path(base_name(profile), profile.calibration.workload_fingerprint)


def save_calibrated(profile: DeviceProfile) -> Path:
    """Write the calibrated `profile` to the cache (atomically), named "<base> (calibrated)" with the base's
    name in provenance["base_profile"]; replaces the calibration of the same base and workload.

    Returns the file's path. Raises ResidencyError when `profile` carries no calibration record, or the cache
    directory cannot be created or written."""
    if profile.calibration is None:
        raise ResidencyError(f"profile {profile.name!r} is not calibrated: only a calibration is cached",
                             hint="calibrate a run first (Runtime.calibrated_profile)")
    base = base_name(profile)
    named = dataclasses.replace(profile, name=base + NAME_SUFFIX,
                                provenance={**profile.provenance, BASE_KEY: Provenance("calibrated", base)})
    path = cache_path_of(profile)
    check_cache_writable()
    return save_profile(named, path)


def not_the_machines(profile: DeviceProfile) -> str | None:
    """Why a calibration of `profile` would not be this machine's (the words of a refusal), or None when `profile`
    is this machine's cached profile or a calibration of it: `--profile calibrated` builds on the cached one, and a
    calibration of another profile of the same name would replace the machine's in the cache and be discarded at
    its next use as of a changed base."""
    try:
        cached = load_profile(cached_profile_path(device_kind()))
    except ResidencyError:
        return "this machine's profile has not been measured yet"
    base = profile.calibration.base_fingerprint if profile.calibration is not None else profile.fingerprint()
    return None if base == cached.fingerprint() else "it is not this machine's cached profile"


def check_cache_writable() -> Path:
    """calibrated_dir(), created if missing, after creating and removing a file in it; ResidencyError when either
    fails (a read-only cache: `run --calibrate` checks it before its rollout, not after)."""
    folder = calibrated_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ResidencyError(f"{folder}: cannot write the calibration cache ({e.strerror or e})",
                             hint="set XDG_CACHE_HOME to a writable directory") from None
    return folder


def better_cached(profile: DeviceProfile) -> tuple[Path, DeviceProfile] | None:
    """The cached calibration a new calibration `profile` should not replace, with its path, or None: the one of
    the same base (unchanged) and workload when it was fitted on more frames and `profile` on fewer than
    FULL_FIT_FRAMES (a 4-frame demo would otherwise discard a 50-frame fit). A fit on FULL_FIT_FRAMES or more
    replaces any: the machine may have changed since. Never raises for a bad cache file."""
    if profile.calibration is None or profile.calibration.frames >= FULL_FIT_FRAMES:
        return None
    path = cache_path_of(profile)
    try:
        cached = read_profile(path) if userpath.path_kind(path)[0] == userpath.FILE else None
    except ResidencyError:
        return None
    if (cached is None or cached.calibration is None
            or cached.calibration.base_fingerprint != profile.calibration.base_fingerprint
            or cached.calibration.frames <= profile.calibration.frames):
        return None
    return path, cached


def _skipped(path: Path, why: str) -> str:
    """The line an unreadable cache file gets."""
    return f"skipped the calibrated profile {path}: unreadable ({why}); --remove-calibrated deletes it"


def _entries(say: Callable[[str], None] | None,
             unreadable: list[tuple[Path, str]] | None = None) -> list[tuple[Path, DeviceProfile]]:
    """Every readable calibrated profile of the cache, by path. Unreadable files are skipped and kept (a hand
    edit's typo is the user's to fix; `residency profiles --remove-calibrated` deletes them): each (path, why) goes
    to `unreadable` when given, else `say` is told of it."""
    folder = calibrated_dir()
    if userpath.path_kind(folder)[0] != userpath.DIRECTORY:
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            profile = read_profile(path)
            if profile.calibration is None:
                raise ResidencyError("it holds no calibration record")
        except ResidencyError as e:
            if unreadable is not None:
                unreadable.append((path, e.message))
            elif say is not None:
                say(_skipped(path, e.message))
            continue
        found.append((path, profile))
    return found


def _discard(path: Path, why: str, say: Callable[[str], None]) -> None:
    try:
        path.unlink()
    except OSError as e:  # a read-only cache keeps the file: it is ignored all the same
        say(f"ignored the calibrated profile {path}: {why}; could not delete it ({e.strerror or e})")
        return
    say(f"discarded the calibrated profile {path}: {why}")


def find_calibrated(base: DeviceProfile, workload_fingerprint: str, say: Callable[[str], None] = _to_stderr,
                    unreadable: list[tuple[Path, str]] | None = None) -> DeviceProfile | None:
    """The calibrated profile to plan the workload `workload_fingerprint` with on the uncalibrated `base`.

    The cache's calibration of `base` for that workload; else the newest calibration of `base` for another
    workload, its compute scales dropped (`say` is told so); None without either. Files of `base` whose recorded
    base fingerprint is not `base.fingerprint()` (the base was re-measured or edited) are deleted, each with a line
    to `say`; unreadable files are skipped and kept (a hand edit's typo can be fixed; `residency profiles
    --remove-calibrated` deletes them), each with a line (or collected in `unreadable`, as _entries does). Never
    raises for a bad cache file."""
    fingerprint = base.fingerprint()
    mine = []
    for path, profile in _entries(say, unreadable):
        if base_name(profile) != base.name:
            continue
        if profile.calibration.base_fingerprint != fingerprint:
            _discard(path, f"its base profile {base.name!r} changed since it was calibrated", say)
            continue
        if profile.calibration.workload_fingerprint == workload_fingerprint:
            return profile
        mine.append(profile)
    if not mine:
        return None
    other = max(mine, key=lambda p: (p.calibration.date, p.calibration.frames))
    if other.compute_scale:
        say(f"using the per-engine rates calibrated on {other.calibration.model}; its compute scales are left "
            "out (they belong to that model)")
    return dataclasses.replace(other, compute_scale={})


def list_calibrated(say: Callable[[str], None] | None = None) -> list[tuple[Path, DeviceProfile]]:
    """(path, profile) of every readable calibrated profile in the cache, by path; unreadable files are skipped
    (with `say`, each with a line; none is deleted)."""
    return _entries(say)


def base_changed(profile: DeviceProfile) -> bool | None:
    """Whether the calibration's base profile — this machine's cached one of that name — changed since it was
    fitted (it is then discarded at its next use); None when no cached machine profile has its base's name."""
    for kind in ("cpu", "cuda"):
        path = cached_profile_path(kind)
        if not path.is_file():
            continue
        try:
            base = read_profile(path)
        except ResidencyError:
            continue
        if base.name == base_name(profile):
            return base.fingerprint() != profile.calibration.base_fingerprint
    return None


def remove_calibrated() -> int:
    """Delete every file of the calibration cache (readable or not); returns how many were deleted.

    Raises ResidencyError when a file cannot be deleted."""
    folder = calibrated_dir()
    if userpath.path_kind(folder)[0] != userpath.DIRECTORY:
        return 0
    # what is not a file is named before anything is deleted: it failed half way ("Is a directory", with a hint on
    # permissions), the files before it gone
    paths = sorted(folder.glob("*.json"))
    odd = [p for p in paths if p.is_dir() and not p.is_symlink()]  # a link, dangling or not, or a FIFO unlinks
    if odd:
        raise ResidencyError(f"{odd[0]}: not a calibrated profile (a directory, not a file); nothing was deleted",
                             hint=f"move it out of {folder}, then run this again")
    removed = 0
    for path in paths:
        try:
            path.unlink()
        except OSError as e:
            raise ResidencyError(f"{path}: cannot delete it ({e.strerror or e}); {plural(removed, 'file')} deleted "
                                 "before it", hint="check the permissions of the cache directory") from None
        removed += 1
    return removed


def calibrated_profile(workload_fingerprint: str, *, kind: str | None = None, model: str = "MODEL",
                       image: bool | str = False, say: Callable[[str], None] = _to_stderr) -> DeviceProfile:
    """The calibrated profile of this machine's cached `kind` profile ('cpu' or 'cuda'; None: the GPU if torch
    sees one) for the workload `workload_fingerprint` (see find_calibrated). Nothing is measured.

    Raises UsageError (exit 2) when there is no cached machine profile or no calibration of it; `model` names
    the model in the hint, with `--image` where `image` says the run needs one: the path given (a str), else
    start-0000.png (what `run default --frames 1 -o start.png` writes) for a model without a start image."""
    shown = (f" --image {shlex.quote(image)}" if isinstance(image, str)
             else " --image start-0000.png" if image else "")
    hint = f"run `residency run {model}{shown} -o out.gif --frames 18 --calibrate` first"
    path = cached_profile_path(kind or device_kind())
    if userpath.path_kind(path)[0] != userpath.FILE:
        raise UsageError("no calibrated profile: this machine's profile has not been measured yet", hint=hint)
    try:
        base = load_profile(path)
    except ResidencyError as e:
        raise UsageError(f"no calibrated profile: this machine's cached profile is unreadable ({e.message})",
                         hint=hint) from None
    unreadable: list[tuple[Path, str]] = []
    found = find_calibrated(base, workload_fingerprint, say, unreadable)
    prefix = calibrated_path(base.name, "").name.removesuffix(".json")  # this base's files: "<slug>--…"
    own = [(path, why) for path, why in unreadable if path.name.startswith(prefix)]
    if found is None and own:  # a bad file, not a missing calibration (exit 1, and what is wrong with it)
        path, why = own[0]
        raise ResidencyError(f"no readable calibrated profile of {base.name!r}: {path}: unreadable ({why})"
                             + (f" (and {len(own) - 1} more of it unreadable)" if len(own) > 1 else ""),
                             hint="delete that file (`residency profiles --remove-calibrated` deletes every calibrated "
                                  "profile, readable or not); then " + hint)
    for path, why in unreadable:
        say(_skipped(path, why))
    if found is None:
        raise UsageError(f"no calibrated profile of {base.name!r} in {calibrated_dir()}", hint=hint)
    return found


def profile_for(name_or_path: str | os.PathLike[str] | DeviceProfile, workload_fingerprint: str, *,
                kind: str | None = None, model: str = "MODEL", image: bool | str = False,
                say: Callable[[str], None] = _to_stderr) -> DeviceProfile:
    """What `--profile` means for a workload: "calibrated" is calibrated_profile(...) (it takes precedence over
    a file of that name), anything else resolve_profile — a calibrated profile's file of another workload without
    its compute scales (they belong to the model it was fitted on; `say` is told). Raises as those do."""
    if isinstance(name_or_path, str) and name_or_path == CALIBRATED:
        return calibrated_profile(workload_fingerprint, kind=kind, model=model, image=image, say=say)
    return for_workload_fingerprint(resolve_cli_profile(name_or_path), workload_fingerprint, say)


def resolve_cli_profile(name_or_path: str | os.PathLike[str] | DeviceProfile) -> DeviceProfile:
    """resolve_profile, where `--profile` also takes "calibrated": an unknown name close to it is offered it
    (`--profile Calibrated` had no suggestion; the library's resolve_profile does not take the name)."""
    try:
        return resolve_profile(name_or_path)
    except UsageError as e:
        near = did_you_mean(str(name_or_path), [*shipped_profile_names(), CALIBRATED])
        if CALIBRATED not in near:
            raise
        raise UsageError(f"unknown profile {show(str(name_or_path))}{near}",
                         hint=f"{e.hint}; or '{CALIBRATED}': this machine's profile as `run --calibrate` fitted "
                              "it") from None


def for_workload_fingerprint(profile: DeviceProfile, workload_fingerprint: str,
                             say: Callable[[str], None] | None = None) -> DeviceProfile:
    """The profile to plan the workload `workload_fingerprint` with: a calibration's compute scales belong to the
    model it was fitted on, so for another they are dropped (the per-engine rates are kept: they describe the
    machine)."""
    c = profile.calibration
    if c is None or not profile.compute_scale or c.workload_fingerprint == workload_fingerprint:
        return profile
    if say is not None:
        say(f"using the per-engine rates of {profile.name!r}, calibrated on {c.model}; its compute scales belong to "
            "that model and are left out")
    return dataclasses.replace(profile, compute_scale={})
