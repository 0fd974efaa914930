"""The action script of `residency run`: "right*8,up*4,idle*2" -> one action name per latent frame.

Names come from the model's keyboard vocabulary; a bad token is named in the error with the valid ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from residency.errors import UsageError

MAX_REPEAT = 100_000  # a typo like right*99999999 must not allocate a giant list


def parse_actions(script: str, vocabulary: Sequence[str]) -> list[str]:
    actions: list[str] = []
    hint = f"write comma-separated actions with optional repeats, e.g. right*8,up*4,idle; actions: {', '.join(vocabulary)}"
    if not script.strip():
        raise UsageError("the action script is empty", hint=hint)
    for raw in script.split(","):
        token = raw.strip()
        name, star, count = token.partition("*")
        name = name.strip().lower()
        if name not in vocabulary:
            raise UsageError(f"unknown action {name!r} in {token!r}", hint=hint)
        repeat = 1
        if star:
            if not count.strip().isdigit() or not 1 <= int(count) <= MAX_REPEAT:
                raise UsageError(f"bad repeat count in {token!r}", hint=f"a whole number from 1 to {MAX_REPEAT}, e.g. {name}*8")
            repeat = int(count)
        actions.extend([name] * repeat)
    return actions
