"""The catalog generators: each entry of pipelines/catalog/*.json built by the module builder
(`residency.workload.module_workload`) from the real module tree, on the meta device.

`python -m pipelines.catalog_build [NAMES…] [--check]` writes the entries (or, with --check, reports any that
differ from a regeneration). The external models need the `catalog` extra (diffusers, transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _world_model(name: str) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        from pipelines.world_model.workload import catalog_entry

        return catalog_entry(name)

    return build


def _flux() -> dict[str, Any]:
    from pipelines.catalog_build.flux import catalog_entry

    return catalog_entry()


def _wan() -> dict[str, Any]:
    from pipelines.catalog_build.wan import catalog_entry

    return catalog_entry()


# Entry name -> generator of its document. Measured wall time of one regeneration on a shared 2-core CPU:
# a world model 3-6 s (the first in a process pays ~4 s importing torch's decompositions), flux-schnell
# ~22 s, wan-causal-1.3b 8-20 s; `--check` of all five ~56 s.
GENERATORS: dict[str, Callable[[], dict[str, Any]]] = {
    "tiny": _world_model("tiny"),
    "lucid-500m": _world_model("lucid-500m"),
    "lucid-800m": _world_model("lucid-800m"),
    "flux-schnell": _flux,
    "wan-causal-1.3b": _wan,
}
