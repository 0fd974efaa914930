"""The user's own forward hooks stay silent while residency counts a forward.

Counting runs the model once (on meta tensors, or for real when that fails) before the user calls it. A hook the
user registered to collect features would record that call too: an extra entry, on the meta device, in the
user's list. Hooks that are torch's own (weight_norm, spectral_norm: they compute the weight the forward reads)
keep running; every other forward hook of the tree is set aside for the call and put back in its place after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

# nn.Module's forward-hook registries: hook id -> hook, and the per-id flag sets beside them
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
_FLAG_DICTS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _is_torch_own(hook: object) -> bool:
    owner = getattr(hook, "__module__", None) or getattr(type(hook), "__module__", "")
    return owner == "torch" or owner.startswith("torch.")


@contextlib.contextmanager
def user_hooks_quiet(model: nn.Module) -> Iterator[int]:
    """Within the block, every forward hook of `model`'s tree that is not torch's own is removed; it yields how
    many. On exit each registry holds what it held before, in the same order, with the same handles (hooks
    registered inside the block must be removed inside it). Cost: one walk over the modules."""
    saved: list[tuple[dict, dict]] = []
    quieted = 0
    for module in model.modules():
        for attr in _HOOK_DICTS + _FLAG_DICTS:
            registry = getattr(module, attr, None)
            if registry:
                saved.append((registry, dict(registry)))
        for attr in _HOOK_DICTS:
            registry = getattr(module, attr, None) or {}
            for key in [k for k, h in registry.items() if not _is_torch_own(h)]:
                del registry[key]
                quieted += 1
                for flags in _FLAG_DICTS:
                    getattr(module, flags, {}).pop(key, None)
    try:
        yield quieted
    finally:
        for registry, items in saved:
            registry.clear()
            registry.update(items)
