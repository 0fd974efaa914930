"""Reading a JSON document a user names: one error naming the file and why, with the caller's hint.

Plans, device profiles, catalog entries and traces all load through here; validation of fields is
theirs (residency.validate). What comes back is plain JSON with finite numbers. Nesting too deep for
the parser is a clean error; shallower nesting is harmless, as the validators never recurse into a value.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any

from residency.errors import ResidencyError
from residency.userpath import read_file_bytes

MAX_DOCUMENT_BYTES = 16 << 20  # plans, profiles and catalog entries are kilobytes; the largest catalog ~150 kB
_INT_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)()  # Python's limit on int(str)


def read_json(path: str | os.PathLike[str], what: str, hint: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """The parsed document at `path`; `what` names it in errors ("the plan"), `hint` says what to give.

    Only a regular file of at most `max_bytes` is read (a FIFO is refused, not waited on).
    """
    if not isinstance(path, (str, bytes, os.PathLike)):  # os.fspath's TypeError named no argument
        raise ResidencyError(f"{what}: expected a path, got {type(path).__name__} {path!r:.60}", hint=hint)
    name = _shown(path)
    data = read_file_bytes(path, what, hint, max_bytes)
    if data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, as Windows editors save UTF-8: not part of the JSON
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ResidencyError(f"{name}: cannot read {what} (not UTF-8 text: byte {e.start})", hint=hint) from None
    try:
        doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise ResidencyError(f"{name}: not valid JSON, so not {what} (line {e.lineno}, column {e.colno}: {e.msg})",
                             hint=hint) from None
    except _Duplicate as e:  # before ValueError: it is one
        lines = _key_lines(text, e.args[0])
        distinct = sorted(set(lines))  # a one-line document has every occurrence on line 1: "lines 1, 1" said nothing
        where = (f" (the key appears on lines {', '.join(map(str, distinct))}, in this object and any other)"
                 if 1 < len(distinct) <= 12 else "")
        raise ResidencyError(f"{name}: {what} gives {_show_key(e.args[0])} twice in one object, with two values (JSON "
                             f"readers keep either; residency would have used the last silently){where}",
                             hint=f"keep one of the two; {hint}") from None
    except _NonFinite as e:
        line = _token_line(text, e.args[0])
        where = f" at line {line}" if line else ""
        raise ResidencyError(f"{name}: {what} holds {e.args[0][:40]}{where}, which is not a finite number",
                             hint=f"numbers must be finite: fix that value; {hint}") from None
    except RecursionError:
        raise ResidencyError(f"{name}: {what} is nested too deeply to be read", hint=hint) from None
    except ValueError:  # an integer literal past Python's int parsing limit (4,300 digits by default)
        raise ResidencyError(f"{name}: {what} holds an integer of more than {_INT_DIGITS} "
                             "digits", hint=hint) from None
    return doc


def _key_lines(text: str, key: str, most: int = 13) -> list[int]:
    """1-based lines where `key` is written as an object key (its JSON spelling, then a colon), the first `most`
    (lines counted on from the last match: one pass over the text, even for a 256 MiB trace)."""
    spelled = re.escape(json.dumps(key, ensure_ascii=False))
    lines, line, at = [], 1, 0
    for m in re.finditer(spelled + r"\s*:", text):
        line += text.count("\n", at, m.start())
        at = m.start()
        lines.append(line)
        if len(lines) >= most:
            break
    return lines


def _token_line(text: str, token: str) -> int | None:
    """1-based line of the first bare `token` (NaN, Infinity, 1e999): outside every string (strings are skipped
    whole, escapes included), or None."""
    bare = re.compile(r'"(?:[^"\\]|\\.)*"|(?<![\w.+-])' + re.escape(token) + r"(?![\w.])")
    for m in bare.finditer(text):
        if not m.group().startswith('"'):
            return text.count("\n", 0, m.start()) + 1
    return None


def _shown(path: str | os.PathLike[str], limit: int = 120) -> str:
    """The path as errors show it: a 4,000-character name is cut in the middle, not printed whole."""
    text = os.fspath(path)
    text = text if isinstance(text, str) else text.decode(errors="replace")
    return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-limit // 2:]}"


class _NonFinite(ValueError):
    pass


class _Duplicate(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's dict, refusing a key given twice with two values (`"steps": 4, "steps": 64`). Costs ~1 µs an
    object."""
    doc = dict(pairs)
    if len(doc) != len(pairs):  # the same value twice is harmless (a config.json some tool wrote so): kept
        for key, value in pairs:
            if doc[key] != value:
                raise _Duplicate(key)
    return doc


def _show_key(key: str) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in key[:60])
    return f"key {shown!r}" + ("…" if len(key) > 60 else "")


def _refuse_constant(literal: str) -> Any:
    raise _NonFinite(literal)


def _finite_float(literal: str) -> float:
    """A float literal's value; one past 1.8e308 (it would read as infinity) is refused. Costs ~2% of a parse."""
    value = float(literal)
    if math.isinf(value):
        raise _NonFinite(literal)
    return value
