"""`residency plan MODEL [--profile P]`: choose per block placement and format for a VRAM and frame budget.

Exit 0 when the budget holds, 3 when it cannot (the best plan is still printed and written), 1 on
errors, 2 on usage.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace

from residency.commands import arg_types
from residency.commands.console import make_console, working
from residency.commands.plan_render import render_comparison, render_plan, verdict
from residency.commands.sources import SHIPPED_NAME, resolve_workload, shipped_sensitivity
from residency.errors import ResidencyError, UsageError
from residency.formats.dtypes import KV_DTYPE_BYTES
from residency.plan.plan import COMPUTE_DTYPES, MAX_PLAN_BYTES
from residency.simulate.memory import GPU_WORKSPACE_BYTES
from residency.units import fmt_bytes, parse_size, size_at_least

EXIT_BUDGET_NOT_MET = 3


def add_parser(sub) -> None:
    """Register `residency plan MODEL --profile NAME [--fps|--frame-ms] [--vram] ...` on `sub`."""
    p = sub.add_parser("plan", help="plan residency and precision per block for a VRAM and frame-time budget",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="default (the shipped world model, as `run default` loads it), a catalog model (e.g. lucid-500m, "
                   "flux-schnell), a catalog .json, "
                   "a diffusers/transformers model directory (config.json) or a diffusers pipeline directory "
                   "(model_index.json: encode → denoise × steps → decode); weights not needed")
    p.add_argument("--profile", metavar="NAME|PATH",
                   help="shipped device profile (see `residency profiles`), a profile JSON, or `calibrated` "
                   "(this machine's cached profile as calibrated by `residency run --calibrate`); default: this "
                   "machine's, measured once in quick mode and cached, as `run` plans with")
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--fps", type=arg_types.FPS, metavar="N",
                       help="video frames per second to hold (a latent frame decodes to the model's video frames)")
    speed.add_argument("--frame-ms", type=arg_types.FRAME_MS, metavar="MS",
                       help="milliseconds per latent frame to hold")
    p.add_argument("--vram", type=arg_types.vram_size, metavar="SIZE",
                   help="device memory the plan may use, e.g. 6GiB, or a share of the model's weights at the "
                   "compute dtype, e.g. 50%% (default: the profile's usable memory)")
    p.add_argument("--steps", type=arg_types.bounded_int(1, 64, "denoise steps"), metavar="N",
                   help="denoise steps per latent frame (default: the model's)")
    arg_types.add_size_arguments(p, "what a model or pipeline directory is planned at (default: its pipeline's: "
                                 "Flux 1024×1024, Wan 480×832 and 81 frames, a UNet2DConditionModel its sample_size "
                                 "× 8, a bare UNet2DModel its sample_size)")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=None,
                   help="dtype the matmuls run in (default: bf16 for a GPU profile, fp32 for a CPU one, what "
                   "`residency run` computes in there)")
    p.add_argument("--kv-dtype", choices=tuple(KV_DTYPE_BYTES), default=None,
                   help="what a world model's KV cache is stored in (default: the planner's choice: the model's own "
                   "dtype, or fp8 where that plans better or nothing else fits)")
    p.add_argument("--exec-mode", choices=("auto", "auto+graphed", "eager", "compiled", "graphed"), default="auto",
                   help="how blocks run: auto (default: ours picks eager or compiled per block class where the "
                   "profile has the figures and a compile pays off), auto+graphed (also GPU graphs: simulated, the "
                   "runtime does not capture them yet), or eager, compiled (torch.compile) or graphed for every block")
    p.add_argument("--policy", default="ours", metavar="NAME", help="ours (default), a peer's name, or all")
    p.add_argument("--plan", metavar="PATH", help="predict this plan file (from `residency plan -o`, hand-edited or "
                   "not) for MODEL at --profile instead of planning; the file keeps its own budget, formats and modes")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("-o", "--output", metavar="PATH", help="write the plan as JSON (atomically)")
    p.set_defaults(run=run)


@dataclass(frozen=True)
class Outcome:
    """The chosen plan and, with --policy all, every policy's plan."""
    plan: object  # the chosen policy's Plan
    others: list  # (with --policy all) every policy's Plan, ours first




