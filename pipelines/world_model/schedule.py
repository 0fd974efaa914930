"""The call schedule as data: which component runs, in which phase, how often, over which blocks.

A planner reads this instead of tracing the pipeline; the session executes exactly this order.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.world_model.config import WorldModelConfig
from pipelines.world_model.sampler import timesteps

PHASES = ("encode", "denoise", "decode")


@dataclass(frozen=True)
class ScheduleEntry:
    """One component's calls in one phase: how many, how often, which blocks, and their KV access."""
    component: str  # "encoder" | "dit" | "decoder"
    phase: str  # "encode" (once per session) | "denoise" (per latent frame) | "decode" (per latent frame)
    calls: int  # calls of the component per `per`
    per: str  # "session" | "latent_frame"
    blocks: tuple[str, ...]  # qualified block names (pipeline-relative), in execution order
    purpose: str  # what the calls compute
    kv: str  # temporal KV access of each call: "none" | "read" | "read+write"
    times: tuple[float, ...] = ()  # flow-matching t of each call (DiT only), 1.0 = pure noise


def build_schedule(
    config: WorldModelConfig,
    encoder_blocks: list[str],
    dit_blocks: list[str],
    dit_blocks_no_output: list[str],
    decoder_blocks: list[str],
) -> list[ScheduleEntry]:
    """The pipeline's schedule: encode once per session, then denoise and decode per latent frame.

    Block lists are qualified names in execution order; `dit_blocks_no_output` omits the final layer.
    """
    ts = timesteps(config.steps, config.timestep_shift)
    return [
        ScheduleEntry("encoder", "encode", 1, "session", tuple(encoder_blocks),
                      "start image (repeated temporal_compression times) -> anchor latent", "none"),
        ScheduleEntry("dit", "encode", 1, "session", tuple(dit_blocks_no_output),
                      "anchor cache write: t=0 pass over the anchor latent, final layer skipped",
                      "read+write", (0.0,)),
        ScheduleEntry("dit", "denoise", config.steps, "latent_frame", tuple(dit_blocks),
                      "Euler steps on the new latent frame; past frames read from the KV cache",
                      "read", tuple(ts[:-1])),
        ScheduleEntry("dit", "denoise", 1, "latent_frame", tuple(dit_blocks_no_output),
                      "cache write: t=0 pass on the clean frame, final layer skipped", "read+write", (0.0,)),
        ScheduleEntry("decoder", "decode", 1, "latent_frame", tuple(decoder_blocks),
                      f"latent frame -> {config.temporal_compression} RGB video frame(s)", "none"),
    ]
