"""The peers' documented residency and overlap behaviours, reproduced as policies.

Each is scored by the same simulator as ours; a peer that cannot run a case says so in its plan's notes.
Each peer module's docstring names the public sources (repository files, pull requests, documentation
pages, papers) of the behaviour it reproduces; ARCHITECTURE.md ("How to add: a peer policy") says how to
add one.
"""

from __future__ import annotations

from policies.peers import (
    accelerate_sequential,
    all_resident,
    comfyui_partial,
    diffusers_group_offload,
    diffusers_model_offload,
    flexgen_lp,
    forge,
)

PEERS = {
    all_resident.NAME: all_resident.plan,
    accelerate_sequential.NAME: accelerate_sequential.plan,
    diffusers_model_offload.NAME: diffusers_model_offload.plan,
    diffusers_group_offload.NAME: diffusers_group_offload.plan,
    comfyui_partial.NAME: comfyui_partial.plan,
    forge.NAME: forge.plan,
    flexgen_lp.NAME: flexgen_lp.plan,
}

__all__ = ["PEERS"]
