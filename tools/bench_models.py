"""Benchmark: `residency.attach` on library models on this CPU — overhead, hook cost beside diffusers', prediction.

A ~36M-parameter diffusers Flux transformer and a small Wan transformer, random fp32 weights (issue 16's
evidence). On the CPU backend both "devices" are the CPU: the hook costs are bookkeeping, not copies. The
prediction is the plan's frame_ms: for a module (workload steps = 1) the simulated steady ms per forward.
A human table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import residency  # noqa: E402
from residency.device import machine_profile, resolve_profile  # noqa: E402
from tools.bench_runtime import timed_pairs as runtime_timed_pairs  # noqa: E402

TARGETS = {"overhead": 0.03, "prediction": 0.20}
# Lines of user code for the minimal integration, from each library's documented usage (stated, not measured):
#   residency:  import residency / with residency.attach(model, vram="50%", example_inputs=x): / model(x)
#   diffusers:  model.enable_group_offload(onload_device=…, offload_device=…, offload_type="block_level", …)
#   accelerate: from accelerate import cpu_offload / cpu_offload(model, execution_device=…)
USER_LINES = {"residency": {"lines": 3, "snippet": 'import residency; with residency.attach(model, vram="50%", '
                                                   'example_inputs=x): model(x)', "note": "import + 2"},
              "diffusers": {"lines": 1, "snippet": 'model.enable_group_offload(onload_device=d, offload_device='
                                                   '"cpu", offload_type="block_level", num_blocks_per_group=1)',
                            "note": "method on ModelMixin, no import"},
              "accelerate": {"lines": 2, "snippet": "from accelerate import cpu_offload; "
                                                    "cpu_offload(model, execution_device=d)", "note": "import + 1"}}


def flux(seed: int = 0):
    """~36M parameters: 2 joint + 4 single blocks, 8 heads × 64 (inner dim 512); 256 image + 32 text tokens."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                   attention_head_dim=64, num_attention_heads=8, joint_attention_dim=64,
                                   pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=(16, 24, 24))
    g = torch.Generator().manual_seed(1)
    example = dict(hidden_states=torch.randn(1, 256, 64, generator=g),
                   encoder_hidden_states=torch.randn(1, 32, 64, generator=g),
                   pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.ones(1),
                   img_ids=torch.zeros(256, 3), txt_ids=torch.zeros(32, 3), return_dict=False)
    return model.eval(), example


