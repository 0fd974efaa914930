"""Paths a user names: asked about without raising, read only when they are regular files.

`Path.exists()` raises on a 300-character name (ENAMETOOLONG) and `open()` of a FIFO blocks
forever; every path from the command line or a config goes through here instead.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from residency.errors import ResidencyError

MISSING, FILE, DIRECTORY, OTHER, BAD = "missing", "file", "directory", "other", "bad"


def path_kind(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(kind, reason): kind is missing, file, directory, other (FIFO, socket, device) or bad (unusable name).

    Never raises: an over-long name, a loop of links or a NUL byte is `bad` with the OS's reason.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return MISSING, None
    except (OSError, ValueError) as e:
        return BAD, _reason(e)
    if stat.S_ISREG(st.st_mode):
        return FILE, None
    if stat.S_ISDIR(st.st_mode):
        return DIRECTORY, None
    return OTHER, "not a regular file (a FIFO, socket or device)"


def not_a_directory(parent: str | os.PathLike[str]) -> tuple[str, bool]:
    """Why `parent`, which is no directory, cannot hold an output, and whether creating it would do: ("directory X
    does not exist", True), or what X (or a file further up) is ("a.gif is a file, not a directory", False: `-o
    a.gif/p.json` was told to create a.gif, which was there)."""
    kind, reason = path_kind(parent)
    if kind == MISSING:  # a file further up (a.gif/sub/o.gif) is the reason as well
        up = Path(parent).parent
        while up != up.parent and path_kind(up)[0] == MISSING:
            up = up.parent
        if path_kind(up)[0] == FILE:
            return f"{_show(up)} is a file, not a directory", False
        return f"directory {_show(parent)} does not exist", True
    if kind == FILE:
        return f"{_show(parent)} is a file, not a directory", False
    if kind == OTHER:
        return f"{_show(parent)} is {reason}, not a directory", False
    return f"directory {_show(parent)} cannot be used ({reason})", False


def exists(path: str | os.PathLike[str]) -> bool:
    """Path.exists() that answers False for names the OS refuses instead of raising."""
    return path_kind(path)[0] in (FILE, DIRECTORY, OTHER)


def require_file(path: str | os.PathLike[str], what: str, hint: str) -> Path:
    """`path` as a Path when it is a regular file; a ResidencyError naming it and why otherwise."""
    kind, reason = path_kind(path)
    if kind == FILE:
        return Path(path)
    why = {MISSING: "no such file", DIRECTORY: "a directory, not a file"}.get(kind, reason)
    raise ResidencyError(f"{_show(path)}: cannot read {what} ({why})", hint=hint)


def read_file_bytes(path: str | os.PathLike[str], what: str, hint: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; never blocks on a FIFO, never reads past the cap.

    Opened with O_NONBLOCK and checked with fstat on the open descriptor, so a path swapped for a FIFO
    between the check and the open is still refused rather than waited on.
    """
    require_file(path, what, hint)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ResidencyError(f"{_show(path)}: cannot read {what} ({_reason(e)})", hint=hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ResidencyError(f"{_show(path)}: cannot read {what} (not a regular file)", hint=hint)
        if st.st_size > max_bytes:
            raise ResidencyError(f"{_show(path)}: {what} is {st.st_size} bytes, more than the {max_bytes} "
                                 "this reader accepts", hint=hint)
        chunks, left = [], max_bytes + 1  # one byte over the cap tells a file that grew while read
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise ResidencyError(f"{_show(path)}: cannot read {what} ({_reason(e)})", hint=hint) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ResidencyError(f"{_show(path)}: {what} is larger than the {max_bytes} bytes this reader accepts",
                             hint=hint)
    return data


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        if e.errno == errno.ENAMETOOLONG:
            return "the name is too long for this file system"
        return e.strerror or str(e)
    return str(e)  # ValueError: embedded NUL byte


def _show(path: str | os.PathLike[str], limit: int = 120) -> str:
    """The path as errors show it: a 4,000-character name is cut in the middle, not printed whole."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else text.decode(errors="replace")
    return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-limit // 2:]}"
