"""Any nn.Module, recovered by retrying the model's call: a budget cut or an out-of-memory mid-forward re-plans
and calls again (exactly, noise included), a call that changed state is re-planned for but not run twice, and
set_budget takes sizes and shares."""

from __future__ import annotations

import pytest
import torch
from sim_helpers import flat_profile
from test_runtime_any_model import (
    PROFILE,
    Residual,
    W,
    X,
    _call,
    _held_bytes,
    _run_fresh,
    make_plan,
    small_plan,
)
from test_runtime_recovery import _cut_at

from residency.errors import ResidencyError
from residency.plan import Budget
from residency.runtime import DeviceBudgetExceeded, Runtime
from residency.runtime.hooks import has_hook

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def test_a_budget_cut_mid_forward_replans_retries_the_call_and_matches_the_new_plan():
    big = make_plan(W)
    cut = (_held_bytes(big) + _held_bytes(small_plan(Budget(2**26), PROFILE))) // 2
    inputs = [X, 2 * X, 3 * X]
    expected = _run_fresh(small_plan(Budget(cut), PROFILE), inputs[1:])
    before_cut = _run_fresh(big, inputs[1:2])
    asked = []

    def replan(budget, profile):
        asked.append((budget, profile))
        return small_plan(budget, profile)

    model = Residual()
    rt = Runtime(big, "cpu", workload=W, replan=replan, profile=PROFILE).attach(model)
    first = _call(model, inputs[0])
    handle = _cut_at(model.blocks[1], 1, lambda: rt.set_budget(cut))  # mid-call: blocks.2 will not fit
    got = [_call(model, x) for x in inputs[1:]]
    handle.remove()
    plan, held = rt.plan, rt.ledger.total_bytes
    rt.detach()
    assert asked == [(Budget(cut, None), PROFILE)]
    assert rt.recoveries == [("DeviceBudgetExceeded", cut)]
    assert plan.streamed() and held <= cut
    assert torch.equal(first, _run_fresh(big, inputs[:1])[0])
    assert not torch.equal(got[0], before_cut[0])  # Q8_0 computes other numbers than F32: the test can fail
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_an_out_of_memory_mid_forward_shrinks_the_budget_and_retries_the_call():
    big = make_plan(W)
    model = Residual()
    rt = Runtime(big, "cpu", workload=W, replan=small_plan, profile=PROFILE).attach(model)
    held = rt.ledger.total_bytes

    def oom():
        raise torch.OutOfMemoryError("injected: the device is full")
    handle = _cut_at(model.blocks[2], 1, oom)
    got = _call(model)
    handle.remove()
    rt.detach()
    assert rt.recoveries == [("OutOfMemoryError", int(held * 0.9))]
    assert torch.equal(got, _run_fresh(small_plan(Budget(int(held * 0.9)), PROFILE), [X])[0])


class _Counting(Residual):
    """Residual with what a forward may change before it runs out of memory: a step-counter buffer bumped in
    place, the caller's input scaled in place, or an object argument (a cache) it may update."""

    def __init__(self, effect: str):
        super().__init__()
        self.effect = effect
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x, cache=None, generator=None):
        if generator is not None:
            x = x + 0.1 * torch.randn(x.shape, generator=generator)
        if self.effect == "buffer":
            self.steps += 1
        elif self.effect == "input":
            x.mul_(1.0)
        elif cache is not None:
            cache.seen.append(len(cache.seen))
        return super().forward(x)


class _Cache:
    def __init__(self):
        self.seen = []


@pytest.mark.parametrize("effect, said", [("buffer", "the model's buffer steps was changed in place"),
                                          ("input", "argument 'x' was changed in place"),
                                          ("object", "argument 'cache' is a _Cache, an object the call may")])
