"""Rich tables for a plan: blocks per component (equal neighbours grouped), VRAM by kind, the verdict.

Per-block milliseconds come from the simulator's steady frame, the same figures the plan reports.
"""

from __future__ import annotations

import re
from collections import defaultdict

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from policies.base import is_device_miss
from residency.plan import Plan
from residency.simulate import simulate
from residency.units import fmt_bytes, plural, size_at_least
from residency.workload import Workload


def _per_block_ms(workload: Workload, plan: Plan, profile) -> dict[str, dict[str, float]]:
    sim = simulate(workload, plan, profile)
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"copy": 0.0, "dequant": 0.0, "compute": 0.0})
    for e in sim.events:
        if e.frame == sim.steady_frame:
            out[e.label.removeprefix("load ")][e.track] += e.end_ms - e.start_ms
    return out


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0–2,5,7–8"."""
    out, start = [], indices[0]
    for prev, cur in zip(indices, indices[1:] + [None], strict=True):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}–{prev}")
            start = cur
    return ",".join(out)


def _group_label(names: list[str]) -> str:
    """Names of one numbered list ("dit.blocks.0" …) as "dit.blocks.0–3,5 (×5)"; one name as it is."""
    if len(names) == 1:
        return names[0]
    head = names[0].rpartition(".")[0]
    return f"{head}.{_ranges([int(n.rpartition('.')[2]) for n in names])} (×{len(names)})"


