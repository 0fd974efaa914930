"""Execution modes of block modules (BlockPlan.exec_mode): `eager` runs a module's forward as written,
`compiled` runs it through torch.compile(fullgraph=True), `graphed` (a CUDA/HIP graph per block class and
slot) is residency.runtime.graphed's; check_exec_modes refuses it on a backend that captures no graphs.

A compiled forward sits beneath the runtime's block hook: the executor binds the block's weights (`t.data =
view`, outside the compiled code) and the compiled code then reads the parameters as graph inputs. Dynamo
guards on a parameter's metadata (shape, stride, dtype, device), not on its storage, so a weight rebound to
another slot of the same layout runs the same compiled code without a recompile (tests/test_compile_blocks.py
counts them).

One compiled callable per block class: every module of a class shares it, and torch.compile keeps its
compiled code on the class's forward function, so the blocks of a class compile once for every layer.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from residency.errors import ForwardReplacedError, ResidencyError
from residency.plan import Plan

# Inductor's CPU codegen warns, once per compile of a block mixing fp16 and bf16 tensors (a GPU plan's fp16 blocks over
# bf16 norms, run here), in its own words and with its file and line: a note for its developers, not our users.
warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node", category=UserWarning)
COMPILE_BACKEND_ENV = "RESIDENCY_COMPILE_BACKEND"  # torch.compile backend of `compiled` blocks
DEFAULT_COMPILE_BACKEND = "inductor"


def compile_backend() -> str:
    """The torch.compile backend named by $RESIDENCY_COMPILE_BACKEND, "inductor" when unset or empty."""
    return os.environ.get(COMPILE_BACKEND_ENV, "").strip() or DEFAULT_COMPILE_BACKEND


def check_exec_modes(plan: Plan, device: torch.device, enclosing: Iterable[str] = (),
                     captures_graphs: bool = False) -> None:
    """Refuse a plan whose execution modes this runtime cannot run on `device`.

    `enclosing`: blocks that are not hooked (they enclose the others). `captures_graphs`: the backend captures
    graphs (CUDA/ROCm; on the CPU only a test double injected by tests). Raises ResidencyError for a `graphed`
    block on a backend that captures none (on the CPU there is no graph to capture) and for an enclosing block
    that is not eager (compiling or capturing it would take the other blocks' hooks with it).
    """
    for bp in plan.blocks:
        if bp.exec_mode == "graphed" and not captures_graphs:
            if device.type == "cpu":
                raise ResidencyError(f"block {bp.name}: exec_mode graphed needs a CUDA/ROCm backend "
                                     "(it captures a CUDA/HIP graph; the CPU backend has none)",
                                     hint="use 'compiled' or 'eager' on the CPU backend")
            raise ResidencyError(f"block {bp.name}: exec_mode graphed needs a backend that captures graphs; "
                                 f"this {device.type} backend captures none", hint="use 'compiled' or 'eager'")
    for name in enclosing:
        if plan.by_name[name].exec_mode != "eager":
            raise ResidencyError(f"block {name} encloses other blocks; exec_mode "
                                 f"{plan.by_name[name].exec_mode!r} would compile their hooks with it",
                                 hint="plan the enclosing block eager")


class _ClassForward:
    """The forward every module of one class runs: compiled, or the class's own after a compile failure."""

    def __init__(self, cls: type, backend: str, notes: list[str]):
        self.cls, self.backend, self.notes = cls, backend, notes
        self.eager: Callable[..., Any] = cls.forward
        self.fn: Callable[..., Any] = self.eager
        self.failed = False
        try:
            self.fn = torch.compile(cls.forward, backend=backend, fullgraph=True)
        except torch._dynamo.exc.TorchDynamoException as e:  # an unknown backend name
            self._fall_back(e)

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """module.forward(*args, **kwargs) through the compiled code. A compile failure (tracing, backend)
        is raised before the compiled code runs, so the call is repeated eagerly, with a note, and the class
        runs eagerly from then on. Errors of the computation itself (out of memory) propagate."""
        if self.failed:
            return self.eager(module, *args, **kwargs)
        try:
            return self.fn(module, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:
            self._fall_back(e)
            return self.eager(module, *args, **kwargs)

    def _fall_back(self, error: Exception) -> None:
        self.failed = True
        text = str(error).strip()
        first = text.splitlines()[0][:300] if text else ""
        self.notes.append(f"compile of {self.cls.__name__}.forward (backend {self.backend!r}) failed, "
                          f"running it eagerly: {type(error).__name__}: {first}")


class CompiledForwards:
    """The compiled forwards of one attach: `install` before the block hooks go on, `restore` after they
    came off (the hooks wrap whatever forward the module has, and put it back on removal)."""

    def __init__(self, backend: str, notes: list[str]):
        self.backend, self.notes = backend, notes
        self._by_class: dict[type, _ClassForward] = {}
        self._installed: list[tuple[nn.Module, Callable[..., Any]]] = []  # (module, the forward installed)

    def install(self, name: str, module: nn.Module) -> None:
        """Make `module.forward` (of block `name`) the compiled forward of its class, an instance attribute as
        hooks are. A module with a forward of its own (another library's wrapper) is left eager, with a note:
        compiling the class's forward would skip that wrapper."""
        if "forward" in module.__dict__:
            self.notes.append(f"block {name}: {type(module).__name__} has a forward of its own (a wrapper); "
                              "left eager")
            return
        cls = type(module)
        if cls not in self._by_class:
            self._by_class[cls] = _ClassForward(cls, self.backend, self.notes)
        ours = functools.partial(self._by_class[cls], module)
        module.forward = ours
        self._installed.append((module, ours))

    def restore(self) -> None:
        """Put every module's forward back as install found it: the class's.

        Raises ForwardReplacedError when a module's forward is another wrapper put on after ours."""
        remove_forwards(self._installed, "compiled")
        self._installed = []


def remove_forwards(installed: list[tuple[nn.Module, Callable[..., Any]]], verb: str) -> None:
    """Delete the instance forwards residency installed, so each class's own shows through again; all or
    nothing. Raises ForwardReplacedError, before removing any, when a module's forward is another wrapper that
    went on after residency `verb` it and was not taken off (one deleted already is fine: the class's shows)."""
    for module, ours in installed:
        current = module.__dict__.get("forward")
        if current is not ours and current is not None:
            raise ForwardReplacedError(
                f"{type(module).__name__}.forward was replaced after residency {verb} it; detaching now would drop "
                "that wrapper",
                hint="put back the forward that was in place right after attach, or `del module.forward` to drop "
                     "every instance wrapper, then detach again")
    for module, ours in installed:
        if module.__dict__.get("forward") is ours:
            del module.forward


def compile_blocks(plan: Plan, modules: dict[str, tuple[nn.Module, ...]], notes: list[str]) -> CompiledForwards:
    """Install compiled forwards on the modules of every `compiled` block of `plan` (backend from
    $RESIDENCY_COMPILE_BACKEND). Returns the CompiledForwards to restore at detach. Cost: nothing until a
    block first runs; then one compile per block class and per shape of its inputs (seconds with inductor)."""
    compiled = CompiledForwards(compile_backend(), notes)
    for name, mods in modules.items():
        if plan.by_name[name].exec_mode == "compiled":
            for module in mods:
                compiled.install(name, module)
    return compiled
