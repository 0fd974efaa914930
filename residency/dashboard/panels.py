"""The dashboard's panels, each a pure function of one TelemetrySnapshot and its DashboardContext.

Per-block stacked bars, the VRAM map, the frame-time sparkline, the link, and predicted vs measured.
"""

from __future__ import annotations

import math
import statistics

from rich.console import Group
from rich.text import Text

from residency.dashboard.context import DashboardContext
from residency.telemetry import FrameRecord, TelemetrySnapshot
from residency.telemetry.recorder import known_gaps
from residency.units import fmt_bytes

SPARKS = "▁▂▃▄▅▆▇█"
BAR = "█"
PARTS = (("copy", "blue"), ("dequant", "magenta"), ("compute", "green"))  # stacked in this order
KIND_COLOURS = {"resident": "green", "resident_quantized": "cyan", "slots": "blue", "dequant_scratch": "magenta",
                "kv_cache": "yellow", "activations": "bright_red", "workspace": "white"}
STEADY_SKIP = 2  # latent frames left out of medians: the first ones pay for warm-up


def latent_frames(snapshot: TelemetrySnapshot) -> list[FrameRecord]:
    """Recorded latent frames (frame 0, the session start's encode, excluded)."""
    return [f for f in snapshot.frames if f.frame > 0]


def _steady(frames: list[FrameRecord]) -> list[FrameRecord]:
    return [f for f in frames if f.frame > STEADY_SKIP] or frames


def _median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def _ms(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.1f} ms"


def sparkline(values: list[float], top: float, limit: float | None = None) -> Text:
    """One cell per value on a 0..top scale; values above `limit` in red."""
    text = Text()
    for v in values:
        level = 0 if top <= 0 else min(len(SPARKS) - 1, int(v / top * (len(SPARKS) - 1) + 0.5))
        text.append(SPARKS[level], style="red" if limit is not None and v > limit else "green")
    return text


def header(snapshot: TelemetrySnapshot, context: DashboardContext) -> Text:
    """The panel title: the newest latent frame's number, then the context's title."""
    frames = latent_frames(snapshot)
    text = Text(f"frame {frames[-1].frame} · " if frames else "", style="dim")
    return text.append(context.title, style="bold")


def frame_times(snapshot: TelemetrySnapshot, context: DashboardContext, width_cells: int = 48) -> Group:
    """Sparkline of the last `width_cells` frames' ms, last and median ms, fps and the budget verdict."""
    frames = latent_frames(snapshot)
    if not frames:
        return Group(Text("ms per frame: waiting for the first latent frame…", style="dim"))
    recent = [f.frame_ms for f in frames[-width_cells:]]
    budget = context.frame_budget_ms
    top = max(max(recent), budget or 0.0)
    median_ms = _median(f.frame_ms for f in _steady(frames))
    line = Text("ms/frame ").append_text(sparkline(recent, top, budget))
    fps = context.video_fps(median_ms)
    summary = Text(f"last {_ms(recent[-1])} · median {median_ms:.1f} · {fps:.1f} fps")
    if budget is not None:
        held = median_ms <= budget
        summary.append(f" · budget {budget:.1f} ({context.video_fps(budget):.0f}) ")
        summary.append("holds" if held else "missed", style="green" if held else "bold red")
    return Group(line, summary)


def block_bars(snapshot: TelemetrySnapshot, width_cells: int = 30, max_rows: int = 24) -> Text:
    """Per block of the latest frame: copy, dequant and compute ms as one stacked bar, then stalls.

    Plain Text lines, not a rich Table: a Table's layout passes cost ~10 ms a refresh on these CPUs."""
    text = Text.assemble("ms per block, latest frame  ", *((f"{BAR} {n} ", c) for n, c in PARTS), ("stall", "red"))
    if not snapshot.frames:
        return text
    blocks = snapshot.frames[-1].blocks
    name_cells = min(24, max((len(b.block) for b in blocks), default=8))
    scale = max((b.copy_ms + b.dequant_ms + b.compute_ms for b in blocks), default=0.0) or 1.0
    for b in blocks[:max_rows]:
        text.append(f"\n{b.block[:name_cells]:<{name_cells}} ")
        cells = 0
        for part, colour in PARTS:
            n = int(round(getattr(b, f"{part}_ms") / scale * width_cells))
            text.append(BAR * n, style=colour)
            cells += n
        text.append(" " * max(0, width_cells - cells))
        text.append(f" {b.copy_ms + b.dequant_ms + b.compute_ms:6.2f}")
        text.append(f" {b.stall_ms:5.2f}", style="bold red" if b.stall_ms > 0.05 else "dim")
    if len(blocks) > max_rows:
        text.append(f"\n… {len(blocks) - max_rows} more blocks", style="dim")
    return text


