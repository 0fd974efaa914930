"""The hook contract (accelerate/diffusers style): init_hook, pre_forward, post_forward, detach_hook.

Hooks are attached from outside on block modules and removed without a trace on detach.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_ATTR = "_residency_hook"  # the module attribute holding its hook and torch's handles


class ModelHook:
    """Override what you need; pre_forward/post_forward run around every call of the module."""

    def init_hook(self, module: nn.Module) -> None:
        pass

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pass

    def post_forward(self, module: nn.Module, output: Any) -> None:
        pass

    def detach_hook(self, module: nn.Module) -> None:
        pass


def add_hook(module: nn.Module, hook: ModelHook) -> None:
    if hasattr(module, _ATTR):
        raise RuntimeError(f"{type(module).__name__} already carries a residency hook; detach the other runtime first")
    hook.init_hook(module)
    # The lambdas return None: torch then keeps the call's args and output as they are (no tuple built).
    pre = module.register_forward_pre_hook(lambda m, args, kwargs: hook.pre_forward(m, args, kwargs),
                                           with_kwargs=True)
    post = module.register_forward_hook(lambda m, args, output: hook.post_forward(m, output))
    setattr(module, _ATTR, (hook, pre, post))


def remove_hook(module: nn.Module) -> None:
    entry = module.__dict__.pop(_ATTR, None)
    if entry is None:
        return
    hook, pre, post = entry
    pre.remove()
    post.remove()
    hook.detach_hook(module)


def has_hook(module: nn.Module) -> bool:
    return hasattr(module, _ATTR)
