"""Atomic file replacement: write a temp file beside the target, fsync, then os.replace.

Readers see the old file or the complete new one, never a half-written one (checkpoints, plans, profiles,
traces, GIFs). A foundation module: every layer that saves a file may use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from residency.errors import ResidencyError


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_problem(path: Path, e: OSError) -> str:
    """Why no file could be created beside `path`, from the OSError creating one raised: the directory missing, not a
    directory, a file system that takes no new files (/proc answers ENOENT), or the OS's own reason."""
    parent = path.parent
    try:
        exists, is_dir = parent.exists(), parent.is_dir()
    except (OSError, ValueError):  # a name too long for the file system, a NUL
        exists = is_dir = False
    if not exists:
        return f"its directory {os.fspath(parent)} does not exist"
    if not is_dir:
        return f"{os.fspath(parent)} is not a directory"
    if e.errno == errno.ENOENT:
        return f"{os.fspath(parent)} takes no new files (a virtual file system such as /proc or /sys)"
    return f"cannot create a file in {os.fspath(parent)} ({e.strerror})"


def _refuse_read_only(path: Path, error: type[ResidencyError]) -> None:
    """A target the user made read-only (no write bit for anyone) is not replaced: a rename ignores the target's
    mode, so `-o` silently overwrote a file `chmod a-w` was to protect (as root, os.access says yes to anything)."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):  # none there (or a name the file system refuses: said where it is created)
        return
    if path.is_file() and not mode & 0o222:
        raise error(f"{os.fspath(path)}: the file is read-only (mode {mode & 0o777:o}), so it is not replaced",
                    hint=f"make it writable (chmod u+w {os.fspath(path)}) or pick another path")


def through_link(path: Path) -> Path:
    """The file a symbolic link names (followed to the end), else `path`: `-o link` writes where the link points,
    as a shell's `>` does; replacing the link itself by a file cut it from its target (a plan shared by linking
    it into several directories stopped being shared, silently)."""
    try:
        return Path(os.path.realpath(path)) if os.path.islink(path) else path
    except (OSError, ValueError):  # a name the file system refuses: said where the file is created
        return path


def check_can_create(path: Path, error: type[ResidencyError] = ResidencyError) -> None:
    """Raise `error` unless a file can be created beside `path` — the temp file atomic_output will need — checked
    by creating one and removing it: a read-only filesystem, a permission, an immutable directory all fail here,
    before the work whose result would be written (os.access misses some of them, and says yes to root). A
    read-only file at `path` is refused too."""
    path = through_link(Path(path))
    _refuse_read_only(path, error)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=path.parent)
    except OSError as e:
        raise error(f"{os.fspath(path)}: {create_problem(path, e)}",
                    hint="check the directory exists and is writable, or pick another path") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp_name)


@contextlib.contextmanager
def atomic_output(path: Path, error: type[ResidencyError] = ResidencyError) -> Iterator[Path]:
    """Yield a temp path in `path`'s directory; on a clean exit it becomes `path`.

    On any exception (including KeyboardInterrupt) the temp file is removed and an
    existing `path` is left untouched. Cost: two fsyncs (file, then directory).
    Raises `error` (a ResidencyError class; its message starts with the path) when the temp file
    cannot be created or writing, syncing or renaming fails with an OSError.
    """

    def broken(path: Path, problem: str, hint: str) -> ResidencyError:
        return error(f"{os.fspath(path)}: {problem}", hint)

    path = through_link(Path(path))
    _refuse_read_only(path, error)
    if path.is_dir():  # the rename would fail only after the whole file was written
        raise broken(path, "is a directory", hint="give a file name, or remove that directory")

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise broken(path, create_problem(path, e), hint="check the directory exists and is writable") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file 0600; give the new file the old one's mode, or a plain 0644.
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise broken(
                path, f"writing failed ({e.strerror or e})", hint="check free disk space and permissions"
            ) from e
        raise
    with contextlib.suppress(OSError):  # durability of the rename; not all filesystems allow it
        _fsync_path(path.parent, directory=True)