def make_request(args):
    """The PlanRequest the plan command's arguments describe (workload, profile, budget, host RAM).

    Raises UsageError for --steps outside 1..64, a bad --vram or `--profile calibrated` without a
    calibration of this machine's profile, and ResidencyError for an unknown model or profile.
    """
    from policies import PlanRequest
    from residency.device import CALIBRATED, profile_for
    from residency.device.calibrated import for_workload_fingerprint, resolve_cli_profile
    from residency.device.host_memory import host_memory
    from residency.front_door.vram import frame_budget_ms  # --fps/--frame-ms range-checked by argparse
    from residency.plan import Budget
    from residency.session_setup import cached_profile, compute_dtype_for, device_kind

    if args.steps is not None and not 1 <= args.steps <= 64:
        raise UsageError(f"--steps must be between 1 and 64, got {args.steps}", hint="e.g. --steps 4")
    size = arg_types.example_size(args)
    # A named profile is read first: its kind sets the default compute dtype, which the workload is built at.
    # "calibrated" is this machine's, found by the workload's fingerprint: its kind is this machine's; so is
    # none given, this machine's own profile, read (or measured, ~15 s) only once the model is known good.
    named = args.profile is not None and args.profile != CALIBRATED
    profile = resolve_cli_profile(args.profile) if named else None
    compute_dtype = args.compute_dtype or compute_dtype_for(
        profile.is_gpu if profile is not None else device_kind() != "cpu")
    with working(f"reading {args.model} (its forward is traced on the meta device: a minute for thousands of "
                 "layers)"):
        workload = resolve_workload(args.model, steps=args.steps, compute_dtype=compute_dtype, size=size)
    if args.profile is None:  # this machine's, as `run` plans with (measured once, its notes on stderr)
        profile = cached_profile(device_kind(), make_console(stderr=True))
    elif profile is None:
        # the shipped model starts from its own image; the catalog's world models need one given
        profile = profile_for(args.profile, workload.fingerprint(), model=args.model,
                              image=args.model != SHIPPED_NAME)
    else:  # a calibrated profile's file, given for another model: its rates, not that model's compute scales
        profile = for_workload_fingerprint(profile, workload.fingerprint(), make_console(stderr=True).print)
    vram = (arg_types.resolve_vram(args.vram, workload, compute_dtype, GPU_WORKSPACE_BYTES if profile.is_gpu else 0)
            if args.vram else profile.memory_usable_bytes)
    if vram > MAX_PLAN_BYTES and getattr(args, "output", None) is not None:  # planned, then refused by the writer
        raise UsageError(f"--vram {fmt_bytes(vram)}: a plan file holds a budget of at most 8 PiB (2**53 bytes), "
                         "every size exact as a JSON number", hint="give a smaller --vram (no device has more), or leave -o out")
    if vram > profile.memory_usable_bytes:
        _note_vram_beyond_the_device(vram, profile)
    budget = Budget(vram, frame_budget_ms(args.fps, args.frame_ms, workload.video_frames_per_latent))
    return PlanRequest(workload, profile, budget, host_bytes_available=host_memory().available_bytes,
                       sensitivity=shipped_sensitivity(args.model),
                       compute_dtype=compute_dtype, exec_mode=getattr(args, "exec_mode", "auto"),
                       kv_dtype=getattr(args, "kv_dtype", None))



def _note_vram_beyond_the_device(vram: int, profile) -> None:
    """A --vram above what the profile's device has is planned for as asked (a what-if), and said so: "fits"
    then means fits the budget, not the card."""

    print(f"note: --vram {fmt_bytes(vram)} is more than {profile.name} has to use ("
          f"{fmt_bytes(profile.memory_usable_bytes)} of {fmt_bytes(profile.memory_total_bytes)}): planned for "
          f"{fmt_bytes(vram)} as asked; a plan that fits it may not fit the device", file=sys.stderr)


def _check_plan_output(path: str | None):
    """The -o path checked before planning (Flux plans for seconds): a file name in a writable directory."""
    if path is None:
        return None
    if not path.strip():
        raise UsageError("-o needs a file name, got an empty one", hint="e.g. -o plan.json")
    if path == "-":
        raise UsageError("-o - would write a file named '-'", hint="--json prints the plan on stdout")
    from residency.media import check_writable_target

    return check_writable_target(path, ".json", "plan.json")


# re-plans of a peer at the budget its last plan needed, then halvings of the gap to its all-resident plan's
FIT_SEARCH_STEPS = 12


