"""The dashboard renders from snapshots: a trace round-trips through read_trace, and the render shows the numbers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from rich.console import Console

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.workload import catalog_entry
from residency.dashboard import DashboardContext, build, read_trace, write_trace
from residency.dashboard.keyboard import action_of, decode
from residency.errors import ResidencyError
from residency.plan import BlockPlan, Budget, Plan, Prediction
from residency.runtime import Runtime
from residency.telemetry import write_chrome_trace
from residency.workload import workload_from_dict

CONTEXT = DashboardContext("tiny · test", vram_budget_bytes=64 * 2**20, frame_budget_ms=500.0)


@pytest.fixture(scope="module")
def snapshot():
    w = workload_from_dict(catalog_entry("tiny"))
    blocks = tuple(BlockPlan(b.name, "streamed" if b.name.startswith("dit.blocks") else "resident", "F32", "fp32")
                   for b in w.blocks)
    prediction = Prediction(frame_ms=40.0, first_frame_ms=60.0, stall_ms=1.0, copy_ms=5.0, compute_ms=35.0,
                            link_bytes_per_frame=123, peak_bytes={"slots": 1}, lower_bound_ms=30.0, quality_loss=0.0)
    plan = Plan(model=w.name, workload_fingerprint=w.fingerprint(), profile="test", profile_fingerprint="-",
                policy="test", budget=Budget(2**31), blocks=blocks, steps=w.steps, context_frames=w.context_frames,
                prediction=prediction)
    pipe = WorldModelPipeline.from_config("tiny")
    rt = Runtime(plan, "cpu", workload=w).attach(pipe)
    session = pipe.start(np.zeros((64, 64, 3), np.uint8))
    for action in ("right", "up", "idle", "jump"):
        rt.step(session, action)
    memory = rt.telemetry().memory
    rt.detach()
    return dataclasses.replace(rt.telemetry(), memory=memory)


def render_text(snapshot, context=CONTEXT) -> str:
    console = Console(record=True, width=100, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(build(snapshot, context))
    return console.export_text()


def test_trace_round_trip_rebuilds_every_frame_and_block(snapshot, tmp_path):
    got, context = read_trace(write_trace(snapshot, CONTEXT, tmp_path / "t.json"))
    assert context == CONTEXT
    assert got.memory == snapshot.memory and got.prediction == snapshot.prediction
    assert [f.frame for f in got.frames] == [f.frame for f in snapshot.frames] == [0, 1, 2, 3, 4]
    for a, b in zip(got.frames, snapshot.frames, strict=True):
        assert a.frame_ms == pytest.approx(b.frame_ms, abs=1e-3)
        assert a.link_bytes == b.link_bytes and a.device_bytes == b.device_bytes
        assert [(x.block, x.calls, x.link_bytes) for x in a.blocks] == [(x.block, x.calls, x.link_bytes)
                                                                        for x in b.blocks]
        for x, y in zip(a.blocks, b.blocks, strict=True):
            for part in ("copy_ms", "dequant_ms", "compute_ms", "stall_ms"):
                assert getattr(x, part) == pytest.approx(getattr(y, part), abs=1e-3)


def test_render_shows_frame_ms_fps_memory_kinds_and_blocks(snapshot, tmp_path):
    got, context = read_trace(write_trace(snapshot, CONTEXT, tmp_path / "t.json"))
    text = render_text(got, context)
    steady = [f.frame_ms for f in got.frames if f.frame > 2]
    median_ms = sorted(steady)[len(steady) // 2] if len(steady) % 2 else sum(sorted(steady)) / len(steady)
    assert f"median {median_ms:.1f}" in text
    assert f"{1000 / median_ms:.1f} fps" in text
    assert "40.0 ms" in text  # the prediction
    for kind, nbytes in snapshot.memory:
        if nbytes:
            assert kind in text
    assert "dit.blocks.0" in text and "vae.decoder.blocks.0" in text
    assert "budget 500.0" in text and "64.0 MiB budget" in text


def test_a_plain_telemetry_trace_renders_with_total_device_memory(snapshot, tmp_path):
    got, context = read_trace(write_chrome_trace(snapshot, tmp_path / "plain.json"))
    assert got.prediction is None and got.frames[-1].predicted_frame_ms == 40.0
    assert context.title == "plain.json"
    text = render_text(got, context)
    assert "device (all kinds)" in text and "40.0 ms" in text


def test_a_trace_in_chromes_json_array_form_replays_its_frames(snapshot, tmp_path):
    import json

    doc = json.loads(write_chrome_trace(snapshot, tmp_path / "object.json").read_text())
    array = tmp_path / "array.json"
    array.write_text(json.dumps(doc["traceEvents"]))
    got, context = read_trace(array)
    want, _ = read_trace(tmp_path / "object.json")
    assert context.title == "array.json"
    assert [f.frame for f in got.frames] == [f.frame for f in want.frames]
    assert [f.frame_ms for f in got.frames] == pytest.approx([f.frame_ms for f in want.frames], abs=1e-3)
    assert [[b.block for b in f.blocks] for f in got.frames] == [[b.block for b in f.blocks] for f in want.frames]


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_a_trace_whose_events_were_reordered_is_refused_naming_the_event(snapshot, tmp_path, order):
    # reversed, the replay drew negative block times; shuffled, a median of 4.4 ms where frames took ~43
    import json
    import random

    doc = json.loads(write_chrome_trace(snapshot, tmp_path / "t.json").read_text())
    events = doc["traceEvents"]
    if order == "reversed":
        events.reverse()
    else:
        random.Random(0).shuffle(events)
    bad = tmp_path / f"{order}.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ResidencyError, match=r"traceEvents\[\d+\] \(compute of .*not in the order residency writes"):
        read_trace(bad)


@pytest.mark.parametrize("content,problem", [("{", "not valid JSON"), ('{"a": 1}', "not a Chrome trace"),
                                             ('{"traceEvents": []}', "no recorded frames"), ("[]", "no recorded frames"),
                                             ('[{"ph": "X"},', "not valid JSON"), ('"x"', "not a Chrome trace"),
                                             ('[1]', r"traceEvents\[0\]"),
                                             ('[{"ph": "X", "cat": "v8", "name": "x", "ts": 1, "dur": 2}]',
                                              r"traceEvents\[0\] is not an event residency writes .*'v8'"),
                                             ('[{"ph": "X", "name": "x", "ts": 1, "dur": 2}]', "not a residency trace")])
def test_broken_traces_are_refused_with_a_hint(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ResidencyError, match=problem) as err:
        read_trace(path)
    assert err.value.hint


def test_keys_decode_to_actions():
    assert decode("\x1b[Cw\x1bOA ") == ["right", "w", "up", " "]
    vocab = ("idle", "up", "down", "left", "right", "up_left", "jump", "use")
    assert [action_of(k, vocab) for k in ("right", "a", "7", " ", "e", "x", "3")] == [
        "right", "left", "up_left", "jump", "use", None, None]


def test_the_link_panel_says_why_a_busy_copy_engine_moved_no_bytes(snapshot):
    from residency.dashboard.panels import link

    def text_of(snap) -> str:
        console = Console(record=True, width=200, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(link(snap))
        return console.export_text()

    last = snapshot.frames[-1]
    assert last.link_bytes > 0 and "nothing to copy" not in text_of(snapshot)
    converted = dataclasses.replace(last, link_bytes=0, copy_busy_ms=5.0)  # the CPU's bf16 blocks, unpacked
    shown = text_of(dataclasses.replace(snapshot, frames=(*snapshot.frames[:-1], converted)))
    assert "0 B per frame over the link" in shown and "convert straight from host memory, nothing to copy" in shown


def test_without_colour_each_part_and_memory_kind_has_its_own_glyph():
    from residency.dashboard.panels import KIND_COLOURS, KIND_GLYPHS, PART_GLYPHS, PARTS

    assert len({PART_GLYPHS[n] for n, _ in PARTS}) == len(PARTS)
    assert set(KIND_GLYPHS) == set(KIND_COLOURS) and len(set(KIND_GLYPHS.values())) == len(KIND_GLYPHS)
    assert "░" not in KIND_GLYPHS.values()  # the free part of the VRAM bar


def test_frames_of_zero_ms_show_no_rate_not_zero_fps(snapshot):
    """A trace whose frames all lasted 0 ms (hand-written, or a clock too coarse) has no rate to show."""
    zero = dataclasses.replace(snapshot, frames=tuple(dataclasses.replace(f, frame_ms=0.0) for f in snapshot.frames))
    text = render_text(zero)
    assert "— fps" in text and "0.0 fps" not in text


def test_plays_status_blames_drawing_not_the_machine_when_steps_fit_their_budget():
    """Steps of 50.7 ms against a 66.7 ms budget, 35.5 ms of drawing between them: the status said "this machine
    cannot hold 15 fps"."""
    from residency.dashboard.play_view import BOARD_MIN_COLS, Status

    drawing = Status(50, "left", 50.7, 15.0, 9.5, True, 35.5, 1000 / 15).text().plain
    assert "steps fit their 66.7 ms, drawing the screen between them does not" in drawing
    assert f"under {BOARD_MIN_COLS} columns" in drawing and "cannot hold" not in drawing
    slow = Status(50, "left", 80.0, 15.0, 9.5, True, 5.0, 1000 / 15).text().plain
    assert "this machine cannot hold 15 fps" in slow
    assert "cannot" not in Status(50, "left", 50.7, 15.0, 15.0, False, 10.0, 1000 / 15).text().plain


