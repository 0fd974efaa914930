"""A diffusers pipeline's own offload and fusing methods, refused while residency is attached to it
(residency.attach_pipeline)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from residency.errors import ResidencyError

if TYPE_CHECKING:
    from residency.runtime import Runtime

# The pipeline's own offloading, which puts accelerate's hooks on every component's modules: on top of an attach
# they move weights the runtime holds (to "meta", back at each call), fail in the call, and wrap the forwards residency
# must take off at detach, so the pipeline could be neither run nor detached. Refused while attached.
OFFLOAD_METHODS = ("enable_sequential_cpu_offload", "enable_model_cpu_offload", "enable_group_offload")
# Methods that build new weights from the components' own: between calls a streamed block's point into a shared slot,
# so the fused to_qkv held other blocks' values (the next call was refused, but the pipeline stayed fused and wrong
# after detach, 0.20 off, until unfuse_qkv_projections()). Refused before they build anything.
FUSING_METHODS = ("fuse_qkv_projections",)


class OffloadGuards:
    """Instance attributes over the pipeline's offload methods (found before its class's) that refuse them while
    `runtime` is attached; remove() puts the class's back. One left behind (the runtime detached some other way)
    lifts itself at its next call and runs the pipeline's own method."""

    def __init__(self, pipe: Any, runtime: Runtime):
        self.pipe, self.runtime = pipe, runtime
        # a guard left by an attach that let go some other way (a recovery that gave up) is replaced: kept, it lifted
        # itself at the next offload call, its own runtime gone, and let the offload through onto this attach
        self.installed = {n: functools.partial(self._refuse, n) for n in (*OFFLOAD_METHODS, *FUSING_METHODS)
                          if callable(getattr(type(pipe), n, None)) and (n not in vars(pipe) or _is_guard(vars(pipe)[n]))}
        for name, guard in self.installed.items():
            object.__setattr__(pipe, name, guard)

    def _refuse(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.runtime.pipeline is None:
            self.remove()
            return getattr(self.pipe, name)(*args, **kwargs)
        if name in FUSING_METHODS:
            raise ResidencyError(
                f"{type(self.pipe).__name__}.{name}() while residency is attached: it builds new weights from the "
                "components' own, which between calls point into memory the runtime reuses (other blocks' weights)",
                hint=f"fuse before attaching: rt.detach() (leave the `with` block), pipe.{name}(), then attach again")
        raise ResidencyError(
            f"{type(self.pipe).__name__}.{name}() while residency is attached: the runtime already places the "
            "components' weights (resident, packed or streamed under its budget), and the offload hooks on top "
            "would move weights it holds",
            hint=f"rt.detach() (leave the `with` block) before pipe.{name}(), or keep residency and drop the call")

    def remove(self) -> None:
        for name, guard in self.installed.items():
            if vars(self.pipe).get(name) is guard:
                object.__delattr__(self.pipe, name)
        self.installed = {}


def _is_guard(value: Any) -> bool:
    return isinstance(value, functools.partial) and isinstance(getattr(value.func, "__self__", None), OffloadGuards)