def vram_map(snapshot: TelemetrySnapshot, context: DashboardContext, width_cells: int = 48) -> Group:
    """Device memory held now by kind, as one bar against the budget."""
    held = [(k, b) for k, b in snapshot.memory if b > 0]
    total = sum(b for _, b in held)
    budget = context.vram_budget_bytes
    scale = max(budget or 0, total) or 1
    bar = Text()
    for kind, nbytes in held:
        bar.append(BAR * max(1, int(round(nbytes / scale * width_cells))), style=KIND_COLOURS.get(kind, "white"))
    bar.append("░" * max(0, width_cells - bar.cell_len), style="dim")
    against = f" of {fmt_bytes(budget)} budget" if budget else ""
    legend = Text()
    for kind, nbytes in held:
        legend.append(f"{BAR} {kind} {fmt_bytes(nbytes)}  ", style=KIND_COLOURS.get(kind, "white"))
    return Group(Text(f"VRAM {fmt_bytes(total)}{against}"), bar, legend)


def link(snapshot: TelemetrySnapshot, width_cells: int = 48) -> Group:
    """Sparkline of link bytes per frame, the last frame's bytes and GB/s, and the predicted bytes."""
    frames = latent_frames(snapshot)
    if not frames:
        return Group(Text("link: no latent frame yet", style="dim"))
    last = frames[-1]
    recent = [float(f.link_bytes) for f in frames[-width_cells:]]
    rate_gbps = last.link_bytes / last.frame_ms / 1e6 if last.frame_ms > 0 else 0.0
    predicted = snapshot.prediction.link_bytes_per_frame if snapshot.prediction else None
    line = Text("link     ").append_text(sparkline(recent, max(recent)))
    text = Text(f"{fmt_bytes(last.link_bytes)} per frame over the link ({rate_gbps:.2f} GB/s)")
    if predicted is not None:
        text.append(f" · predicted {fmt_bytes(predicted)}")
    return Group(line, text)


def predicted_vs_measured(snapshot: TelemetrySnapshot) -> Text:
    """Median of the steady latent frames beside the simulator's figures for the plan, and the caller's gap
    between frames (drawing, pacing: outside the plan, not in the frame's measured time)."""
    frames = _steady(latent_frames(snapshot))
    p = snapshot.prediction
    predicted_frame = p.frame_ms if p else (frames[-1].predicted_frame_ms if frames else None)
    text = Text(f"{'per latent frame':<16} {'measured':>10} {'predicted':>10} {'ratio':>7}", style="bold")

    def size(x: float | None) -> str:
        return "—" if x is None or math.isnan(x) else fmt_bytes(x)

    def row(name: str, measured: float, predicted: float | None, fmt=_ms) -> None:
        ratio = measured / predicted if predicted and not math.isnan(measured) else math.nan
        shown = "—" if math.isnan(ratio) else f"{ratio:.2f}×"
        text.append(f"\n{name:<16} {fmt(measured):>10} {fmt(predicted):>10} {shown:>7}")

    row("frame", _median(f.frame_ms for f in frames), predicted_frame)  # the work: the caller's gap is not in it
    row("caller gap", _median(known_gaps(frames)), None)  # between frames: the plan predicts none of it
    # busy times on both sides (dequant counted where it ran), as the simulator predicts them
    row("compute stream", _median(f.compute_busy_ms for f in frames), p.compute_ms if p else None)
    row("copy engine", _median(f.copy_busy_ms for f in frames), p.copy_ms if p else None)
    row("stall", _median(f.stall_ms for f in frames), p.stall_ms if p else None)
    row("link", _median(f.link_bytes for f in frames), p.link_bytes_per_frame if p else None, fmt=size)
    row("device peak", _median(f.device_peak_bytes for f in frames), p.peak_total_bytes if p else None, fmt=size)
    return text
