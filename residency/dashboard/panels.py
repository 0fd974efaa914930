"""The dashboard's panels, each a pure function of one TelemetrySnapshot and its DashboardContext.

Per-block stacked bars, the VRAM map, the frame-time sparkline, the link, predicted vs measured, and the
closed loop: measured ÷ predicted per engine over the recent frames, re-plans marked, the latest decisions.
"""

from __future__ import annotations

import math

from rich.console import Group
from rich.text import Text

from residency.dashboard.context import DashboardContext
from residency.telemetry import FrameRecord, TelemetrySnapshot
from residency.telemetry.events import LoopEvent
from residency.telemetry.recorder import known_gaps, median_or_nan
from residency.units import fmt_bytes, plural

SPARKS = "▁▂▃▄▅▆▇█"
BAR = "█"
PARTS = (("copy", "blue"), ("dequant", "magenta"), ("compute", "green"))  # stacked in this order
KIND_COLOURS = {"resident": "green", "resident_quantized": "cyan", "slots": "blue", "dequant_scratch": "magenta",
                "kv_cache": "yellow", "activations": "bright_red", "workspace": "white"}
# One glyph per part and per memory kind besides its colour: without colour (a file, CI, NO_COLOR) the bars
# and their legends still tell the parts apart. Block elements only: one cell wide in every terminal.
PART_GLYPHS = {"copy": "▓", "dequant": "▒", "compute": "█"}
KIND_GLYPHS = {"resident": "█", "resident_quantized": "▓", "slots": "▒", "dequant_scratch": "▚", "kv_cache": "▞",
               "activations": "▙", "workspace": "▛"}
STEADY_SKIP = 2  # latent frames left out of medians: the first ones pay for warm-up
RATIO_STEP = 1.25  # ratio cells: one level per 1.25× step, on a log scale centred on 1.0×
RATIO_MID = 4  # the level of 1.0× (0.89..1.12×): mid-height; ▁ is ≤ 0.41×, █ ≥ 1.95×
RATIO_OK = 0.15  # |ratio − 1| shown green up to this (the closed loop's default margin), yellow beyond
REPLAN_MARK = "│"  # put in every ratio row before the first frame run under a new plan
EVENTS_SHOWN = 3  # latest closed-loop decisions listed (each reason wraps to ~3 rows)
EVENT_COLOURS = {"calibrated": "cyan", "replanned": "bold yellow", "kept": "dim", "capped": "red"}
RATIO_LABEL_CELLS = 9  # "compute  "
RATIO_TAIL_CELLS = 8  # " 12.34×"
# measured and predicted ms of each ratio row, per frame
ENGINES = (("frame", lambda f: (f.frame_ms, f.predicted_frame_ms)),
           ("compute", lambda f: (f.compute_busy_ms, f.predicted_compute_ms)),
           ("copy", lambda f: (f.copy_busy_ms, f.predicted_copy_ms)))


def latent_frames(snapshot: TelemetrySnapshot) -> list[FrameRecord]:
    """Recorded latent frames (frame 0, the session start's encode, excluded)."""
    return [f for f in snapshot.frames if f.frame > 0]


def _steady(frames: list[FrameRecord]) -> list[FrameRecord]:
    return [f for f in frames if f.frame > STEADY_SKIP] or frames


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
    median_ms = median_or_nan(f.frame_ms for f in _steady(frames))
    line = Text("ms/frame ").append_text(sparkline(recent, top, budget))
    fps = context.video_fps(median_ms)  # 0 when the median is not a positive time (a trace's 0-ms frames, no steady frame)
    summary = Text(f"last {_ms(recent[-1])} · median {_ms(median_ms)} · " + (f"{fps:.1f} fps" if fps > 0 else "— fps"))
    if budget is not None:
        held = median_ms <= budget
        summary.append(f" · budget {budget:.1f} ms ({context.video_fps(budget):.0f} fps) ")
        summary.append("holds" if held else "missed", style="green" if held else "bold red")
    return Group(line, summary)


