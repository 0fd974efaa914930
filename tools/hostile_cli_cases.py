"""The CLI's bad-input matrix: every path- and value-taking option fed what a hostile or careless user types.

Each case is (group, name, argv) over files made once in a work directory. Every case is a mistake, so the
only right answers are exit 1 or 2 with `error:`/`hint:` and no traceback; exit 0 counts as "accepted".
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from residency import cli

PROFILE = "rtx-3060-12gb"  # a shipped profile: run cases never wait for this machine to be measured
LONG_NAME = "x" * 300  # over NAME_MAX (255) on every Linux file system
DEEP = "[" * 200_000 + "]" * 200_000  # json.loads recursion limit
HUGE_INT = "9" * 5000  # over Python's 4,300-digit int parsing limit


def prepare(work: Path) -> dict[str, Path]:
    """The good documents the mutations start from: a plan and a trace of tiny, a tiny pipeline directory."""
    work.mkdir(parents=True, exist_ok=True)
    good = {"plan": work / "good-plan.json", "trace": work / "good-trace.json"}
    if not good["plan"].is_file():
        _quiet(["plan", "tiny", "--profile", PROFILE, "--vram", "64MiB", "-o", str(good["plan"])])
    if not good["trace"].is_file():
        _quiet(["run", "tiny", "--plan", str(good["plan"]), "--frames", "2", "--image", str(_image(work)),
                "-o", str(work / "good.gif"), "--trace", str(good["trace"])])
    for key, path in good.items():
        if not path.is_file():
            raise SystemExit(f"error: could not make the good {key} document the mutations start from")
    fifo = work / "fifo.json"
    if not fifo.exists():
        os.mkfifo(fifo)
    good["fifo"] = fifo
    good["image"] = _image(work)
    good["bomb"] = _bomb_png(work / "bomb.png")
    good["pipeline_huge"] = _pipeline_dir(work / "pipe-huge", height=16384, width=16384)
    good["pipeline_types"] = _pipeline_dir(work / "pipe-types", height="64", width=True)
    return good


def cases(work: Path, good: dict[str, Path]) -> Iterator[tuple[str, str, list[str]]]:
    yield from _json_documents(work, good)
    yield from _plan_fields(work, good)
    yield from _trace_fields(work, good)
    yield from _values(work, good)
    yield from _paths(work, good)


# --- documents ---------------------------------------------------------------------------------------------
def _consumers(doc: Path, good: dict[str, Path], work: Path) -> dict[str, list[str]]:
    gif = str(work / "out.gif")
    return {
        "plan": ["run", "tiny", "--plan", str(doc), "--image", str(good["image"]), "--frames", "1", "-o", gif],
        "profile": ["plan", "tiny", "--profile", str(doc)],
        "catalog": ["plan", str(doc), "--profile", PROFILE],
        "catalog-inspect": ["inspect", str(doc)],
        "trace": ["dashboard", "--once", str(doc)],
    }


def _json_documents(work: Path, good: dict[str, Path]) -> Iterator[tuple[str, str, list[str]]]:
    bodies = {"deep-nesting": DEEP, "huge-int": '{"schema_version": ' + HUGE_INT + "}", "nan": '{"x": NaN}',
              "not-object": "[1, 2, 3]", "empty": "", "binary": "\x00\xff\xfe garbage", "null": "null",
              "string": '"a plan"', "truncated": '{"schema_version": 1, "blocks": [', "bom-only": "\ufeff"}
    for name, body in bodies.items():
        path = work / f"doc-{name}.json"
        path.write_bytes(body.encode("utf-8", errors="surrogatepass") if name != "binary" else b"\x00\xff\xfe")
        for consumer, argv in _consumers(path, good, work).items():
            yield f"json:{consumer}", name, argv
    for consumer, argv in _consumers(good["fifo"], good, work).items():
        yield f"json:{consumer}", "fifo", argv
    for consumer, argv in _consumers(work / "a-directory", good, work).items():
        (work / "a-directory").mkdir(exist_ok=True)
        yield f"json:{consumer}", "directory", argv
    for consumer, argv in _consumers(work / f"{LONG_NAME}.json", good, work).items():
        yield f"json:{consumer}", "name-too-long", argv


def _mutated(work: Path, source: Path, name: str, mutate) -> Path:
    doc = json.loads(source.read_text())
    mutate(doc)
    path = work / f"{source.stem}-{name}.json"
    text = json.dumps(doc, allow_nan=True)
    path.write_text(text)
    return path


def _plan_fields(work: Path, good: dict[str, Path]) -> Iterator[tuple[str, str, list[str]]]:
    def put(*keys_value):
        *keys, value = keys_value

        def mutate(doc):
            target = doc
            for k in keys[:-1]:
                target = target[k]
            target[keys[-1]] = value
        return mutate

    def drop(*keys):
        def mutate(doc):
            target = doc
            for k in keys[:-1]:
                target = target[k]
            del target[keys[-1]]
        return mutate

    mutations = {
        "steps-string": put("steps", "abc"), "steps-million": put("steps", 1_000_000), "steps-zero": put("steps", 0),
        "steps-bool": put("steps", True), "notes-int": put("notes", 5), "notes-of-ints": put("notes", [1, 2]),
        "vram-string": put("budget", "vram_bytes", "8MiB"), "vram-zero": put("budget", "vram_bytes", 0),
        "vram-negative": put("budget", "vram_bytes", -1), "vram-float": put("budget", "vram_bytes", 1.5),
        "frame-ms-nan": put("budget", "frame_ms", float("nan")), "frame-ms-inf": put("budget", "frame_ms", float("inf")),
        "frame-ms-negative": put("budget", "frame_ms", -3.0), "kv-dtype": put("kv_dtype", "int3"),
        "context-negative": put("context_frames", -5), "context-huge": put("context_frames", 10**12),
        "depth-negative": put("execution", "prefetch_depth", -1), "depth-huge": put("execution", "prefetch_depth", 10**9),
        "copy-mode": put("execution", "copy_mode", "teleport"), "blocks-empty": put("blocks", []),
        "blocks-not-list": put("blocks", {"a": 1}), "block-not-object": put("blocks", [5]),
        "budget-missing": drop("budget"), "blocks-missing": drop("blocks"), "version-string": put("schema_version", "1"),
        "prediction-wrong": put("prediction", {"frame_ms": "fast"}), "unknown-field": put("colour", "blue"),
        "block-placement": lambda d: d["blocks"][0].update(placement="orbit"),
        "block-format": lambda d: d["blocks"][0].update(format="Q9_9"),
        "block-dtype": lambda d: d["blocks"][0].update(compute_dtype="int8"),
        "block-unknown-name": lambda d: d["blocks"][0].update(name="no.such.block"),
        "block-missing": lambda d: d["blocks"].pop(),
        "block-duplicated": lambda d: d["blocks"].append(dict(d["blocks"][0])),
        "block-name-int": lambda d: d["blocks"][0].update(name=7),
        "block-extra-field": lambda d: d["blocks"][0].update(colour="blue"),
    }
    gif = str(work / "out.gif")
    for name, mutate in mutations.items():
        path = _mutated(work, good["plan"], name, mutate)
        yield "plan-field", name, ["run", "tiny", "--plan", str(path), "--image", str(good["image"]),
                                   "--frames", "1", "-o", gif]


def _trace_fields(work: Path, good: dict[str, Path]) -> Iterator[tuple[str, str, list[str]]]:
    doc = json.loads(good["trace"].read_text())
    events_key = "traceEvents" if "traceEvents" in doc else next(k for k, v in doc.items() if isinstance(v, list))

    def first_event(update):
        def mutate(d):
            for e in d[events_key]:
                if isinstance(e, dict) and "dur" in e:
                    update(e)
                    return
        return mutate

    mutations = {
        "events-not-list": lambda d: d.update({events_key: "many"}),
        "events-of-ints": lambda d: d.update({events_key: [1, 2, 3]}),
        "events-missing": lambda d: d.pop(events_key),
        "dur-nan": first_event(lambda e: e.update(dur=float("nan"))),
        "dur-string": first_event(lambda e: e.update(dur="long")),
        "dur-negative": first_event(lambda e: e.update(dur=-5)),
        "ts-missing": first_event(lambda e: e.pop("ts", None)),
        "name-int": first_event(lambda e: e.update(name=3)),
        "args-string": first_event(lambda e: e.update(args="x")),
        "everything-strings": lambda d: d.update({k: "x" for k in list(d) if k != events_key}),
        "other-data-wrong": lambda d: d.update(otherData=[1]),
    }
    for name, mutate in mutations.items():
        path = _mutated(work, good["trace"], name, mutate)
        yield "trace-field", name, ["dashboard", "--once", str(path)]
    memory = _mutated(work, good["trace"], "memory-strings", _strings_in_counters(events_key))
    yield "trace-field", "memory-strings", ["dashboard", "--once", str(memory)]


def _strings_in_counters(events_key: str):
    def mutate(d):
        for e in d[events_key]:
            if isinstance(e, dict) and e.get("ph") == "C" and isinstance(e.get("args"), dict):
                e["args"] = {k: "lots" for k in e["args"]}
    return mutate


# --- values ------------------------------------------------------------------------------------------------
def _values(work: Path, good: dict[str, Path]) -> Iterator[tuple[str, str, list[str]]]:
    gif, image = str(work / "out.gif"), str(good["image"])
    run = ["run", "tiny", "--profile", PROFILE, "--image", image, "--frames", "1", "-o", gif]
    plan = ["plan", "tiny", "--profile", PROFILE]
    for text in ("0.5", "0", "-1", "nan", "inf", "1e400", "9" * 400, "12 parsecs", "GiB", "0x10", "1_000MiB"):
        yield "value:--vram", f"plan {text[:12]}", [*plan, "--vram", text]
        yield "value:--vram", f"run {text[:12]}", [*run, "--vram", text]
    for text in ("nan", "inf", "-inf", "0", "-15", "1e309"):
        yield "value:--fps", f"plan {text}", [*plan, "--fps", text]
        yield "value:--fps", f"run {text}", [*run, "--fps", text]
        yield "value:--frame-ms", text, [*plan, "--frame-ms", text]
        yield "value:--speed", text, ["dashboard", "--once", "--speed", text, str(good["trace"])]
    for text in ("0", "-1", "1000000000", "9" * 30, "2.5", "four"):
        yield "value:--steps", text, [*plan, "--steps", text]
        yield "value:--frames", f"run {text[:12]}", [*run, "--frames", text]
        yield "value:--frames", f"demo {text[:12]}", ["demo", "--frames", text, "-o", str(work / "demo-out")]
    for text in (str(2**64), str(2**70), "-1", "9" * 50, "1.5"):
        yield "value:--seed", text[:12], [*run, "--seed", text]
    for script in ("right*²", "right*٣", "right*0", "right*99999999999", "right*-1", "jump*", ",,,", "",
                   "teleport", "right**2", "right*1e3"):
        yield "value:--actions", repr(script), [*run, "--actions", script]
    yield "value:--policy", "unknown", [*plan, "--policy", "nonsense"]
    yield "value:--device", "unknown", ["profile", "--device", "tpu:0", "--quick", "-o", str(work / "p.json")]
    yield "value:--device", "cuda-missing", ["profile", "--device", "cuda:7", "--quick", "-o", str(work / "p.json")]
    yield "value:model", "unknown", ["plan", "no-such-model", "--profile", PROFILE]
    yield "value:model", "run-unknown", ["run", "no-such-model", "-o", gif]


# --- paths -------------------------------------------------------------------------------------------------
def _paths(work: Path, good: dict[str, Path]) -> Iterator[tuple[str, str, list[str]]]:
    gif, image = str(work / "out.gif"), str(good["image"])
    run = ["run", "tiny", "--profile", PROFILE, "--frames", "1"]
    long_path = str(work / LONG_NAME)
    yield "path:name-too-long", "inspect", ["inspect", long_path]
    yield "path:name-too-long", "inspect .gguf", ["inspect", long_path + ".gguf"]
    yield "path:name-too-long", "run model", ["run", long_path, "-o", gif]
    yield "path:name-too-long", "run --image", [*run, "--image", long_path + ".png", "-o", gif]
    yield "path:name-too-long", "run -o", [*run, "--image", image, "-o", long_path + ".gif"]
    yield "path:name-too-long", "run --trace", [*run, "--image", image, "-o", gif, "--trace", long_path + ".json"]
    yield "path:name-too-long", "plan -o", ["plan", "tiny", "--profile", PROFILE, "-o", long_path + ".json"]
    yield "path:name-too-long", "profile -o", ["profile", "--quick", "-o", long_path + ".json"]
    yield "path:name-too-long", "demo -o", ["demo", "--frames", "1", "-o", long_path]
    yield "path:fifo", "inspect", ["inspect", str(good["fifo"])]
    yield "path:fifo", "run --image", [*run, "--image", str(good["fifo"]), "-o", gif]
    yield "path:fifo", "run model", ["run", str(good["fifo"]), "-o", gif]
    yield "path:directory", "run --image", [*run, "--image", str(work), "-o", gif]
    yield "path:directory", "run -o", [*run, "--image", image, "-o", str(work)]
    yield "path:missing", "run --image", [*run, "--image", str(work / "nope.png"), "-o", gif]
    yield "path:missing-dir", "run -o", [*run, "--image", image, "-o", str(work / "no" / "dir" / "x.gif")]
    yield "path:nul-byte", "inspect", ["inspect", str(work / "a\x00b.gguf")]
    yield "image", "decompression-bomb", [*run, "--image", str(good["bomb"]), "-o", gif]
    yield "image", "not-an-image", [*run, "--image", str(good["plan"]), "-o", gif]
    yield "pipeline-config", "16384x16384", ["run", str(good["pipeline_huge"]), "--profile", PROFILE,
                                             "--frames", "1", "-o", gif]
    yield "pipeline-config", "wrong-types", ["run", str(good["pipeline_types"]), "--profile", PROFILE,
                                             "--frames", "1", "-o", gif]


# --- fixtures ----------------------------------------------------------------------------------------------
def _quiet(argv: list[str]) -> int:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli.main(argv)


def _image(work: Path) -> Path:
    from pipelines.world_model import PRESETS
    from residency.session_setup import fallback_image

    path = work / "start.png"
    if not path.is_file():
        from PIL import Image

        c = PRESETS["tiny"]
        Image.fromarray(fallback_image(c.height, c.width)).save(path)
    return path


def _bomb_png(path: Path, side: int = 60_000) -> Path:
    """A 60,000² greyscale PNG of zeros: ~3.6 GB decoded from a few MB on disk (PIL warns above 89 M pixels)."""
    if path.is_file():
        return path

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (side + 1)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def _pipeline_dir(path: Path, **overrides) -> Path:
    """A saved tiny pipeline whose config.json is then edited (weights untouched)."""
    if not (path / "config.json").is_file():
        from pipelines.world_model import WorldModelPipeline

        WorldModelPipeline.from_config("tiny").save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
        target = config.get("config", config) if isinstance(config.get("config"), dict) else config
        target.update(overrides)
        (path / "config.json").write_text(json.dumps(config))
    return path
