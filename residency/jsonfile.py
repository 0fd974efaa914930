"""Reading a JSON document a user names: one error naming the file and why, with the caller's hint.

Plans, device profiles and catalog entries all load through here; validation of fields is theirs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from residency.errors import ResidencyError


def read_json(path: str | os.PathLike[str], what: str, hint: str) -> Any:
    """The parsed document at `path`; `what` names it in errors ("the plan"), `hint` says what to give."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ResidencyError(f"{path}: cannot read {what} ({reason})", hint=hint) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ResidencyError(f"{path}: not valid JSON, so not {what} (line {e.lineno}, column {e.colno}: {e.msg})",
                             hint=hint) from None