def test_an_out_of_memory_after_the_forward_changed_state_replans_but_does_not_run_the_call_twice(effect, said):
    """A retry ran the whole forward again: a generate() loop's cache took some layers' keys twice, a counter
    counted twice. Re-planned, the call is refused instead, and the next one runs under the new plan."""
    big = make_plan(W)
    model = _Counting(effect)
    rt = Runtime(big, "cpu", workload=W, replan=small_plan, profile=PROFILE).attach(model)
    held = rt.ledger.total_bytes

    def oom():
        raise torch.OutOfMemoryError("injected: the device is full")
    handle = _cut_at(model.blocks[2], 1, oom)
    cache = _Cache()
    with torch.no_grad(), pytest.raises(ResidencyError, match=said) as info:
        model(X.clone(), cache=cache if effect == "object" else None)
    handle.remove()
    assert "was not run again" in str(info.value) and "run it again from the prompt" in info.value.hint
    assert rt.recoveries == [("OutOfMemoryError", int(held * 0.9))]
    assert float(model.steps) == (1.0 if effect == "buffer" else 0.0) and len(cache.seen) == (effect == "object")
    got = _call(model)  # the next call: under the re-made plan, once
    rt.detach()
    assert torch.equal(got, _run_fresh(small_plan(Budget(int(held * 0.9)), PROFILE), [X])[0])


def test_an_out_of_memory_in_a_forward_that_changed_nothing_is_still_retried_with_plain_arguments():
    """Tensors, numbers, strings and None in tuples, lists and dicts: all seen into, so the retry runs."""
    big = make_plan(W)
    model = _Counting("object")
    rt = Runtime(big, "cpu", workload=W, replan=small_plan, profile=PROFILE).attach(model)

    def oom():
        raise torch.OutOfMemoryError("injected: the device is full")
    handle = _cut_at(model.blocks[2], 1, oom)
    with torch.no_grad():
        got = model(X, cache=None)
    handle.remove()
    rt.detach()
    assert len(rt.recoveries) == 1
    assert torch.equal(got, _run_fresh(small_plan(Budget(rt.recoveries[0][1]), PROFILE), [X])[0])


def test_a_retried_call_draws_the_same_noise_from_its_generator_argument():
    """The attempt drew from the generator before it ran out of memory: the retry starts it where the call did."""
    model = _Counting("none")
    rt = Runtime(make_plan(W), "cpu", workload=W, replan=small_plan, profile=PROFILE).attach(model)

    def oom():
        raise torch.OutOfMemoryError("injected: the device is full")
    handle = _cut_at(model.blocks[2], 1, oom)
    with torch.no_grad():
        retried = model(X, generator=torch.Generator().manual_seed(7))
        handle.remove()
        again = model(X, generator=torch.Generator().manual_seed(7))  # under the same new plan, no failure
    rt.detach()
    assert len(rt.recoveries) == 1 and torch.equal(retried, again)


@pytest.mark.parametrize("bad", [-5, 0, 1.5, True, "lots", None, "50", "12.5", "1e3", " 6 "])
def test_set_budget_refuses_what_is_no_budget_and_takes_a_size(bad):
    """-5, 0 and 1.5 were taken as budgets; "1GiB" raised a bare ValueError. A string without a unit ("50", "12.5")
    was 50 or 12 bytes, and the next call let go of the model; attach(vram="50") refuses it."""
    model = Residual()
    rt = Runtime(make_plan(W), "cpu", workload=W).attach(model)
    try:
        before = rt.ledger.budget_bytes
        with pytest.raises(ResidencyError, match=r"set_budget|budget"):
            rt.set_budget(bad)
        assert rt.ledger.budget_bytes == before
        rt.set_budget("1GiB")
        assert rt.ledger.budget_bytes == 2**30
        rt.set_budget("50%")  # of the weights at the plan's compute dtype, as attach(vram="50%") reads it
        assert rt.ledger.budget_bytes == W.nbytes("F32") // 2
    finally:
        rt.detach()


def test_set_budget_says_a_number_without_a_unit_has_none_in_its_own_words():
    rt = Runtime(make_plan(W), "cpu", workload=W).attach(Residual())
    try:
        with pytest.raises(ResidencyError) as e:
            rt.set_budget("12")
        assert str(e.value).splitlines() == ["set_budget('12') has no unit",
                                             'hint: did you mean set_budget("12GiB")? (bytes are an int: '
                                             'set_budget(12))']
    finally:
        rt.detach()