def test_a_trace_naming_a_memory_kind_the_ledger_never_accounts_is_refused(snapshot, tmp_path):
    path = write_trace(snapshot, CONTEXT, tmp_path / "t.json")
    doc = json.loads(path.read_text())
    doc["otherData"]["residency"]["memory"]["kv-cache"] = 5
    path.write_text(json.dumps(doc))
    with pytest.raises(ResidencyError, match=r"memory names an unknown kind 'kv-cache'") as err:
        read_trace(path)
    assert "kv_cache" in err.value.hint


@pytest.mark.parametrize("sizes, budget", [([10, 10, 10], 21_000), ([1000, 500, 500], 2000), ([1] * 80, 80),
                                           ([7, 3, 5, 11], 10**9), ([2**30, 1], 2**30)])
def test_the_memory_bar_is_as_long_as_the_share_held_and_never_longer_than_its_width(snapshot, sizes, budget):
    from residency.dashboard.panels import vram_map

    kinds = ("resident", "slots", "kv_cache", "activations") * 20
    snap = dataclasses.replace(snapshot, memory=tuple(zip(kinds, sizes, strict=False)))
    bar = vram_map(snap, DashboardContext("t", vram_budget_bytes=budget), width_cells=48).renderables[1]
    held = bar.cell_len - bar.plain.count("░")
    assert bar.cell_len == 48
    assert held == max(1, round(min(1.0, sum(sizes) / max(budget, sum(sizes))) * 48))