def block_bars(snapshot: TelemetrySnapshot, width_cells: int = 30, max_rows: int = 24) -> Text:
    """Per block of the latest frame: copy, dequant and compute ms as one stacked bar, then stalls.

    Plain Text lines, not a rich Table: a Table's layout passes cost ~10 ms a refresh on these CPUs."""
    text = Text.assemble("ms per block, latest frame  ", *((f"{PART_GLYPHS[n]} {n} ", c) for n, c in PARTS),
                         ("stall", "red"))
    if not snapshot.frames:
        return text
    blocks = snapshot.frames[-1].blocks
    name_cells = min(24, max((len(b.block) for b in blocks), default=8))
    # the two figures after each bar: the bar's length (copy + dequant + compute) and the block's stall
    text.append(f"\n{'':<{name_cells}} {'':<{width_cells}} {'total':>6} {'stall':>5}", style="dim")
    scale = max((b.copy_ms + b.dequant_ms + b.compute_ms for b in blocks), default=0.0) or 1.0
    for b in blocks[:max_rows]:
        text.append(f"\n{b.block[:name_cells]:<{name_cells}} ")
        cells = 0
        for part, colour in PARTS:
            n = int(round(getattr(b, f"{part}_ms") / scale * width_cells))
            text.append(PART_GLYPHS[part] * n, style=colour)
            cells += n
        text.append(" " * max(0, width_cells - cells))
        text.append(f" {b.copy_ms + b.dequant_ms + b.compute_ms:6.2f}")
        text.append(f" {b.stall_ms:5.2f}", style="bold red" if b.stall_ms > 0.05 else "dim")
    if len(blocks) > max_rows:
        text.append(f"\n… {len(blocks) - max_rows} more blocks", style="dim")
    return text


def _share_cells(sizes: list[int], scale: int, width_cells: int) -> list[int]:
    """Cells of a bar for each size: the total's share of `scale` (at least one cell when anything is held), split
    by largest remainder, so the bar is as long as the total and never longer than `width_cells` (one cell a kind
    drew 0.14 % of a budget as 3 cells). A kind too small for a cell still has its legend entry."""
    total = sum(sizes)
    cells = min(width_cells, max(1 if total else 0, round(total / scale * width_cells)))
    exact = [b / total * cells if total else 0.0 for b in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: out[i] - exact[i])[:cells - sum(out)]:
        out[i] += 1
    return out


def vram_map(snapshot: TelemetrySnapshot, context: DashboardContext, width_cells: int = 48) -> Group:
    """Device memory held now by kind, as one bar against the budget."""
    held = [(k, b) for k, b in snapshot.memory if b > 0]
    total = sum(b for _, b in held)
    budget = context.vram_budget_bytes
    scale = max(budget or 0, total) or 1
    bar = Text()
    for (kind, _), n in zip(held, _share_cells([b for _, b in held], scale, width_cells), strict=True):
        bar.append(KIND_GLYPHS.get(kind, BAR) * n, style=KIND_COLOURS.get(kind, "white"))
    bar.append("░" * max(0, width_cells - bar.cell_len), style="dim")
    against = f" of {fmt_bytes(budget)} budget" if budget else ""
    legend = Text()
    for kind, nbytes in held:
        legend.append(f"{KIND_GLYPHS.get(kind, BAR)} {kind} {fmt_bytes(nbytes)}  ", style=KIND_COLOURS.get(kind, "white"))
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
    if last.link_bytes == 0 and last.copy_busy_ms > 0:  # the CPU backend's streamed blocks in another dtype
        text.append(" · streamed blocks convert straight from host memory, nothing to copy", style="dim")
    return Group(line, text)


def predicted_vs_measured(snapshot: TelemetrySnapshot, predicted_for: str | None = None) -> Text:
    """Median of the steady latent frames beside the simulator's figures for the plan, and the caller's gap
    between frames (drawing, pacing: outside the plan, not in the frame's measured time). `predicted_for`: the
    other device the predictions are for (DashboardContext): no ratios, and a line saying why."""
    frames = _steady(latent_frames(snapshot))
    p = snapshot.prediction
    predicted_frame = p.frame_ms if p else (frames[-1].predicted_frame_ms if frames else None)
    text = Text(f"{'per latent frame':<16} {'measured':>10} {'predicted':>10} {'ratio':>7}", style="bold")

    def size(x: float | None) -> str:
        return "—" if x is None or math.isnan(x) else fmt_bytes(x)

    def row(name: str, measured: float, predicted: float | None, fmt=_ms) -> None:
        ratio = measured / predicted if predicted and not math.isnan(measured) and not predicted_for else math.nan
        shown = "—" if math.isnan(ratio) else f"{ratio:.2f}×"
        text.append(f"\n{name:<16} {fmt(measured):>10} {fmt(predicted):>10} {shown:>7}")

    row("frame", median_or_nan(f.frame_ms for f in frames), predicted_frame)  # the work: the caller's gap is not in it
    row("caller gap", median_or_nan(known_gaps(frames)), None)  # between frames: the plan predicts none of it
    # busy times on both sides (dequant counted where it ran), as the simulator predicts them
    row("compute stream", median_or_nan(f.compute_busy_ms for f in frames), p.compute_ms if p else None)
    row("copy engine", median_or_nan(f.copy_busy_ms for f in frames), p.copy_ms if p else None)
    row("stall", median_or_nan(f.stall_ms for f in frames), p.stall_ms if p else None)
    row("link", median_or_nan(f.link_bytes for f in frames), p.link_bytes_per_frame if p else None, fmt=size)
    row("device peak", median_or_nan(f.device_peak_bytes for f in frames), p.peak_total_bytes if p else None, fmt=size)
    if predicted_for:
        text.append(f"\npredicted for {predicted_for}: not compared", style="dim")
    return text


