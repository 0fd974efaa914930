"""The example inputs of one call of a model: a tensor, a tuple of positional inputs or a dict of keyword inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from residency.errors import ResidencyError
from residency.validate import a_type

Example = tuple | Mapping[str, Any] | torch.Tensor  # positional inputs, keyword inputs, or one tensor


def split_example(example: Example) -> tuple[tuple, dict[str, Any]]:
    """(positional, keyword) inputs of one call: a tensor, a tuple of inputs, or a dict of keyword inputs."""
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, Mapping):
        args, kwargs = (), dict(example)
    elif isinstance(example, (tuple, list)):
        args, kwargs = tuple(example), {}
    else:  # a numpy array would be unpacked row by row
        raise ResidencyError(f"example_inputs is {a_type(example)}: give a torch tensor, a tuple of "
                             "the call's positional inputs or a dict of its keyword inputs",
                             hint="e.g. example_inputs=torch.from_numpy(x)")
    arrays = [k for k, v in (*enumerate(args), *kwargs.items()) if type(v).__module__ == "numpy"
              and hasattr(v, "shape")]
    if arrays:
        raise ResidencyError(f"example_inputs[{arrays[0]!r}] is a numpy array: the model takes torch tensors",
                             hint="convert it with torch.from_numpy(x)")
    return args, kwargs