@pytest.mark.parametrize(("cols", "rows"), [(80, 24), (80, 12), (160, 30), (160, 60)])
def test_the_play_screen_fits_the_terminals_height_with_its_help_and_status_on_it(snapshot, cols, rows):
    # at 80×24 the 32-row frame filled the screen: help, status and the size note were cut off, unsaid
    from rich.console import Console

    from residency.dashboard import Dashboard
    from residency.dashboard.keyboard import HELP
    from residency.dashboard.play_view import MIN_FRAME_ROWS, PlayView, Status

    board = Dashboard(CONTEXT)
    board.update(snapshot)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    view = PlayView(board, image, cols)
    view.status = Status(50, "left", 50.7, 15.0, 9.5, True, 35.5, 1000 / 15)
    console = Console(width=cols, height=rows, record=True, color_system=None)
    console.print(view)
    lines = console.export_text().rstrip("\n").split("\n")
    text = "\n".join(lines)
    assert HELP in text.replace("\n", "") and "frame 50" in text
    if rows >= MIN_FRAME_ROWS + 8:
        assert len(lines) <= rows, (len(lines), rows)
    else:  # too short for any frame worth drawing: drawn at the least height, and said
        assert f"the terminal is {rows} lines" in text


def test_the_play_screen_follows_the_terminal_resized_narrower_and_wider(snapshot):
    """Started at 160 columns and resized to 60, the dashboard was still drawn beside the frame, cut off."""
    from rich.console import Console

    from residency.dashboard import Dashboard
    from residency.dashboard.play_view import BOARD_MIN_COLS, PlayView

    board = Dashboard(CONTEXT)
    board.update(snapshot)
    view = PlayView(board, np.zeros((64, 64, 3), dtype=np.uint8), 160)
    for cols in (160, 60, 160):
        console = Console(width=cols, height=40, record=True, color_system=None)
        console.print(view)
        lines = console.export_text().rstrip("\n").split("\n")
        narrow = cols < BOARD_MIN_COLS
        assert max(len(line.rstrip()) for line in lines) <= cols
        text = "".join(lines)
        assert ("widen the terminal" in text) == narrow and ("frame " in text) == (not narrow)  # the board's header
