"""The hook contract (accelerate/diffusers style): init_hook, pre_forward, post_forward, detach_hook, and
new_forward for a hook that must wrap the whole call. Attached from outside, removed without a trace on detach.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from residency.errors import ForwardReplacedError
from residency.runtime.not_pickled import NotPickled

_ATTR = "_residency_hook"  # the module attribute holding its hook and the forward it replaced


class ModelHook(NotPickled):
    """Override what you need; pre_forward/post_forward run around every call of the module."""

    # A hook whose calls mostly pass through defines `bypass() -> bool`: while it is true the plain wrapper runs the
    # module's forward alone (~0.3 µs a call instead of pre and post). Its pre_forward/post_forward must still tell a
    # bypassed call apart: torch's hook path (a module that had torch forward hooks) calls them on every call.
    bypass: Callable[[], bool] | None = None
    ran = False  # set by the wrapper on each call: what ForwardWatch's probe reads
    # Under torch.compile: True, the module's forward alone is traced into the compiled caller (a submodule of a
    # compiled block: a graph break there made the whole class fall back to eager); False, the hooked call runs
    # eagerly, whole (a graph break), as a block's does.
    traced_when_compiling = False

    def init_hook(self, module: nn.Module) -> None:
        """Called once when the hook is added to `module`; default: nothing."""
        pass

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Called before every call of `module` with its arguments; default: nothing."""
        pass

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        """Called after every call of `module` that returned, with its output; what it returns, unless None,
        replaces the output. Default: nothing."""
        return None

    def forward_failed(self, module: nn.Module) -> None:
        """Called when the module's forward raised after pre_forward (post_forward is not called then); the
        exception goes on. Default: nothing."""
        pass

    def detach_hook(self, module: nn.Module) -> None:
        """Called once after the hook was removed from `module`; default: nothing."""
        pass

    def new_forward(self, module: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The whole call, for a hook that must wrap it (a retry). A hook that keeps this default gets the
        plain pre/post wrapper; one that overrides it pays one method call more per call."""
        self.pre_forward(module, args, kwargs)
        output = forward(*args, **kwargs)
        replaced = self.post_forward(module, output)
        return output if replaced is None else replaced


def add_hook(module: nn.Module, hook: ModelHook) -> None:
    """Wrap the module's forward (an instance attribute, as accelerate does): torch's forward-hook path
    costs ~2 µs more a call than a plain wrapper (measured on a small Linear, this CPU); ×40 calls a frame.

    Torch hooks registered on the module run outside the wrapper (before our pre_forward, after our
    post_forward), and a direct `module.forward(...)` call goes through it too. A pre/post hook that must see
    what ours binds (prune's and the old weight_norm's pre-hooks compute the weight from the block's tensors)
    would then read another block's: a module that carries torch forward hooks when the hook is added takes
    ours through torch's hook path instead, our pre-hook first and our post-hook after theirs. Hooks
    registered on a block module after attaching run outside ours."""
    if hasattr(module, _ATTR):
        raise RuntimeError(f"{type(module).__name__} already carries a residency hook; detach the other runtime first")
    hook.init_hook(module)
    plain = type(hook).new_forward is ModelHook.new_forward
    if plain and (module._forward_pre_hooks or module._forward_hooks):
        post = _TorchPostHook(hook)
        handles = (module.register_forward_pre_hook(_TorchPreHook(hook), prepend=True, with_kwargs=True),
                   module.register_forward_hook(post), module.register_forward_hook(post.failed, always_call=True))
        setattr(module, _ATTR, (hook, None, None, handles))
        return
    had_own = "forward" in module.__dict__  # someone else's instance-level forward: restored as it was
    bound = module.forward  # its name and signature, which libraries inspect (diffusers, transformers)
    if had_own:
        inner = bound
    else:
        as_attached = type(module).forward  # what the class gives at attach (a staticmethod: its function)

        def inner(*args: Any, **kwargs: Any) -> Any:
            # the class's forward as it is at the call (one attribute lookup, ~0.1 µs): a class patched after
            # attach (an attention processor swapped at class level) runs here as it does unattached; bound
            # through its descriptor, as attribute lookup binds it (a staticmethod takes no module)
            cls = type(module)
            if cls.forward is as_attached:
                return bound(*args, **kwargs)
            raw = inspect.getattr_static(cls, "forward")
            return (raw.__get__(module, cls) if hasattr(type(raw), "__get__") else raw)(*args, **kwargs)

    if plain:
        def call(*args: Any, **kwargs: Any) -> Any:
            hook.ran = True  # for ForwardWatch's probe of a forward replaced after attach
            hook.pre_forward(module, args, kwargs)
            try:  # free on the path that returns (Python 3.11+)
                output = inner(*args, **kwargs)
            except BaseException:
                hook.forward_failed(module)
                raise
            replaced = hook.post_forward(module, output)
            return output if replaced is None else replaced
    else:
        def call(*args: Any, **kwargs: Any) -> Any:
            hook.ran = True
            return hook.new_forward(module, inner, args, kwargs)
    # torch.compile of an attached model would trace into the runtime (locks, telemetry, weight swaps) and
    # fail on its second call: under dynamo the hooked call runs eagerly, whole (a graph break around it).
    # is_compiling() is a constant to dynamo, and costs ~0.1 µs eager where a disabled wrapper costs ~0.4.
    eager = torch.compiler.disable(call)
    bypass = hook.bypass

    if bypass is None:
        @functools.wraps(bound)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                return eager(*args, **kwargs)
            return call(*args, **kwargs)
    else:
        traced = hook.traced_when_compiling

        @functools.wraps(bound)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():  # before bypass(): dynamo must not guard on the runtime's state
                return inner(*args, **kwargs) if traced else eager(*args, **kwargs)
            if bypass():
                hook.ran = True
                return inner(*args, **kwargs)
            return call(*args, **kwargs)

    module.forward = forward
    setattr(module, _ATTR, (hook, forward, bound if had_own else None, ()))


class _TorchPreHook(NotPickled):
    """Our pre_forward as a torch forward pre-hook (see add_hook): a class, so that pickling the model says why
    it is refused; opaque to torch.compile, as the forward wrapper is (dynamo must not trace the runtime)."""

    def __init__(self, hook: ModelHook):
        self.hook = hook
        self.eager = torch.compiler.disable(self.run)

    def run(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.hook.pre_forward(module, args, kwargs)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            return None if self.hook.traced_when_compiling else self.eager(module, args, kwargs)
        return self.run(module, args, kwargs)


class _TorchPostHook(NotPickled):
    """Our post_forward as a torch forward hook; what it returns (unless None) replaces the output."""

    def __init__(self, hook: ModelHook):
        self.hook = hook
        self.eager = torch.compiler.disable(self.run)
        self.returned = False  # set by run, read and cleared by failed (its always-called twin, run after it)

    def run(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self.returned = True
        return self.hook.post_forward(module, output)

    def failed(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Registered with always_call: torch calls it after every call, and when the forward raised (an
        Exception: torch runs no hook for a KeyboardInterrupt) without run having been called."""
        if self.hook.traced_when_compiling and torch.compiler.is_compiling():  # its pre ran not either
            return
        if not self.returned:
            self.hook.forward_failed(module)
        self.returned = False

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if torch.compiler.is_compiling():
            return None if self.hook.traced_when_compiling else self.eager(module, args, output)
        return self.run(module, args, output)


def runs_user_forward_hooks(module: nn.Module) -> bool:
    """Whether torch runs forward hooks of someone else's on `module` after our post_forward (hooks registered
    after attach on a module hooked through its forward wrapper). Cost: one dict test when it has none."""
    hooks = module._forward_hooks
    return bool(hooks) and any(not isinstance(getattr(h, "__self__", h), _TorchPostHook) for h in hooks.values())


def check_removable(module: nn.Module, label: Callable[[], str] | None = None) -> None:
    """Raise if another library wrapped forward after us and left its wrapper on: removing ours would silently
    drop theirs. A forward put back as it was before us, or deleted (the class's shows through), is fine: our
    wrapper is already gone and remove_hook only forgets it. `label()`: the module's path, asked for the message."""
    entry = module.__dict__.get(_ATTR)
    if entry is None or entry[1] is None:
        return
    current = module.__dict__.get("forward")
    if current is entry[1] or current is None or current is entry[2]:
        return
    raise ForwardReplacedError(
        f"{_named(module, label() if label else '')}.forward was wrapped again after residency attached; taking "
        "residency's hook off (a detach, a re-plan, a switch of plans) would drop that wrapper",
        hint="put back the forward that was in place right after attach (keep a reference to it before wrapping), "
             "or `del module.forward` to drop every instance wrapper, then try again")


def _named(module: nn.Module, label: str) -> str:
    return f"{label} ({type(module).__name__})" if label else type(module).__name__


def bypass_reads_slot(module: nn.Module) -> bool:
    """Whether a streamed or packed block's module, its forward run without the hook, would compute on tensors the
    hook binds: parameters or floating buffers of its own, or buffers of a submodule that owns no parameter. A
    submodule that owns one carries a reader hook of its own (runtime.weight_readers), which loads the block when it
    is called outside the block's call: such a block computes right, if slower."""
    def floating(sub: nn.Module) -> bool:
        return any(b is not None and b.is_floating_point() for b in sub._buffers.values())

    def params(sub: nn.Module) -> bool:
        return any(p is not None for p in sub._parameters.values())

    return params(module) or floating(module) or any(
        floating(sub) and not params(sub) for sub in module.modules() if sub is not module)


class ForwardWatch:
    """Modules whose forward must run our hook, checked before each outermost call of the model: a forward deleted
    after attach (the class's shows through) or replaced by one that never calls ours skips the hook, and a streamed
    block that reads tensors of its own then computes on whatever its slot holds (another block's weights; 1619 of
    3000 outputs wrong, no error). Nothing notifies an instance attribute's change, so it is looked at: one dict
    lookup and one identity test per watched module and call of the model.

    A deleted forward is refused at once. Any other forward is proven by running it: torch hooks on that module alone,
    for its next call, see whether ours ran inside it (a wrapper — functools.wraps, a closure, a default argument, a
    global, accelerate's — does; a patch calling the class's forward does not, and its output is refused rather than
    returned). A proven forward is remembered until it changes again."""

    def __init__(self, path_of: Callable[[nn.Module], str]):
        self._path_of = path_of  # a module's path in the model, for the message
        self._watched: list[tuple[nn.Module, dict, Callable[..., Any], ModelHook]] = []
        self._proven: dict[int, object] = {}  # id(module) -> a forward seen to run ours
        self._probes: dict[int, tuple[object, tuple]] = {}  # id(module) -> (the forward on probe, torch handles)

    def add(self, module: nn.Module) -> None:
        entry = module.__dict__.get(_ATTR)
        if entry is not None and entry[1] is not None:  # through torch's hooks: any forward still passes them
            self._watched.append((module, module.__dict__, entry[1], entry[0]))

    @property
    def watching(self) -> bool:
        return bool(self._watched)

    def clear(self) -> None:
        for _, handles in self._probes.values():
            for h in handles:
                h.remove()
        self._watched, self._proven, self._probes = [], {}, {}

    def check(self) -> None:
        """Refuse a watched module whose forward is gone; put a probe on one whose forward is not ours."""
        for module, attrs, ours, hook in self._watched:
            current = attrs.get("forward")
            if current is ours or (current is not None and self._proven.get(id(module)) is current):
                continue
            if current is None:
                self._refuse(module)
            probe = self._probes.get(id(module))
            if probe is None or probe[0] is not current:
                self._probe(module, current, hook)

    def _refuse(self, module: nn.Module) -> None:
        """The forward skips the hook: refused, before the call (deleted) or instead of its output (probed), which was
        computed on the block's slot contents (another block's weights)."""
        path = self._path_of(module)
        raise ForwardReplacedError(
            f"{path} ({type(module).__name__}): its forward was deleted or replaced after residency attached, by one "
            "that does not run residency's; the block computes without its weights in place (a streamed block reads "
            "whatever its slot holds: another block's), so this call is refused",
            hint=f"put residency's forward back (the {path}.forward in place right after attach), or have yours call "
                 "the forward it replaced; or detach first, change the forward, and attach again")

    def _probe(self, module: nn.Module, current: object, hook: ModelHook) -> None:
        key = id(module)
        if key in self._probes:
            for h in self._probes[key][1]:
                h.remove()

        def enter(mod: nn.Module, args: tuple) -> None:
            hook.ran = False

        def leave(mod: nn.Module, args: tuple, output: Any) -> None:
            for h in self._probes.pop(key, (None, ()))[1]:
                h.remove()
            if hook.ran:
                self._proven[key] = current
            else:
                self._refuse(mod)

        # prepend: before any hook of the user's that might call into the runtime; the post-hook after theirs
        self._probes[key] = (current, (module.register_forward_pre_hook(enter, prepend=True),
                                       module.register_forward_hook(leave)))


def remove_hook(module: nn.Module) -> None:
    """Take the hook off `module` and restore its forward; nothing when it has none.

    Raises ForwardReplacedError when another library wrapped forward after ours (see check_removable).
    """
    check_removable(module)
    entry = module.__dict__.pop(_ATTR, None)
    if entry is None:
        return
    hook, ours, own_forward, handles = entry
    for handle in handles:
        handle.remove()
    current = module.__dict__.get("forward")
    if ours is None or current is own_forward:  # through torch's hooks, or already as it was before us
        pass
    elif own_forward is None:
        del module.forward  # the class's forward shows through again
    else:  # ours, or deleted by the user: the forward that was there before us goes back
        module.forward = own_forward
    hook.detach_hook(module)


def has_hook(module: nn.Module) -> bool:
    """True when `module` carries a residency hook (this runtime's or another's)."""
    return hasattr(module, _ATTR)
