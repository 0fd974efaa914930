"""What an attached model is guarded by beyond its blocks' hooks: state-dict hooks that show the original
weights (and refuse loads) while attached, a refusal of dtype and device conversions, and the rule and warning
that keep autograd off plans that swap weights in (inference only).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from residency.errors import InferenceOnlyWarning, ResidencyError, user_stacklevel
from residency.plan import Plan
from residency.runtime.not_pickled import NotPickled


def swaps_weights(plan: Plan) -> bool:
    """Whether a block of `plan` computes with weights the runtime swaps in (streamed, packed and unpacked into
    scratch, or resident for one phase in memory the next phase reuses): then autograd must not see them."""
    return any(bp.placement != "resident" or bp.lifetime != "session" for bp in plan.blocks)


def refuse_inference_parameters(model: nn.Module) -> None:
    """Raise ResidencyError for a parameter made under torch.inference_mode (a model built or loaded inside one).
    Attaching rebinds each parameter's .data to the runtime's memory, and torch then fails every call that reads
    such a parameter ("Inference tensors do not track version counter", inside the model's forward). Buffers
    made so are kept as they are and need no check. Cost: one pass over the parameters."""
    name = next((n for n, p in model.named_parameters() if p.is_inference()), None)
    if name is not None:
        raise ResidencyError(f"{type(model).__name__}.{name} (and maybe more) was made under torch.inference_mode(): "
                             "its weights cannot be rebound to the runtime's memory (torch refuses every later call)",
                             hint="build or load the model outside inference_mode (attach runs it without autograd "
                                  "anyway), or re-create its parameters outside it: for each module m and name n, "
                                  "setattr(m, n, nn.Parameter(p.clone(), requires_grad=False))")


def state_dict_hooks(model: nn.Module, originals: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], ...]],
                     outside: Iterable[nn.Module] = ()) -> list:
    """Hooks on the modules of `model` that own a block tensor, and on the `outside` modules that hold one (a head
    tied to an attached body's embedding: `attach(llm.model)`, then `llm.state_dict()`). state_dict() (of the
    model or any submodule) gives the original data, not what .data points at while attached — a streamed block's
    shared slot holds another block's bytes between its calls, a packed one dequantized values — so a checkpoint
    saved while attached is the model's own (keep_vars=True: new Parameters over the original data, not the live
    ones). load_state_dict() is refused: it would write into slots, and detach restores the originals. Returns the
    hooks' handles."""
    by_id = {id(t): data for pairs in originals.values() for t, data in pairs}
    handles = []
    for module in {id(m): m for m in (*model.modules(), *outside)}.values():
        own = {n: by_id[id(t)] for n, t in (*module._parameters.items(), *module._buffers.items())
               if t is not None and id(t) in by_id}
        if own:
            handles.append(module._register_state_dict_hook(_PutOriginals(own)))
            handles.append(module._register_load_state_dict_pre_hook(_refuse_load, with_module=True))
    return handles


