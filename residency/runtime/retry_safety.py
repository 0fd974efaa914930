"""Whether a call of the model that ran out of device memory may simply be run again.

A retry runs the whole forward a second time. Exact only when the failed attempt left nothing the second would see:
a generate() loop's cache object was already extended by the layers before the failure (the retry appended their
keys twice: 16 cached positions in some layers, 15 in others, logits off from that step on), a step counter buffer
was bumped, an input was scaled in place. What this can see is taken before each attempt: the version counter of
every tensor among the call's arguments and of every buffer of the model, and whether an argument is an object it
cannot look into (a cache, any class instance: its state may change by attribute assignment, which no counter
records). A torch.Generator argument is rewound to its state at the call's start before the retry, which then
draws the same noise. Not seen: Python attributes the forward sets on the model itself (`self.calls += 1`), and in-place
writes to tensors made under torch.inference_mode, which keep no version counter.

Cost: one walk of the arguments and a counter read per tensor and buffer per top-level call (~1 µs per 10).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from residency.runtime.executor import version_of
from residency.validate import a_type

# Argument values a forward cannot change in place: the retry sees them as the first attempt did.
PLAIN_VALUES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
                torch.layout, torch.memory_format, slice, types.EllipsisType)
MAX_DEPTH = 6  # nesting of tuples, lists and dicts walked into; deeper is taken as an object not seen into


@dataclass
class CallState:
    """What one attempt of a call could change, as it was before the attempt."""

    tensors: list[tuple[str, torch.Tensor, int]]  # (where, tensor, its version counter)
    buffers: list[tuple[str, nn.Module, str, torch.Tensor, int]]  # (name, owner, key, buffer, version)
    opaque: str | None  # the first argument the runtime cannot look into, named
    # (generator, its state) of each torch.Generator among the arguments: a retry rewinds them (same noise)
    generators: list[tuple[torch.Generator, torch.Tensor]] = field(default_factory=list)

    def rewind(self) -> None:
        """The argument generators back where the call began, for the retry to draw what the attempt drew."""
        for g, state in self.generators:
            g.set_state(state)

    def changed(self) -> str | None:
        """Why running the call again would not be the same call (None: it would be)."""
        if self.opaque is not None:
            return self.opaque
        for where, t, version in self.tensors:
            if version >= 0 and version_of(t) != version:
                return f"{where} was changed in place"
        for name, owner, key, buf, version in self.buffers:
            if owner._buffers.get(key) is not buf:
                return f"the model's buffer {name} was replaced"
            if version >= 0 and version_of(buf) != version:
                return f"the model's buffer {name} was changed in place"
        return None


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The forward's positional parameter names, so that `model(x)` and `model(input_ids=x)` compare equal."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a C-implemented or oddly wrapped forward: positions stay arg0, arg1, …
        return ()
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    return tuple(names)


def model_buffers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, owner, key) of every buffer of `model`: listed once at attach (named_buffers walks every module,
    ~1 ms on a large pipeline, too slow per call)."""
    out = []
    for prefix, module in model.named_modules(remove_duplicate=True):
        for key, buf in module._buffers.items():
            if buf is not None:
                out.append((f"{prefix}.{key}" if prefix else key, module, key))
    return out


def capture(names: tuple[str, ...], args: tuple, kwargs: dict,
            buffers: Iterable[tuple[str, nn.Module, str]]) -> CallState:
    """The state of a call before an attempt: its arguments (positional ones named by `names`, the forward's
    parameter names) and the model's buffers."""
    tensors: list[tuple[str, torch.Tensor, int]] = []
    generators: list[tuple[torch.Generator, torch.Tensor]] = []
    opaque = None
    for i, value in enumerate(args):
        where = f"argument {names[i]!r}" if i < len(names) else f"positional argument {i}"
        opaque = opaque or _walk(value, where, tensors, generators, 0)
    for key, value in kwargs.items():
        opaque = opaque or _walk(value, f"argument {key!r}", tensors, generators, 0)
    bufs = []
    for name, owner, key in buffers:
        buf = owner._buffers.get(key)
        if buf is not None:
            bufs.append((name, owner, key, buf, version_of(buf)))
    return CallState(tensors, bufs, opaque, generators)


def _walk(value, where: str, tensors: list, generators: list, depth: int) -> str | None:
    """Collect the tensors under `value` with their counters, and its generators with their states; return why it
    is not seen into (or None)."""
    if isinstance(value, torch.Tensor):
        tensors.append((where, value, version_of(value)))
        return None
    if isinstance(value, PLAIN_VALUES):
        return None
    if isinstance(value, torch.Generator):  # its state is taken, and put back before a retry
        generators.append((value, value.get_state()))
        return None
    if isinstance(value, (tuple, list, dict)) and depth < MAX_DEPTH:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            why = _walk(item, f"{where}[{key!r}]", tensors, generators, depth + 1)
            if why is not None:
                return why
        return None
    return f"{where} is {a_type(value)}, an object the call may have updated (a cache, a state)"
