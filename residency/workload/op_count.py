"""Counting what a block call dispatches, on the meta device (nothing runs, nothing is allocated).

Three counts feed the cost model: aten ops (each pays a dispatch cost on the CPU backend), kernels (the
non-view ops: each is a launch on a GPU), and the activation elements that the ops not timed by their FLOPs
read and write (norms, elementwise, softmax, copies: on the CPU, and on a GPU for large activations, their
time grows with those elements — a 64×64 VAE block's SiLU touches 130 k elements per op, a 16-token DiT
block's 4 k). Matmuls, convolutions and attention are left out of the element count: their time is charged
by their FLOPs (the ops `torch.utils.flop_counter` counts).

The profiler counts its own op mix with this same class, so a measured per-element rate and a workload's
element count mean the same thing.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry  # ops whose time the cost model charges by FLOPs

# FLOP-timed ops that reach the mode undecomposed (under inference_mode composite ops such as linear and
# scaled_dot_product_attention are not split into addmm/bmm first, and fused attention kernels are absent from
# the FLOP registry): without these an attention or a linear layer would be charged as elementwise traffic.
_FLOP_TIMED = {"linear", "matmul", "einsum", "conv1d", "conv2d", "conv3d", "conv_transpose2d"}


def _timed_by_flops(packet) -> bool:
    name = packet.__name__
    return packet in flop_registry or name in _FLOP_TIMED or "scaled_dot_product" in name or "attention" in name


# Ops that only make a new tensor header over the same memory, though torch does not flag them as views:
# no kernel, no element traffic (a reshape of a contiguous tensor dispatches _unsafe_view).
_VIEW_LIKE = {"_unsafe_view", "alias", "detach", "lift_fresh"}
# Ops that allocate without touching memory: no element traffic.
_ALLOCATING = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
# In-place ops that overwrite their first argument without reading it: it is counted once (as the write),
# not again as the returned output. (add_ and the like read it: input, then output.)
_OVERWRITING = {"copy_", "fill_", "zero_"}


def _sizes(tree: object) -> list[int]:
    return [math.prod(t.shape) for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


# An op's element traffic is filed under the size class of its largest tensor: a per-element cost is not one
# number (on this CPU 0.12 ns per element for tensors that stay in L2, ~0.5 ns once they do not — a 64×64 VAE
# feature map vs a 16-token frame). Classes are powers of 4 from 4096 elements up.
SIZE_CLASS_MIN = 4096


def size_class(elements: int) -> int:
    """The smallest power of 4 (≥ SIZE_CLASS_MIN) holding `elements`."""
    c = SIZE_CLASS_MIN
    while c < elements:
        c *= 4
    return c


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: run()` — then c.ops, c.kernels, c.elements (inputs + outputs) and
    c.elements_by_size (the same elements by size class of each op's largest tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.kernels = self.elements = 0
        self.elements_by_size: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        if not func.is_view and func.overloadpacket.__name__ not in _VIEW_LIKE:
            self.kernels += 1
            packet = func.overloadpacket
            name = packet.__name__
            if not _timed_by_flops(packet) and name not in _ALLOCATING:
                sizes = _sizes((args, kwargs)) + ([] if name in _OVERWRITING else _sizes(out))
                n = sum(sizes)
                if n:
                    self.elements += n
                    c = size_class(max(sizes))
                    self.elements_by_size[c] = self.elements_by_size.get(c, 0) + n
        return out

    @property
    def main_size_class(self) -> int:
        """The size class that holds most of the counted elements (a measured mix is filed under it)."""
        return max(self.elements_by_size, key=self.elements_by_size.get)

    def counts(self) -> dict[str, object]:
        """The catalog's per-call fields."""
        return {"ops_per_call": self.ops, "kernels_per_call": self.kernels,
                "activation_elements_per_call": self.elements,
                "activation_elements_by_size": [[c, n] for c, n in sorted(self.elements_by_size.items())]}