def wan(seed: int = 0):
    """A small Wan: 4 blocks, 8 heads × 64, ffn 2048; latent 16 × 4 × 16 × 16 → 256 tokens, 32 text tokens."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64,
                                  in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=2048,
                                  num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=64)
    g = torch.Generator().manual_seed(2)
    example = dict(hidden_states=torch.randn(1, 16, 4, 16, 16, generator=g), timestep=torch.ones(1),
                   encoder_hidden_states=torch.randn(1, 32, 64, generator=g), return_dict=False)
    return model.eval(), example


MODELS = {"flux": flux, "wan": wan}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def timed_pairs(step_a, step_b, pairs: int, warmup: int) -> list[tuple[float, float]]:
    """(A ms, B ms) of forwards run back to back in ABBA order (bench_runtime's pairing, in ms)."""
    return [(a * 1e3, b * 1e3) for a, b in runtime_timed_pairs(step_a, step_b, pairs, warmup)]


def _ratio_stats(pairs: list[tuple[float, float]]) -> dict:
    ratios = [b / a for a, b in pairs]
    q = np.quantile(ratios, [0.25, 0.5, 0.75])
    return {"median": float(q[1]) - 1.0, "quartiles": [float(q[0]) - 1.0, float(q[2]) - 1.0]}


def _diffusers_groups(model) -> int:
    """Modules carrying a diffusers group-offloading hook: each runs its onload/offload once per forward."""
    n = 0
    for m in model.modules():
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("group_offloading") is not None:
            n += 1
    return n


def _block_calls(rt) -> int:
    frames = rt.telemetry().frames  # a plain model's frame is one forward; the last one closes on the next call
    return len(frames[-1].blocks) if frames else len(rt.plan.blocks)


def _fwd(model, example: dict):
    """A no-argument forward of `model` on the example inputs."""
    return lambda: model(**example)


def _bench_resident(name: str, models: dict, example: dict, profile, weights_bytes: int, pairs: int, warmup: int,
                    console: Console) -> dict:
    """Attaches `models["hooked"]` all-resident (vram = weights × 1.5) and times it, and plain against plain
    (A/A), in forward pairs (ms). Returns the pairs, the plan's placements and prediction, and the thread count."""
    hooked, plain_a = models["hooked"], models["plain_a"]
    rt = residency.attach(hooked, vram=int(weights_bytes * 1.5), profile=profile, backend="cpu",
                          example_inputs=example)
    placements = sorted({b.placement for b in rt.plan.blocks})
    threads = torch.get_num_threads()  # the runtime's compute threads while attached: plain runs at the same
    console.log(f"{name}: {pairs} plain/attached forward pairs, {pairs} plain/plain (A/A) on {threads} thread(s)")
    att = timed_pairs(_fwd(plain_a, example), _fwd(hooked, example), pairs, warmup)
    aa = timed_pairs(_fwd(plain_a, example), _fwd(models["plain_b"], example), pairs, warmup)
    out = {"placements": placements, "threads": threads, "att": att, "aa": aa, "calls": _block_calls(rt),
           # For a module the workload is one forward (steps = 1): the plan's frame_ms is the simulator's
           # steady-state ms per forward.
           "resident_pred_ms": rt.plan.prediction.frame_ms if rt.plan.prediction else None,
           "plan_steps": rt.plan.steps, "resident_ms": statistics.median(b for _a, b in att)}
    rt.detach()
    torch.set_num_threads(threads)  # detach restored the count found at attach
    return out


def _bench_diffusers(name: str, models: dict, example: dict, pairs: int, warmup: int,
                     console: Console) -> tuple[list[tuple[float, float]], int]:
    """diffusers' block-level group offload (onload = offload = cpu) on `models["grouped"]` against plain, in
    forward pairs (ms). Returns the pairs and the number of groups."""
    from diffusers.hooks import apply_group_offloading

    grouped = models["grouped"]
    apply_group_offloading(grouped, onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1)
    groups = _diffusers_groups(grouped)
    console.log(f"{name}: {pairs} plain/diffusers-group-offload forward pairs ({groups} groups)")
    return timed_pairs(_fwd(models["plain_a"], example), _fwd(grouped, example), pairs, warmup), groups


def _bench_streamed(name: str, models: dict, example: dict, profile, runs: int, warmup: int, threads: int,
                    console: Console) -> dict:
    """Attaches `models["hooked"]` at vram = 50 % and times `runs` forward pairs against plain (ms); then two
    separate runs of plain forwards, `runs` each, for the prediction's A/A."""
    hooked, plain_a = models["hooked"], models["plain_a"]
    console.log(f"{name}: streamed plan (vram = 50% of the weights), {runs} forwards")
    rt = residency.attach(hooked, vram="50%", profile=profile, backend="cpu", example_inputs=example)
    out = {"placements": {b.placement for b in rt.plan.blocks},
           "pairs": timed_pairs(_fwd(plain_a, example), _fwd(hooked, example), runs, warmup)}
    out["pred_ms"] = rt.plan.prediction.frame_ms if rt.plan.prediction else None
    rt.detach()
    torch.set_num_threads(threads)
    # A/A of the prediction: the medians of two separate runs of plain forwards, `runs` each
    out["plain_runs"] = [statistics.median(_timed(_fwd(plain_a, example)) for _ in range(runs)) for _ in range(2)]
    return out


def _error(pred_ms: float | None, measured_ms: float) -> float | None:
    return None if pred_ms is None else (pred_ms - measured_ms) / measured_ms


def _quartiles(values: list[float]) -> list[float]:
    return [float(q) for q in np.quantile(values, [0.25, 0.75])]


def _summary(res: dict, grp: list[tuple[float, float]], groups: int, st: dict) -> dict:
    """The result fields from the resident, diffusers and streamed measurements (ms; µs per call)."""
    att, aa, calls = res["att"], res["aa"], res["calls"]
    resident_ms = res["resident_ms"]
    hook_us = [(b - a) * 1e3 / calls for a, b in att]
    aa_us = [(b - a) * 1e3 / calls for a, b in aa]  # the method's resolution: plain vs plain, per block call
    grp_us = [(b - a) * 1e3 / groups for a, b in grp]
    streamed_ms = statistics.median(b for _a, b in st["pairs"])
    return dict(
        threads=res["threads"], plan_steps=res["plan_steps"], plan_placements=res["placements"],
        all_resident=res["placements"] == ["resident"],
        plain_ms=statistics.median(a for a, _b in att), resident_ms=resident_ms,
        overhead=_ratio_stats(att), overhead_aa=_ratio_stats(aa),
        block_calls_per_forward=calls, hook_us_per_call=statistics.median(hook_us),
        hook_us_quartiles=_quartiles(hook_us),
        aa_us_per_call=statistics.median(aa_us), aa_us_quartiles=_quartiles(aa_us),
        diffusers_overhead=_ratio_stats(grp), diffusers_groups_per_forward=groups,
        diffusers_us_per_group=statistics.median(grp_us),
        diffusers_us_quartiles=_quartiles(grp_us),
        prediction={
            "resident": {"measured_ms": resident_ms, "simulated_ms": res["resident_pred_ms"],
                         "error": _error(res["resident_pred_ms"], resident_ms)},
            "streamed": {"measured_ms": streamed_ms, "simulated_ms": st["pred_ms"],
                         "error": _error(st["pred_ms"], streamed_ms),
                         "streams": "streamed" in st["placements"],
                         "plain_ms_same_run": statistics.median(a for a, _b in st["pairs"])}},
        prediction_aa=st["plain_runs"][1] / st["plain_runs"][0] - 1.0, plain_runs_ms=st["plain_runs"])


def bench_model(name: str, profile, pairs: int, runs: int, warmup: int, console: Console) -> dict:
    """Benches model `name` (a key of MODELS) on the CPU backend: all-resident attach against plain, the hook
    cost per block call beside diffusers' group offload, and measured against simulated ms per forward.

    profile: the DeviceProfile planned for. pairs: forward pairs per comparison; runs: forwards of the
    streamed plan; warmup: untimed forwards first. Returns the result dict the table and JSON summary read.
    """
    build = MODELS[name]
    plain_a, example = build()
    models = {"plain_a": plain_a, "plain_b": build()[0],  # same seed: the same weights
              "hooked": build()[0], "grouped": build()[0]}
    params = sum(p.numel() for p in plain_a.parameters())
    weights_bytes = sum(p.numel() * p.element_size() for p in plain_a.parameters())
    result: dict = {"model": name, "params": params, "weights_bytes": weights_bytes}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        console.log(f"{name}: {params / 1e6:.1f}M parameters; attaching all-resident (vram = weights × 1.5)")
        res = _bench_resident(name, models, example, profile, weights_bytes, pairs, warmup, console)
        grp, groups = _bench_diffusers(name, models, example, pairs, warmup, console)
        st = _bench_streamed(name, models, example, profile, runs, warmup, res["threads"], console)
    result.update(_summary(res, grp, groups, st))
    return result


def _pct(x) -> str:
    return "—" if x is None else f"{x:+.1%}"


def table(results: list[dict]) -> Table:
    """The human table of bench_model's results, one group of rows per model, then the user-code line."""
    t = Table(title="residency.attach on diffusers models, this CPU (fp32, random weights; medians)")
    for col in ("model", "measure", "value", "A/A or quartiles", "target", "note"):
        t.add_column(col, justify="left" if col in ("model", "measure", "note") else "right")
    for r in results:
        o, aa = r["overhead"], r["overhead_aa"]
        t.add_row(r["model"], "parameters / plain forward", f"{r['params'] / 1e6:.1f}M / {r['plain_ms']:.1f} ms", "",
                  "", f"{r['threads']} compute thread(s)")
        t.add_row("", "all-resident attach vs plain (ABBA pairs)", _pct(o["median"]),
                  f"A/A {_pct(aa['median'])} [{_pct(aa['quartiles'][0])}, {_pct(aa['quartiles'][1])}]",
                  f"≤ {TARGETS['overhead']:.0%}",
                  "plan all resident" if r["all_resident"] else f"NOT all resident: {r['plan_placements']}")
        t.add_row("", "residency hook cost per block call", f"{r['hook_us_per_call']:.0f} µs",
                  f"[{r['hook_us_quartiles'][0]:.0f}, {r['hook_us_quartiles'][1]:.0f}]", "",
                  f"{r['block_calls_per_forward']} block calls per forward; (attached − plain) ÷ calls, per pair")
        t.add_row("", "  resolution: plain vs plain, per block call (A/A)", f"{r['aa_us_per_call']:.0f} µs",
                  f"[{r['aa_us_quartiles'][0]:.0f}, {r['aa_us_quartiles'][1]:.0f}]", "",
                  "a cost inside this spread is below what the pairs resolve")
        d = r["diffusers_overhead"]
        t.add_row("", "diffusers group offload cost per group", f"{r['diffusers_us_per_group']:.0f} µs",
                  f"[{r['diffusers_us_quartiles'][0]:.0f}, {r['diffusers_us_quartiles'][1]:.0f}]", "",
                  f"{r['diffusers_groups_per_forward']} groups; {_pct(d['median'])} vs plain; onload = offload = "
                  "cpu: pure hook cost")
        for label, p in r["prediction"].items():
            note = ("vram = weights × 1.5" if label == "resident" else
                    f"vram = 50%; plain {p['plain_ms_same_run']:.1f} ms in the same run" if p["streams"]
                    else "plan at 50% streams nothing")
            t.add_row("", f"{label}: measured vs simulated ms/forward (steady)",
                      f"{p['measured_ms']:.1f} vs {'—' if p['simulated_ms'] is None else format(p['simulated_ms'], '.1f')}",
                      f"err {_pct(p['error'])}; A/A {_pct(r['prediction_aa'])}", f"±{TARGETS['prediction']:.0%}", note)
    t.add_row("user code", "lines per integration (stated, from documented usage)",
              " / ".join(f"{k} {v['lines']}" for k, v in USER_LINES.items()), "", "", "residency counts its import")
    return t


def main() -> int:
    """Benches the models named by --models; prints the table and one JSON line. Returns the exit status:
    2 on an unknown model or --repeats below 1, else 0 (a missed target is reported, not an error)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run of ~1-2 minutes")
    parser.add_argument("--repeats", type=int, default=None, help="forward pairs per comparison (default 24; --quick 6)")
    parser.add_argument("--profile", default="auto",
                        help="auto (this machine's, measured once ~25 s and cached) or a shipped profile name/path")
    parser.add_argument("--models", default="flux,wan", help="comma-separated: flux, wan")
    args = parser.parse_args()
    pairs = args.repeats or (6 if args.quick else 24)
    runs = max(3, pairs // 2)
    warmup = 1 if args.quick else 2
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or pairs < 1:
        print(f"error: unknown model(s) {unknown}" if unknown else "error: --repeats must be ≥ 1", file=sys.stderr)
        print(f"hint: --models takes {', '.join(MODELS)}", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    profile = machine_profile("cpu") if args.profile == "auto" else resolve_profile(args.profile)
    saved = torch.get_num_threads()
    # One intra-op thread per core left after the runtime's copy thread, as the runtime computes (cores − 1).
    torch.set_num_threads(max(1, (profile.compute_threads or 1)))
    try:
        results = [bench_model(n, profile, pairs, runs, warmup, console) for n in names]
    finally:
        torch.set_num_threads(saved)
    Console(width=200).print(table(results))
    summary = {"profile": profile.name, "pairs": pairs, "runs": runs, "targets": TARGETS, "models": results,
               "user_code_lines": USER_LINES,
               "pass": {"overhead": all(r["all_resident"] and r["overhead"]["median"] <= TARGETS["overhead"]
                                        for r in results),
                        "prediction": all(p["error"] is not None and abs(p["error"]) <= TARGETS["prediction"]
                                          for r in results for p in r["prediction"].values())}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