def _names_label(names: list[str]) -> str:
    """Any block names, each numbered list folded by _group_label, the rest named: "t5.embed_tokens,
    t5.block.0–23 (×24), t5.final_layer_norm" (in order of first appearance; a list by index)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        head, _, idx = name.rpartition(".")
        groups.setdefault(head + "." if idx.isdigit() else name, []).append(name)
    return ", ".join(_group_label(sorted(g, key=_index) if len(g) > 1 else g) for g in groups.values())


def _index(name: str) -> int:
    return int(name.rpartition(".")[2])


def _grouped(workload: Workload, plan: Plan, blocks, ms) -> list[tuple[tuple, list[str]]]:
    """Blocks of one numbered list with equal placement, format, size and FLOPs share a row."""
    rows: dict[tuple, list[str]] = {}
    for b in blocks:
        bp = plan.by_name[b.name]
        head, _, idx = b.name.rpartition(".")
        # Timings are not part of the key: a copy's time shifts with its place in the prefetch pipeline
        # (interference with whichever block computes beside it); the row shows the group's mean.
        key = (head if idx.isdigit() else b.name, bp.placement, bp.format, b.nbytes(bp.format),
               b.flops(workload.context_frames))
        rows.setdefault(key, []).append(b.name)
    return list(rows.items())


_NAME_MIN_WIDTH = 10  # headers wrap (figures stay whole) when the name column would get fewer columns than this
_BLOCK_COLUMNS = (("blocks", "left"), ("placement", "left"), ("format", "left"), ("size", "right"),
                  ("copy", "right"), ("dequant", "right"), ("compute", "right"))
_MEMORY_COLUMNS = (("kind", "left"), ("bytes", "right"), ("of budget", "right"))


def _table(title: str, columns: tuple[tuple[str, str], ...], rows: list[tuple[str, ...]],
           width: int) -> Table | Group:
    """A table for a console `width` columns wide. The first column, a name, takes what is left and folds. A
    right-justified column holds a figure: it is fixed at its widest cell, so a figure is never wrapped, cut or
    squeezed to nothing. When the console is too narrow for every header, headers wrap and the left-justified
    words (placement, verdict) fold beside the name."""
    figures = [max((Text.from_markup(row[i]).cell_len for row in rows), default=1) for i in range(1, len(columns))]
    roomy = [max(w, len(header)) for w, (header, _) in zip(figures, columns[1:], strict=True)]
    frame = 3 * len(columns) + 1  # a border and two spaces of padding per column, and the closing border
    tight = width - frame - sum(roomy) < _NAME_MIN_WIDTH
    words = [max((len(w) for w in header.split()), default=1) if justify == "left" else figure
             for (header, justify), figure in zip(columns[1:], figures, strict=True)]
    if width - frame - sum(words) < _NAME_MIN_WIDTH:
        return _listed(title, columns, rows)
    table = Table(title=title, title_justify="left")
    table.add_column(columns[0][0], justify=columns[0][1], overflow="fold")
    for (header, justify), figure, room in zip(columns[1:], figures, roomy, strict=True):
        if not tight:
            table.add_column(header, justify=justify, width=room)
        elif justify == "right":
            table.add_column(header, justify=justify, width=max(figure, *map(len, header.split())))
        else:
            table.add_column(header, justify=justify, overflow="fold")
    # the name column's width where every other column has its room (tight: rich shares it out, names fold)
    name_width = width - frame - sum(roomy)
    for row in rows:
        table.add_row(row[0] if tight else _wrapped_name(row[0], name_width), *row[1:])
    return table


def _listed(title: str, columns: tuple[tuple[str, str], ...], rows: list[tuple[str, ...]]) -> Group:
    """The table as one line a row, "name: header value, …", for a console too narrow for its columns even folded
    (at 40 columns the names, placements and formats of a block table were squeezed to nothing)."""
    lines = [Text(title, style="italic")]
    for row in rows:
        line = Text.from_markup(row[0], style="bold")
        line.append(": ")
        line.append_text(Text.from_markup(", ".join(f"{header} {cell}" for (header, _), cell in
                                                    zip(columns[1:], row[1:], strict=True))))
        lines.append(line)
    return Group(*lines)


def _wrapped_name(name: str, width: int) -> str:
    """`name` broken into lines of at most `width` cells after its dots, spaces and commas ("vae.encoder." /
    "blocks.0"), where rich's fold would cut it mid-word ("vae.encoder.bloc" / "ks.0"); a part longer than a line
    is left to the fold. A name with markup is left whole."""
    if len(name) <= width or "[" in name:
        return name
    lines, line = [], ""
    for part in re.split(r"(?<=[.,\s])", name):
        if line and len(line) + len(part) > width:
            lines.append(line.rstrip())
            line = ""
        line += part
    lines.append(line.rstrip())
    return "\n".join(lines)


def _block_rows(workload: Workload, plan: Plan, blocks, ms) -> list[tuple[str, ...]]:
    """One row per group of equal blocks: name, placement, format, size (each), then the group's mean ms per
    track."""
    rows = []
    for key, names in _grouped(workload, plan, blocks, ms):
        _, placement, fmt, nbytes = key[:4]
        mean = {k: sum(ms[n][k] for n in names) / len(names) for k in ("copy", "dequant", "compute")}
        # dequantized on the copy engine: its time is in the copy column, not none at all ("0.00" read as free); one
        # word, so a narrow table never breaks it
        on_copy = not mean["dequant"] and all(plan.by_name[n].dequant_on == "copy" for n in names)
        rows.append((_group_label(names), placement, fmt, fmt_bytes(nbytes), f"{mean['copy']:.2f}",
                     "(copy)" if on_copy else f"{mean['dequant']:.2f}", f"{mean['compute']:.2f}"))
    return rows


def _memory_rows(plan: Plan) -> list[tuple[str, ...]]:
    """Device memory at the peak, by kind, then the total: bytes and share of the budget."""
    pred, budget = plan.prediction, plan.budget
    rows = [(kind, fmt_bytes(nbytes), "outside" if kind == "reserve" else _share(nbytes, budget.vram_bytes))
            for kind, nbytes in pred.peak_bytes.items() if nbytes]
    rows.append(("[bold]total[/bold]", f"[bold]{fmt_bytes(pred.peak_total_bytes)}[/bold]",
                 _share(pred.peak_total_bytes, budget.vram_bytes)))
    return rows


def render_plan(console: Console, workload: Workload, plan: Plan, profile, model_label: str | None = None,
                give: str | None = None) -> None:
    """Print the plan per component: placement, format, size and ms of copy, dequant and compute per block;
    the header names the model `model_label` (default: the plan's model name); `give` as verdict's."""
    ms = _per_block_ms(workload, plan, profile)
    pred = plan.prediction
    budget = plan.budget
    unit = frame_unit(workload)
    fps_budget = f", {budget.frame_ms:.1f} ms/{unit}" if budget.frame_ms else ""
    console.print(f"[bold]{escape(model_label or plan.model)}[/bold] on [bold]{escape(plan.profile)}[/bold] — "
                  f"policy {plan.policy}, "
                  f"budget {fmt_bytes(budget.vram_bytes)}{fps_budget}, {plural(workload.steps, 'step')}, "
                  f"{'/'.join(sorted({b.compute_dtype for b in plan.blocks}))} compute")
    for component in workload.components:
        blocks = [b for b in workload.blocks if b.component == component]
        steady = f"{unit}, steady" if unit.endswith(" calls") else f"a steady {unit}"
        console.print(_table(f"{component} — ms per block in {steady}", _BLOCK_COLUMNS,
                             _block_rows(workload, plan, blocks, ms), console.width))
    if pred is None:
        return
    console.print(_table("device memory at the peak", _MEMORY_COLUMNS, _memory_rows(plan), console.width))
    noun = "frame" if unit == "latent frame" else unit
    console.print(f"predicted: [bold]{pred.frame_ms:.2f} ms[/bold]{_long(pred.frame_ms)} per {unit} "
                  f"({_rate(workload, pred.frame_ms)} {_rate_name(unit)}); "
                  f"first {noun} {pred.first_frame_ms:.1f} ms; stall {pred.stall_ms:.2f} ms; "
                  f"{fmt_bytes(pred.link_bytes_per_frame)} over the link per {noun}"
                  f"{_cpu_link(plan, profile)}; "
                  f"lower bound {pred.lower_bound_ms:.2f} ms; quality loss {pred.quality_loss:.3f}")
    for phase, evicted in plan.phase_actions([(ph.name, ph.blocks) for ph in workload.phases]):
        if evicted:
            console.print(f"after {phase}: evict {plural(len(evicted), 'block')} "
                          f"({fmt_bytes(sum(workload.by_name[b].nbytes(plan.by_name[b].format) for b in evicted))}"
                          f" as loaded): {_names_label(list(evicted))}")
    console.print(verdict(plan, unit, give))
    for note in _folded_notes([n for n in plan.notes if not is_device_miss(n)]):  # the verdict says the miss
        console.print(f"  note: {escape(note)}")


_DECLINED = re.compile(r"(?P<name>.+) eager: compiling \((?P<compile>\d+ s)\) would save only (?P<saved>[\d.]+ s) "
                       r"over a (?P<session>\d+ s) session")


FOLDED_NAMED = 3  # declined compiles named in the folded note, the largest savings first


def _folded_notes(notes: list[str]) -> list[str]:
    """The plan's notes, its declined compiles ("X eager: compiling (23 s) would save only 2.9 s over a 600 s
    session", one per block class: 15 lines on Flux) folded into one note where the first of them stood."""
    declined = [(n, m) for n in notes if (m := _DECLINED.fullmatch(n))]
    if len(declined) < 2 or len({(m["compile"], m["session"]) for _, m in declined}) != 1:
        return notes
    m = declined[0][1]
    # the largest savings named, the others counted: Flux listed 14 classes, most "(saves 0.0 s)"
    ranked = sorted((m for _, m in declined), key=lambda m: -float(m["saved"].split()[0]))
    shown, others = ranked[:FOLDED_NAMED], ranked[FOLDED_NAMED:]
    folded = (f"eager where compiling ({m['compile']}) would not repay itself over a {m['session']} session: "
              + ", ".join(f"{m['name']} (saves {_saved(m)})" for m in shown)
              + (f", and {len(others)} more block classes saving {_at_most(others[0])}" if others else ""))
    first = notes.index(declined[0][0])
    rest = [n for n in notes if n not in {d for d, _ in declined}]
    return rest[:first] + [folded] + rest[first:]


def _long(ms: float) -> str:
    """Beside a time of 10 s or more, the same in seconds or minutes: "188880.03 ms" is hard to read."""
    if ms < 10_000:
        return ""
    return f" (= {ms / 1e3:.1f} s)" if ms < 600_000 else f" (= {ms / 60e3:.1f} min)"


def _saved(m: re.Match) -> str:
    """A declined compile's saving as shown: "0.0 s" reads as none, so under 0.1 s it says so."""
    return m["saved"] if float(m["saved"].split()[0]) >= 0.1 else "under 0.1 s"


def _at_most(m: re.Match) -> str:
    """The largest of the folded classes' savings: "0.6 s or less", or "under 0.1 s" (not "under 0.1 s or less")."""
    shown = _saved(m)
    return shown if shown.startswith("under") else f"{shown} or less"


def _cpu_link(plan: Plan, profile) -> str:
    """Why a CPU plan that streams moves few bytes over its link: a streamed block in another dtype than the
    compute's is converted from host memory by the copy engine, and only tensors already in it are copied."""
    if profile.is_gpu or not plan.streamed():
        return ""
    return " (on the CPU a streamed block converts straight from host memory: only tensors already in the " \
           "compute dtype are copied)"


def _share(nbytes: int, budget_bytes: int) -> str:
    """A share of the budget as a percentage; a zero budget (a plan built in code) shows a dash, not a crash."""
    return f"{100 * nbytes / budget_bytes:.0f}%" if budget_bytes > 0 else "—"


def _video_fps(workload: Workload, latent_frame_ms: float) -> float:
    return 1000.0 * workload.video_frames_per_latent / latent_frame_ms if latent_frame_ms > 0 else float("inf")


def _plain(x: float) -> str:
    """A rate without scientific notation (1.2e+02 read badly): two significant digits, more for large ones."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def _rate(workload: Workload, frame_ms: float) -> str:
    """The comparison's rate column: video fps of a world model, else images or calls per second."""
    unit = workload.frame_unit()
    if unit == "latent frame":
        return f"{_video_fps(workload, frame_ms):.1f}"
    calls = workload.calls_per_frame_unit() if unit.endswith("calls") else 1  # "4 calls": calls a second
    return _plain(calls * 1000.0 / frame_ms) if frame_ms > 0 else "—"


def _rate_name(unit: str) -> str:
    """What _rate counts a second: video frames, images, videos or calls ("4 calls": calls, not rounds of 4)."""
    if unit == "latent frame":
        return "video fps"
    return "calls/s" if unit.endswith(" calls") else f"{unit}s/s"


def frame_unit(workload: Workload) -> str:
    """What one predicted "frame" is (Workload.frame_unit): latent frame, image or call."""
    return workload.frame_unit()


def verdict(plan: Plan, unit: str = "latent frame", give: str | None = None) -> str:
    """One rich-markup line: whether the plan fits its VRAM budget and holds its frame budget (ms per `unit`).
    `give`: what to give for a plan over its budget, found by re-planning (plan_cmd.fitting_vram: a policy that keeps
    more resident when given more); None: "give --vram <the plan's peak> or more"."""
    pred, budget = plan.prediction, plan.budget
    if pred is None:  # a plan file without one, for a profile not known here
        return (f"no prediction: the plan holds none, and its profile ({plan.profile}, fingerprint "
                f"{plan.profile_fingerprint}) matches neither a shipped one nor this machine's cached one by "
                "fingerprint (a profile of that name measured another time, or the field edited, does not), so it "
                "cannot be predicted here")
    within = f"within {fmt_bytes(budget.vram_bytes)}"
    if pred.peak_total_bytes > budget.vram_bytes:
        fixed = pred.peak_bytes.get("workspace", 0)
        why = (f" (the device's fixed workspace alone is {fmt_bytes(fixed)}: no placement fits under it)"
               if fixed >= budget.vram_bytes else "")
        give = f"; {give or f'give --vram {size_at_least(pred.peak_total_bytes)} or more'}"
        frame = ""
        if budget.frame_ms is not None and pred.frame_ms > budget.frame_ms:  # said, or it reads as the only miss
            frame = (f"; this plan also misses the frame budget: {pred.frame_ms:.2f} ms > "
                     f"{budget.frame_ms:.2f} ms per {unit}")
        return (f"[red]✗ does not fit:[/red] needs {fmt_bytes(pred.peak_total_bytes)}, budget "
                f"{fmt_bytes(budget.vram_bytes)}{why}{give}{frame}")
    if budget.frame_ms is None:
        return f"[green]✓ fits[/green] {within} at {pred.frame_ms:.2f} ms per {unit} (no frame budget given)"
    if pred.frame_ms <= budget.frame_ms:
        return f"[green]✓ holds:[/green] {pred.frame_ms:.2f} ms ≤ {budget.frame_ms:.2f} ms per {unit} {within}"
    return f"[red]✗ misses the frame budget:[/red] {pred.frame_ms:.2f} ms > {budget.frame_ms:.2f} ms {within}"


def exec_modes_summary(plan: Plan) -> str:
    """How many blocks run in each execution mode, e.g. "compiled 40, eager 5"; "eager" when all are."""
    counts: dict[str, int] = {}
    for bp in plan.blocks:
        counts[bp.exec_mode] = counts.get(bp.exec_mode, 0) + 1
    if set(counts) <= {"eager"}:
        return "eager"
    return ", ".join(f"{mode} {n}" for mode, n in sorted(counts.items(), key=lambda kv: (kv[0] == "eager", kv[0])))


_COMPARISON_COLUMNS = (("policy", "left"), ("ms/frame", "right"), ("video fps", "right"), ("peak VRAM", "right"),
                       ("link/frame", "right"), ("quality loss", "right"), ("verdict", "left"))


def _comparison_columns(unit: str) -> tuple[tuple[str, str], ...]:
    """The columns in the workload's unit: a latent frame's ms and video fps, else per image or call."""
    if unit == "latent frame":
        return _COMPARISON_COLUMNS
    short = {"image": "img", "call": "call"}.get(unit, unit)
    names = {"ms/frame": f"ms/{short}", "video fps": _rate_name(short), "link/frame": f"link/{short}"}
    return tuple((names.get(n, n), a) for n, a in _COMPARISON_COLUMNS)


def _comparison_rows(plans: list[Plan], req) -> list[tuple[str, ...]]:
    """Per plan: policy, ms/frame, video fps, peak VRAM, link bytes/frame, quality loss, verdict word; a plan that
    does not fit shows a dash for its timings."""
    rows = []
    for plan in plans:
        p = plan.prediction
        fits = p.peak_total_bytes <= plan.budget.vram_bytes
        holds = fits and (plan.budget.frame_ms is None or p.frame_ms <= plan.budget.frame_ms)
        word = "[green]holds[/green]" if holds else ("[yellow]too slow[/yellow]" if fits else "[red]does not fit[/red]")
        rows.append((plan.policy, f"{p.frame_ms:.2f}" if fits else "—",
                     _rate(req.workload, p.frame_ms) if fits else "—",
                     fmt_bytes(p.peak_total_bytes), fmt_bytes(p.link_bytes_per_frame) if fits else "—",
                     f"{p.quality_loss:.3f}", word))
    return rows


def render_comparison(console: Console, plans: list[Plan], req) -> None:
    """Print every policy's plan side by side: ms/frame, fps, peak VRAM, link MB, quality, verdict; then, when
    any plan compiles or graphs blocks, each plan's execution modes. A peer runs the modes its documentation
    gives it; compile time (once per machine) is not in ms/frame, which is why ours may leave eager a class a
    peer compiles."""
    console.print(_table("policies side by side (same simulator)", _comparison_columns(req.workload.frame_unit()),
                         _comparison_rows(plans, req), console.width))
    modes = {plan.policy: exec_modes_summary(plan) for plan in plans}
    if set(modes.values()) != {"eager"}:  # say which plans compile or graph: ms/frame leaves compile time out
        console.print("execution modes (blocks per mode; compile time, paid once per machine, is not in ms/frame): "
                      + "; ".join(f"{policy} {summary}" for policy, summary in modes.items()), soft_wrap=True)