def test_after_no_plan_fitted_a_cut_set_budget_sets_what_the_next_attach_holds():
    """The 1-byte budget of the cut stayed, and set_budget on the let-go runtime was refused or silent: the runtime
    could not be attached again."""
    model = Residual()
    expected = _call(model)
    rt = Runtime(make_plan(W), "cpu", workload=W, replan=small_plan, profile=PROFILE).attach(model)
    rt.set_budget(1)
    with pytest.raises(DeviceBudgetExceeded, match="no plan fits"):
        _call(model)
    assert rt.pipeline is None and not rt.attached and rt.budget_bytes == 1
    with pytest.raises(DeviceBudgetExceeded):
        rt.attach(model)  # still the budget of the cut
    rt.set_budget("1GiB")
    rt.attach(model)
    try:
        assert rt.attached and rt.budget_bytes == 2**30 and torch.equal(_call(model), expected)
    finally:
        rt.detach()


def test_without_a_replan_callable_a_cut_raises_from_the_models_call():
    model = Residual()
    rt = Runtime(make_plan(W), "cpu", workload=W).attach(model)
    rt.set_budget(rt.ledger.total_bytes - 1)
    with pytest.raises(DeviceBudgetExceeded, match="budget cut"):
        _call(model)
    rt.detach()
    assert not any(has_hook(m) for m in model.modules())


def test_when_no_plan_fits_the_model_is_left_plain():
    model = Residual()
    expected = _call(model)
    rt = Runtime(make_plan(W), "cpu", workload=W, replan=small_plan, profile=PROFILE).attach(model)
    rt.set_budget(2**10)  # below any plan's slots and scratch
    with pytest.raises(DeviceBudgetExceeded, match="no plan fits"):
        _call(model)
    assert rt.pipeline is None and not any(has_hook(m) or "forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_call(model), expected)


def test_replan_needs_the_profile_the_plan_was_made_for():
    with pytest.raises(ResidencyError, match="needs the profile"):
        Runtime(make_plan(W), "cpu", workload=W, replan=small_plan)
    other = flat_profile(backend="cpu", link_gbps=3.0)
    with pytest.raises(ResidencyError, match="made for profile"):
        Runtime(make_plan(W), "cpu", workload=W, replan=small_plan, profile=other)


def test_a_cut_set_while_detached_is_planned_for_at_the_next_attach():
    """Set between detach and attach, a cut the plan did not fit was refused at attach (DeviceBudgetExceeded), where the
    same cut after the first call re-planned and ran."""
    model = Residual()
    big = make_plan(W)
    cut = (_held_bytes(big) + _held_bytes(small_plan(Budget(2**26), PROFILE))) // 2
    expected = _run_fresh(small_plan(Budget(cut), PROFILE), [X])
    rt = Runtime(big, "cpu", workload=W, replan=small_plan, profile=PROFILE)
    rt.set_budget(cut)
    rt.attach(model)
    try:
        assert rt.plan.budget.vram_bytes == cut and rt.ledger.peak_total_bytes <= cut
        assert torch.equal(_call(model, X), expected[0])
    finally:
        rt.detach()
    without = Runtime(big, "cpu", workload=W)  # no replan callable: the plan as given, refused
    without.set_budget(cut)
    with pytest.raises(DeviceBudgetExceeded):
        without.attach(model)


def test_a_cut_made_between_calls_is_planned_for_before_a_call_that_changes_its_arguments():
    """set_budget between two generate() steps: the next call found the cut at its first block, re-planned, and was
    refused as "not run again" for its KV cache, which nothing had touched yet. Planned for before it runs, it runs
    once, under the new plan."""
    big = make_plan(W)
    model = _Counting("object")
    rt = Runtime(big, "cpu", workload=W, replan=small_plan, profile=PROFILE).attach(model)
    held = rt.ledger.total_bytes
    rt.set_budget(int(held * 0.9))
    cache = _Cache()
    with torch.no_grad():
        got = model(X.clone(), cache=cache)
    rt.detach()
    assert rt.recoveries == [("DeviceBudgetExceeded", int(held * 0.9))] and cache.seen == [0]
    assert torch.equal(got, _run_fresh(small_plan(Budget(int(held * 0.9)), PROFILE), [X])[0])