def _ratio(measured_ms: float, predicted_ms: float | None) -> float:
    """measured ÷ predicted; nan without a prediction or when the plan predicts none of it (0 ms)."""
    return measured_ms / predicted_ms if predicted_ms else math.nan


def _ratio_cell(ratio: float) -> tuple[str, str]:
    """The sparkline cell and colour of one ratio: green within RATIO_OK of 1.0×, yellow beyond, a dim dot for
    no ratio. A fixed log scale (not one stretched to the data): rows and refreshes compare, and a 2 % wobble
    around 1.0× stays one flat line."""
    if math.isnan(ratio):
        return "·", "dim"
    steps = round(math.log(ratio) / math.log(RATIO_STEP)) if ratio > 0 else -len(SPARKS)
    level = max(0, min(len(SPARKS) - 1, RATIO_MID + steps))
    return SPARKS[level], "green" if abs(ratio - 1.0) <= RATIO_OK else "yellow"


def _replan_marks(frames: list[FrameRecord], events: tuple[LoopEvent, ...]) -> set[int]:
    """Indexes into `frames` of the first frame run after each re-plan (len(frames): after the newest).

    A re-plan is placed at the work end of the frame before it (LoopEvent.time_s); one older than every
    frame shown is not marked."""
    marks = set()
    for e in events:
        if e.kind != "replanned" or not frames or e.time_s < frames[0].start_s:
            continue
        marks.add(next((i for i, f in enumerate(frames) if f.start_s >= e.time_s), len(frames)))
    return marks


def _ratio_row(name: str, ratios: list[float], marks: set[int]) -> Text:
    text = Text(f"{name:<{RATIO_LABEL_CELLS}}")
    for i, ratio in enumerate(ratios):
        if i in marks:
            text.append(REPLAN_MARK, style="bold yellow")
        text.append(*_ratio_cell(ratio))
    if len(ratios) in marks:
        text.append(REPLAN_MARK, style="bold yellow")
    latest = next((r for r in reversed(ratios) if not math.isnan(r)), math.nan)
    shown = "—" if math.isnan(latest) else f"{latest:.2f}×"
    style = "dim" if math.isnan(latest) else ("green" if abs(latest - 1.0) <= RATIO_OK else "bold yellow")
    return text.append(f" {shown:>{RATIO_TAIL_CELLS - 1}}", style=style)


def closed_loop(snapshot: TelemetrySnapshot, width_cells: int = 66, predicted_for: str | None = None) -> Group:
    """Measured ÷ predicted per recent latent frame for the frame, the compute stream and the copy engine (one
    row each, each frame against the prediction of the plan that ran it; the latest ratio at the end), re-plans
    marked with REPLAN_MARK, then the latest EVENTS_SHOWN decisions of the closed loop with their reasons.

    `width_cells`: a row's width, label and latest ratio included; re-plan marks take cells from the frames.
    `predicted_for`: the other device the predictions are for: no ratios, a line saying so."""
    frames = latent_frames(snapshot)
    cells = max(1, width_cells - RATIO_LABEL_CELLS - RATIO_TAIL_CELLS)
    recent = frames[-cells:]
    marks = _replan_marks(recent, snapshot.events)
    over = len(recent) + len(marks) - cells
    if over > 0:  # the marks take cells: drop as many of the oldest frames and place them again
        recent = recent[over:]
        marks = _replan_marks(recent, snapshot.events)
    title = Text("measured ÷ predicted per frame", style="bold")
    title.append(f"  ({REPLAN_MARK} = re-plan; ▅ = 1.0×; the figure: the latest frame)", style="dim")
    lines: list[Text] = [title]
    if predicted_for:
        lines.append(Text(f"predictions are for {predicted_for}: not compared", style="dim"))
    elif not any(f.predicted_frame_ms is not None for f in recent):
        lines.append(Text("no prediction for these frames", style="dim"))
    else:
        for name, pick in ENGINES:
            lines.append(_ratio_row(name, [_ratio(*pick(f)) for f in recent], marks))
    events = snapshot.events[-EVENTS_SHOWN:]
    if events:
        total = len(snapshot.events)
        shown = f"the latest {len(events)}, last at the bottom" if total > len(events) else "latest last"
        lines.append(Text(f"closed loop: {plural(total, 'decision')}, {shown}", style="dim"))
    lines += [Text(e.line(), style=EVENT_COLOURS.get(e.kind, "")) for e in events]
    return Group(*lines)
