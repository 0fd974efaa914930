"""Several outputs of one command written all or none: each to a pending file beside its place, renamed into place
only once every one is written.

`run -o a.gif --trace t.json` wrote the GIF, then failed writing the trace (a full disk): exit 1, and a.gif was the
new GIF, the one there before lost. A foundation module, as residency.atomic_file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from residency.atomic_file import check_can_create, through_link
from residency.errors import ResidencyError


def _pending(final: Path) -> Path:
    """A name beside `final` that no one uses, ending in its suffix (the writers choose a format by it)."""
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}.pending{final.suffix}")


@contextlib.contextmanager
def written_together(*finals: Path | None) -> Iterator[list[Path | None]]:
    """Yield a pending path for each final path (None for None); on a clean exit each pending file written is renamed
    onto its final path (a link: where it points), with the mode of the file it replaces. On any exception every
    pending file is removed and the finals are left as they were; a ResidencyError naming a pending path is raised
    naming its final path. Each final is checked first as atomic_file.check_can_create checks (a read-only file,
    a directory that takes no files). Cost: one rename per output."""
    targets = [None if f is None else through_link(Path(f)) for f in finals]
    for target in targets:
        if target is not None:
            check_can_create(target)
    pending = [None if t is None else _pending(t) for t in targets]
    pairs = [(tmp, target) for tmp, target in zip(pending, targets, strict=True) if target is not None]
    try:
        yield pending
        _commit([(tmp, target) for tmp, target in pairs if tmp.exists()])
    except BaseException as e:
        for tmp, _ in pairs:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, ResidencyError):
            message = e.message
            for tmp, target in pairs:
                message = message.replace(str(tmp), str(target))
            if message != e.message:
                e.message = message
                e.args = (message, *e.args[1:])
        if isinstance(e, OSError):  # a rename that failed: said as the writers say theirs, of the output's name
            named = next((str(t) for tmp, t in pairs if e.filename in (str(tmp), str(t))), e.filename or "")
            raise ResidencyError(f"{named}: writing failed ({e.strerror or e})",
                                 hint="check free disk space and permissions") from None
        raise


def _commit(moves: list[tuple[Path, Path]]) -> None:
    """Rename each pending file onto its target, all or none: the files there before are moved aside first and put
    back if a rename fails (the first output replaced, the second not, was one run's GIF beside another's trace)."""
    aside: list[tuple[Path, Path | None]] = []  # (target, where its old file waits; None: there was none)
    try:
        for tmp, target in moves:
            with contextlib.suppress(OSError):  # the replaced file's mode (a plain 0644 is the writer's already)
                os.chmod(tmp, target.stat().st_mode & 0o7777)
            old = None
            if target.exists():
                old = _pending(target).with_suffix(target.suffix + ".old")
                os.replace(target, old)
            aside.append((target, old))
            os.replace(tmp, target)
    except BaseException:
        for target, old in reversed(aside):
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, target)
                else:
                    target.unlink()
        raise
    for _, old in aside:
        if old is not None:
            with contextlib.suppress(OSError):
                old.unlink()