class _ConversionGuard(NotPickled):
    """An instance-level `_apply` on one module: .to(), .half(), .cuda(), .float() all go through it."""

    def __init__(self, module: nn.Module):
        self.module = module
        module._apply = self  # an instance attribute: found before nn.Module._apply

    def __call__(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # a conversion that changes nothing (model.to(device) said again out of habit) is allowed: fn returns the
        # tensor itself for every tensor of the module then
        tensors = [t for t in (*self.module.parameters(), *self.module.buffers())]
        if all(fn(t) is t for t in tensors):
            return self.module
        raise ResidencyError(f"a dtype or device conversion of {type(self.module).__name__} (.to(), .half(), .float(), "
                             ".cuda(), …) while a runtime is attached: its "
                             "blocks' weights live in the runtime's memory in the plan's dtype and device, and a "
                             "conversion would reach only some of them (calls then fail on mixed dtypes)",
                             hint="detach() (leave the `with` block), convert the model, and attach it again")

    def remove(self) -> None:
        if self.module.__dict__.get("_apply") is self:
            del self.module._apply


def conversion_guards(model: nn.Module) -> list[_ConversionGuard]:
    """Refuse dtype and device conversions of `model` or any of its modules while attached; each guard's
    remove() lifts it. Cost: one attribute per module."""
    return [_ConversionGuard(m) for m in model.modules()]


class _PutOriginals(NotPickled):
    """The state-dict hook of one module: its block tensors' original data in place of the live ones."""

    def __init__(self, own: dict[str, torch.Tensor]):
        self.own = own

    def __call__(self, module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        for name, data in self.own.items():
            key = prefix + name
            if key not in state:
                continue
            value = state[key]
            if isinstance(value, nn.Parameter) or name in module._parameters:
                # keep_vars=True: a Parameter holding the original data (the live one's .data is a slot)
                state[key] = (nn.Parameter(data, requires_grad=value.requires_grad)
                              if isinstance(value, nn.Parameter) else data.detach())
                continue
            # a buffer: the block's state as it is now (a resident block's device copy moves on with every call;
            # a streamed one's is parked on its own storage between calls), kept in the model's own tensor
            live = value.detach()
            if live.data_ptr() != data.data_ptr():
                data.copy_(live.to(data.device, data.dtype))
            state[key] = data.detach()


def _refuse_load(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    raise ResidencyError(f"load_state_dict into {type(_loaded_into(module)).__name__} while a runtime is attached: "
                         "the weights would go into its device slots, and detach restores the ones found at attach",
                         hint="detach the runtime (leave its `with`), load the weights, then attach again")


def _loaded_into(module: nn.Module) -> nn.Module:
    """The module whose load_state_dict the user called: the hook fires in the first module under it that owns a
    block tensor (a block's LayerNorm for `model.blocks[1].load_state_dict(…)`), and named that one. Read from
    the calling frames (an error path only); `module` itself when no such frame is found."""
    frame = sys._getframe(1)
    called = module
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "load_state_dict" else None
        if isinstance(owner, nn.Module):
            called = owner
        frame = frame.f_back
    return called


def warn_inference_only() -> None:
    # Autograd would save the weights a block computed with for the backward pass, and a streamed block's
    # weights live in a slot the next block overwrites: the gradients came out wrong (22.6 against 19.7 on
    # a 4-layer MLP at half its bytes). Without autograd a backward() fails loudly instead, in torch.
    warnings.warn("the attached model ran without autograd (as under torch.no_grad()): streamed and packed "
                  "blocks reuse their weights' memory, so gradients through them would be wrong; call it "
                  "under torch.inference_mode() to silence this, or detach the runtime to train",
                  InferenceOnlyWarning, stacklevel=user_stacklevel())


def refuse_grad_inputs(args: tuple, kwargs: dict) -> None:
    """Raise ResidencyError for a call, under a plan that swaps weights in, whose input is a leaf that requires grad
    (x.requires_grad_(): a backward is coming): it runs without autograd (warn_inference_only), so the output would
    carry no graph and the backward fail in torch ("element 0 of tensors does not require grad") — while the same
    code works at a budget that keeps every block resident. Cost: one walk over the call's arguments."""
    from torch.utils._pytree import tree_flatten

    # a tensor another module computed with autograd on (h = encoder(x) outside no_grad) requires grad too, in plain
    # inference: that one is warned only
    if any(isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf for t in tree_flatten((args, kwargs))[0]):
        raise ResidencyError("an input of this call requires grad, but the plan streams or packs blocks, so the "
                             "model runs without autograd: their weights' memory is reused, and gradients through "
                             "them would be wrong",
                             hint="detach the runtime to train; or attach with a vram= large enough that the plan "
                                  "keeps every block resident (autograd then works as without residency; a share "
                                  "such as '100%' counts the weights only); or call it with inputs that do not "
                                  "require grad (x.detach())")


def refuse_training(model: nn.Module | None) -> None:
    """Raise ResidencyError for a call, under a plan that swaps weights in, of a model set up to train: in training
    mode with gradient checkpointing on (transformers' gradient_checkpointing_enable(), diffusers' enable_gradient_
    checkpointing()). It ran without autograd (warned), and the backward after it failed in torch ("element 0 of
    tensors does not require grad"). Cost: a walk over the modules, on calls with autograd on only."""
    if model is None or not model.training:
        return
    on = getattr(model, "is_gradient_checkpointing", None)
    if on is None:
        on = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if on is True:
        raise ResidencyError(f"{type(model).__name__} is set up to train (training mode, gradient checkpointing on), "
                             "but the plan streams or packs blocks, so it runs without autograd: their weights' "
                             "memory is reused, and gradients through them would be wrong",
                             hint="detach the runtime to train; or attach with a vram= large enough that the plan "
                                  "keeps every block resident; for inference, model.eval() (and "
                                  "gradient_checkpointing_disable())")
