"""A plan file given to run or play: its prediction made again here, so the figures compared are this plan's."""

from __future__ import annotations

from residency.units import fmt_bytes


def predicted_here(model, plan, device, path: str, console):
    """A loaded plan with the prediction made here for its profile (one simulation), said where the file held none
    (left out, or dropped as the plan was edited since written) or another: a file without its digest, or with only
    its prediction edited, kept figures that were not this plan's ("+63 %" against a prediction of the plan before
    its blocks were edited, and advice to calibrate)."""
    from residency.simulate import predict

    fresh = predict(model.workload, plan, device, model.sensitivity, bound=False)
    said = plan.prediction
    if said is None:
        console.print(f"note: {path} holds no prediction of the plan as it is (left out, or the plan was edited "
                      f"since `residency plan` wrote it): predicted here for {plan.profile}", markup=False,
                      highlight=False)
    elif (abs(said.frame_ms - fresh.prediction.frame_ms) > 1e-3 * fresh.prediction.frame_ms
          or said.peak_total_bytes != fresh.prediction.peak_total_bytes):
        console.print(f"note: the prediction in {path} ({said.frame_ms:.2f} ms per latent frame, "
                      f"{fmt_bytes(said.peak_total_bytes)}) is not this plan's as it is (edited, or written by another "
                      f"version of residency): predicted here for {plan.profile}: {fresh.prediction.frame_ms:.2f} ms, "
                      f"{fmt_bytes(fresh.prediction.peak_total_bytes)}", markup=False, highlight=False)
    else:
        return plan  # the file's own figures (its lower bound too)
    return fresh