def fitting_vram(policy, req, plan) -> str:
    """What to tell a user whose `policy` plan does not fit: "give --vram X or more" with an X the policy's plan was
    seen to fit as written (the size rounded up is the budget tried), or "give --vram more than X" when none was
    found. A peer keeps more resident when given more (forge at 60 % of default needed 20.3 MiB, at 20.3 MiB 25.8), so
    its plan's peak is no such budget. Re-planned at each plan's peak; a peer whose peak grows a step per budget
    (ComfyUI's partial loading) then gets a bisection up to its all-resident peak. Not for ours, whose least-memory
    plan fits its own peak. Cost: a peer's planning per step (tens of ms)."""
    from policies import get_policy

    def fits_at(shown: str) -> tuple[bool, int]:
        budget = parse_size(shown)
        need = policy(replace(req, budget=replace(req.budget, vram_bytes=budget))).prediction.peak_total_bytes
        return need <= budget, need

    shown = size_at_least(plan.prediction.peak_total_bytes)
    for _ in range(FIT_SEARCH_STEPS):
        ok, need = fits_at(shown)
        if ok:
            return f"give --vram {shown} or more"
        shown = size_at_least(max(need, parse_size(shown) + 1))
    lo = parse_size(shown)  # not yet tried
    found = size_at_least(max(lo, get_policy("all-resident")(req).prediction.peak_total_bytes))
    if not fits_at(found)[0]:
        return f"give --vram more than {shown}"
    for _ in range(FIT_SEARCH_STEPS):  # the smallest budget seen to fit, between lo and found
        if lo >= parse_size(found):
            break
        mid = size_at_least(lo + (parse_size(found) - lo) // 2)
        if fits_at(mid)[0]:
            found = mid
        else:
            lo = parse_size(mid) + 1
    return f"give --vram {found} or more"


def run(args) -> int:
    """Plan with the chosen policy (or all of them), print or save the result; returns 0.

    Raises UsageError for an unknown policy or an empty -o, ResidencyError for an -o that cannot be written, both
    before any work is done.
    """
    from policies import get_policy, registry

    if args.policy != "all":
        try:
            get_policy(args.policy)  # an unknown name is a usage error (exit 2) before any work
        except ResidencyError as e:
            raise UsageError(e.message, hint=f"{e.hint}, or all (every policy side by side)") from None
    _check_plan_output(args.output)
    if args.plan is not None:  # a plan file predicted here, not planned (residency.commands.plan_check)
        from residency.commands.plan_check import predicted_plan_file

        req, chosen = predicted_plan_file(args, make_request)
        plans = [chosen]
    else:
        req = make_request(args)
        with working(f"planning {len(req.workload.blocks)} blocks"):
            if args.policy == "all":
                plans = [fn(req) for fn in registry().values()]
                chosen = plans[0]
            else:
                chosen = get_policy(args.policy)(req)
                plans = [chosen]
    if args.output is not None:
        from residency.plan import save_plan

        save_plan(chosen, args.output)
    give = None
    if args.plan is not None and chosen.prediction is not None and \
            chosen.prediction.peak_total_bytes > chosen.budget.vram_bytes:  # --vram is refused with --plan: the file's
        need = chosen.prediction.peak_total_bytes
        give = (f"set budget.vram_bytes in {args.plan} to {need} ({fmt_bytes(need)}) or more, or plan anew with "
                f"--vram {size_at_least(need)}")
    if chosen.policy != "ours" and args.plan is None and chosen.prediction is not None and \
            chosen.prediction.peak_total_bytes > req.budget.vram_bytes:
        with working("finding the VRAM it fits"):
            give = fitting_vram(get_policy(chosen.policy), req, chosen)
    if args.json:
        from rich.text import Text

        from residency.plan import plan_to_dict

        doc = plan_to_dict(chosen)
        doc["holds_budget"] = chosen.holds_budget
        # what the table's verdict line says (why exit 3: needs how much, or how far off the frame budget)
        doc["verdict"] = Text.from_markup(verdict(chosen, req.workload.frame_unit(), give)).plain
        if len(plans) > 1:
            doc["policies"] = {p.policy if i else "ours": plan_to_dict(p) for i, p in enumerate(plans)}
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        console = make_console()
        shipped = args.model == SHIPPED_NAME  # its workload is named after its config (game-64), not `default`
        render_plan(console, req.workload, chosen, req.profile,
                    f"{chosen.model} (the shipped model, `{SHIPPED_NAME}`)" if shipped else None, give)
        if len(plans) > 1:
            render_comparison(console, plans, req)
        if any(bp.exec_mode == "compiled" for bp in chosen.blocks):
            # run/play/demo and attach() plan for themselves eager (their first frame comes without compiling): a
            # user comparing this prediction with theirs must be told where the difference comes from
            console.print("note: `run`, `play`, `demo` and residency.attach plan eager for themselves (no compile "
                          "before the first frame), so they predict more than this; to run these compiled blocks, "
                          "save this plan with -o and give it to them (--plan FILE, attach(plan=FILE))",
                          markup=False, highlight=False)
        if args.output:
            console.print(f"plan written to [bold]{args.output}[/bold]")
    return 0 if chosen.holds_budget else EXIT_BUDGET_NOT_MET
