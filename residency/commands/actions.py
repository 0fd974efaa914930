"""The action script of `residency run`: "right*8,up*4,idle*2" -> one action name per latent frame.

Names come from the model's keyboard vocabulary; a bad token is named in the error with the valid ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from residency.errors import UsageError

MAX_REPEAT = 100_000  # a typo like right*99999999 must not allocate a giant list
MAX_SCRIPT_ACTIONS = 100_000  # the whole script expanded: many repeats add up as one big repeat would
# ASCII digits only: str.isdigit() accepts '²' (which int() refuses) and '٣' (which int() reads as 3).
_COUNT_RE = re.compile(r"[0-9]{1,7}")


def _shown(token: str) -> str:
    return repr(token if len(token) <= 40 else token[:40] + "…")


def _valid(token: str, vocabulary: Sequence[str]) -> bool:
    """Is `token` one action with an optional repeat ("up", "up*4")?"""
    name, star, count = token.partition("*")
    return name.strip().lower() in vocabulary and (not star or bool(_COUNT_RE.fullmatch(count.strip())))


def parse_actions(script: str, vocabulary: Sequence[str]) -> list[str]:
    """Expand a script like "right*8,up*4,idle" into one action per latent frame.

    Names are matched case-insensitively against `vocabulary`. Raises UsageError for an empty script,
    an unknown action, a bad repeat count, or more than MAX_SCRIPT_ACTIONS actions in all.
    """
    hint = (f"write comma-separated actions with optional repeats, e.g. right*8,up*4,idle; "
            f"actions: {', '.join(vocabulary)}")
    if not script.strip():
        raise UsageError("the action script is empty", hint=hint)
    actions: list[str] = []
    for position, raw in enumerate(script.split(","), start=1):
        token = raw.strip()
        name, star, count = token.partition("*")
        name = name.strip().lower()
        sep = next((c for c in ";|/ \t" if c in token), None)
        parts = [t for t in re.split(r"[;|/\s]+", token) if t]
        if sep is not None and len(parts) > 1 and all(_valid(t, vocabulary) for t in parts):
            # "up*4;idle" read as one action: "bad repeat count in 'up*4;idle'" named neither the ';' nor the fix
            fixed = ",".join(t for t in re.split(r"[,;|/\s]+", script) if t)
            raise UsageError(f"{_shown(token)} holds {sep!r}: actions are separated by commas", hint=f"e.g. {fixed}")
        if not name:
            raise UsageError(f"action {position} of the script {_shown(script)} is empty (two commas in a row, or "
                             "one at an end)", hint=hint)
        if name not in vocabulary:
            raise UsageError(f"unknown action {_shown(name)} in {_shown(token)}", hint=hint)
        repeat = 1
        if star:
            count = count.strip()
            if not _COUNT_RE.fullmatch(count) or not 1 <= int(count) <= MAX_REPEAT:
                raise UsageError(f"bad repeat count in {_shown(token)}",
                                 hint=f"a whole number from 1 to {MAX_REPEAT}, e.g. {name}*8")
            repeat = int(count)
        if len(actions) + repeat > MAX_SCRIPT_ACTIONS:
            raise UsageError(f"the action script expands to more than {MAX_SCRIPT_ACTIONS} actions",
                             hint="a short script repeats: give --frames for a longer rollout")
        actions.extend([name] * repeat)
    return actions
