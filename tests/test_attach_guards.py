"""What residency.attach guards a user's model against: calls from several threads run one at a time; a model's own
parameters stay resident; bad budgets, a missing GPU, training mode and budgets no plan holds are said, not silently
taken. (Autograd: tests/test_attach_autograd.py.)"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from sim_helpers import flat_profile
from torch import nn

import residency
from residency.errors import InferenceOnlyWarning, PlanWarning, ResidencyError

pytestmark = pytest.mark.usefixtures("one_compute_thread")

def mlp_stack() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(6)]
    return nn.Sequential(*layers).eval(), torch.randn(4, 64)


def attach(model, x, vram="40%"):
    return residency.attach(model, vram=vram, profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x)


def test_calls_from_several_threads_each_get_their_own_output():
    model, x = mlp_stack()
    with torch.inference_mode():
        expected = model(x)
    results: list[torch.Tensor] = []
    with attach(model, x) as rt, torch.inference_mode():
        assert rt.plan.streamed()

        def worker() -> None:
            with torch.inference_mode():
                results.extend(model(x) for _ in range(5))

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 15 and all(torch.equal(r, expected) for r in results)


class ClassToken(nn.Module):
    """A root parameter read in the model's own forward (a ViT's class token): its block encloses the layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.pos = nn.Parameter(torch.randn(1, 8, 64))
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
                                    for _ in range(6))

    def forward(self, x):
        x = x + self.pos
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("vram", ["90%", "50%", "30%"])
def test_a_models_own_parameter_stays_resident_while_its_layers_stream(vram):
    from pathlib import Path

    model, x = ClassToken().eval(), torch.randn(2, 8, 64)
    with torch.inference_mode():
        expected = model(x)
    measured = Path(__file__).parent / "data" / "measured-cpu-2-cores.json"  # streams the loose block if let
    with residency.attach(model, vram=vram, profile=measured, backend="cpu", example_inputs=x) as rt, \
            torch.inference_mode():
        loose = rt.plan.by_name["ClassToken.loose"]
        assert (loose.placement, loose.lifetime) == ("resident", "session") and rt.plan.streamed()
        assert torch.equal(model(x), expected)


def test_vram_as_a_bare_number_string_asks_for_a_unit():
    from residency.errors import ResidencyError

    model, x = mlp_stack()
    with pytest.raises(ResidencyError, match="has no unit") as err:
        attach(model, x, vram="12")
    assert 'vram="12GiB"' in err.value.hint


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_backend_cuda_without_a_gpu_says_so_before_measuring_anything():
    from residency.errors import ResidencyError

    model, x = mlp_stack()
    with pytest.raises(ResidencyError, match="torch sees no CUDA or ROCm GPU") as err:
        residency.attach(model, vram="50%", backend="cuda", example_inputs=x)
    assert 'backend="cpu"' in err.value.hint


def test_a_time_budget_no_plan_holds_is_warned_and_a_model_in_training_mode_too():
    from residency.errors import PlanWarning

    model, x = mlp_stack()
    with pytest.warns(PlanWarning, match="misses the time budget"), residency.attach(
            model, vram="50%", frame_ms=1e-6, profile=flat_profile(backend="cpu"), backend="cpu",
            example_inputs=x):
        pass
    bn = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 64))  # nn.Module starts in training
    with pytest.warns(InferenceOnlyWarning, match=r"training mode: the running statistics of 1 .*model.eval\(\)"), \
            residency.attach(bn, vram="100%", profile=flat_profile(backend="cpu"), backend="cpu",
                             example_inputs=torch.randn(4, 64)):
        pass
    dropout = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Dropout(0.1)) for _ in range(3)])
    with pytest.warns(InferenceOnlyWarning, match=r"training mode: 0.1 and 2 more dropouts drop activations"), \
            residency.attach(dropout, vram="100%", profile=flat_profile(backend="cpu"), backend="cpu",
                             example_inputs=torch.randn(4, 64)):
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("error", InferenceOnlyWarning)
        residency.attach(dropout.eval(), vram="100%", profile=flat_profile(backend="cpu"), backend="cpu",
                         example_inputs=torch.randn(4, 64)).detach()


def test_a_budget_too_small_names_what_the_smallest_plan_holds():
    from residency.errors import ResidencyError

    model, x = mlp_stack()
    with pytest.raises(ResidencyError, match=r"the smallest plan found needs [\d.]+ \w+ \(\w+ [\d.]+ \w+, "):
        attach(model, x, vram=64)


def test_state_dict_while_attached_is_the_models_own_and_no_hook_is_left():
    model, x = mlp_stack()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with attach(model, x, vram="30%") as rt, torch.inference_mode():
        assert rt.plan.streamed()
        model(x)  # slots now hold the last streamed block's weights
        for state in (model.state_dict(), {f"3.{k}": v for k, v in model[3].state_dict().items()}):
            for key, value in state.items():
                assert torch.equal(value, expected[key]), key
    assert not any(m._state_dict_hooks for m in model.modules())


def test_an_integer_example_reaching_a_float_layer_is_refused_at_attach_not_at_the_first_call():
    # the meta count does not check dtypes: attach planned int64 inputs into a float32 Linear and the user's first
    # call failed with torch's "mat1 and mat2 must have the same dtype"
    from residency.errors import ResidencyError

    model, x = mlp_stack()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "hook with always_call raised … pop from empty list" was shown too
        with pytest.raises(ResidencyError, match=r"\(Linear\) gets its input as torch.int64, its weight is "
                                                 r"torch.float32"):
            attach(model, x.long())
    # floats of another dtype: said at attach (the first call failed with torch's words), not refused: under
    # torch.autocast, which attach cannot see, the model takes them
    with pytest.warns(PlanWarning, match=r"0.0 \(Linear\) gets its input as torch.bfloat16, its weight is "
                                         r"torch.float32: outside torch.autocast the model refuses"):
        rt = attach(model, x.bfloat16())
    with rt, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x.bfloat16()).dtype == torch.bfloat16
    embed = nn.Sequential(nn.Embedding(50, 64), *[nn.Linear(64, 64) for _ in range(3)]).eval()
    with attach(embed, torch.arange(8).reshape(2, 4)) as rt:  # token ids into an embedding: as the model takes them
        assert rt.plan.blocks


class CastsItsInput(nn.Module):
    """A float64 example is the model's to cast: on meta the input is already in the compute dtype, so the cast is
    the same tensor there (a check by identity refused this model)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.layers[0].weight.dtype)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_a_model_that_casts_its_own_input_attaches_with_an_example_in_another_dtype():
    torch.manual_seed(0)
    model, x = CastsItsInput().eval(), torch.randn(2, 64, dtype=torch.float64)
    expected = model(x)
    with attach(model, x) as rt, torch.inference_mode():
        assert torch.equal(model(x), expected) and rt.plan.blocks


def test_a_numpy_example_and_a_lone_layer_are_refused_with_what_to_give():
    import numpy as np

    from residency.errors import ResidencyError

    model, _ = mlp_stack()
    with pytest.raises(ResidencyError, match="example_inputs is a ndarray") as err:
        attach(model, np.zeros((4, 64), np.float32))
    assert "torch.from_numpy" in err.value.hint
    with pytest.raises(ResidencyError, match="example_inputs is an int"):
        attach(model, 3)
    with pytest.raises(ResidencyError, match=r"example_inputs\[0\] is a numpy array"):
        attach(model, (np.zeros((4, 64), np.float32),))
    with pytest.raises(ResidencyError, match=r"a single layer \(Linear\) is one block"):
        attach(nn.Linear(64, 64), torch.zeros(4, 64), vram="100%")


def test_a_shallow_copy_while_attached_is_refused_and_works_after_detach():
    """copy.copy copied the instance's attributes: the copy kept the original's forward wrapper and hook, drove the
    original's runtime, and could never be attached itself."""
    import copy

    model, x = mlp_stack()
    with attach(model, x):
        with pytest.raises(ResidencyError, match=r"pickling a model attached to residency \(torch.save\(model\), "
                                                 r"copy.copy\)"):
            copy.copy(model)
    shallow = copy.copy(model)
    assert "forward" not in shallow.__dict__ and "__reduce_ex__" not in shallow.__dict__
    with attach(shallow, x), torch.inference_mode():
        shallow(x)


def test_a_deepcopy_while_attached_is_refused_with_what_to_do_and_works_after_detach():
    import copy

    from residency.errors import ResidencyError

    model, x = mlp_stack()
    with attach(model, x) as rt, torch.inference_mode():
        assert rt.plan.streamed()
        expected = model(x)
        for target in (model, model[2]):  # the root and a streamed block each carry a hook
            with pytest.raises(ResidencyError, match="copy.deepcopy of a model attached") as err:
                copy.deepcopy(target)
            assert "detach()" in err.value.hint
        assert torch.equal(model(x), expected)  # the refused copy changed nothing
    with torch.inference_mode():
        assert torch.equal(copy.deepcopy(model)(x), expected)


def test_keep_vars_gives_the_original_weights_and_a_load_while_attached_is_refused():
    from residency.errors import ResidencyError

    model, x = mlp_stack()
    with attach(model, x) as rt, torch.inference_mode():
        assert rt.plan.streamed()
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        kept = model.state_dict(keep_vars=True)
        assert all(torch.equal(kept[k], v) for k, v in expected.items())  # the weights, not the slots
        assert isinstance(kept["0.0.weight"], nn.Parameter)
        with pytest.raises(ResidencyError, match="load_state_dict into .* while a runtime is attached"):
            model.load_state_dict(model.state_dict())
        part = model[0]  # a module owning no block tensor itself: the refusal names it, not its first child
        with pytest.raises(ResidencyError, match=f"load_state_dict into {type(part).__name__} while"):
            part.load_state_dict(part.state_dict())
    model.load_state_dict(model.state_dict())  # detached: as usual
    assert not any(m._load_state_dict_pre_hooks for m in model.modules())


def test_detach_from_another_thread_waits_for_the_running_call():
    model, x = mlp_stack()
    rt = attach(model, x)
    errors: list[BaseException] = []

    def calls() -> None:
        try:
            with torch.inference_mode():
                for _ in range(20):
                    model(x)
        except BaseException as e:  # before the lock: an AttributeError on the stopped executor
            errors.append(e)

    t = threading.Thread(target=calls)
    t.start()
    rt.detach()
    t.join()
    assert errors == []


def test_a_library_error_shows_its_hint_in_a_traceback():
    from residency.errors import ResidencyError

    err = ResidencyError("vram='12' has no unit", hint='did you mean vram="12GiB"?')
    assert str(err).splitlines() == ["vram='12' has no unit", 'hint: did you mean vram="12GiB"?']
    assert str(ResidencyError("no hint")) == "no hint"


def test_torch_compile_of_an_attached_model_runs_the_hooked_calls_eagerly_and_gives_the_same_outputs():
    import torch._dynamo

    model, x = mlp_stack()
    model[2][0].register_forward_pre_hook(lambda m, args: None)  # one block through torch's hook path too
    with torch.inference_mode():
        expected = model(x)
    torch._dynamo.reset()
    with attach(model, x, vram="30%") as rt, torch.inference_mode():
        assert rt.plan.streamed()
        compiled = torch.compile(model, backend="eager")  # dynamo traces; the backend only runs the graphs
        for _ in range(3):  # the second call used to fail inside the runtime's telemetry
            assert torch.equal(compiled(x), expected)
    torch._dynamo.reset()


def test_conversions_while_attached_are_refused_and_allowed_again_after_detach():
    from residency.errors import ResidencyError

    model, x = mlp_stack()
    with attach(model, x) as rt, torch.inference_mode():
        expected = model(x)
        for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m[1].double()):
            with pytest.raises(ResidencyError, match=r"a dtype or device conversion of \w+ \(\.to\(\), \.half\(\), "
                                                     r"\.float\(\), \.cuda\(\), …\) while a runtime is attached"):
                convert(model)
        assert torch.equal(model(x), expected) and rt.plan.streamed()  # nothing was converted
        assert model.to("cpu") is model and model.float() is model  # a conversion that changes nothing is fine
    assert not any("_apply" in m.__dict__ for m in model.modules())
    assert model.to(torch.bfloat16)[0][0].weight.dtype == torch.bfloat16


def test_attaching_an_attached_model_is_refused_before_planning_and_a_budget_beside_a_plan_is_warned():
    from residency.errors import ResidencyError

    model, x = mlp_stack()
    with attach(model, x) as rt:
        with pytest.raises(ResidencyError, match="attached to a runtime already"):
            attach(model, x[:2])  # other shapes: refused for what it is, not for the call's shapes
        plan = rt.plan
    from residency.errors import PlanWarning

    with pytest.warns(PlanWarning, match=r"plan= runs as given, with its own budget .*: vram= ignored"):
        residency.attach(model, plan=plan, vram="10%", profile=flat_profile(backend="cpu"), backend="cpu",
                         example_inputs=x).detach()
    # a plan whose blocks its own budget cannot hold: the hint said "raise the budget", which vram= does not do
    import dataclasses

    resident = dataclasses.replace(plan, prediction=None, blocks=tuple(dataclasses.replace(
        b, placement="resident") for b in plan.blocks))
    with pytest.warns(PlanWarning), pytest.raises(residency.BudgetError, match=r"plan= does not fit its own budget "
                                                  r"\([^)]*, plan\.budget\.vram_bytes\)") as err:
        residency.attach(model, plan=resident, vram="400%", profile=flat_profile(backend="cpu"), backend="cpu",
                         example_inputs=x)
    assert err.value.hint.startswith("vram= does not change a given plan's budget")
    from residency.runtime.hooks import has_hook

    assert not any(has_hook(m) for m in model.modules())  # left as it was


def test_pickling_an_attached_model_is_refused_with_what_to_save_instead():
    import io

    from residency.errors import ResidencyError

    model, x = mlp_stack()
    model[2].register_forward_pre_hook(print)  # one block through torch's hook path: its hooks are ours too
    with attach(model, x):
        for target in (model, model[2]):
            with pytest.raises(ResidencyError, match="pickling a model attached to residency"):
                torch.save(target, io.BytesIO())
        with pytest.raises(ResidencyError, match="pickling a model attached to residency") as err:
            torch.save(model, io.BytesIO())
        assert "state_dict()" in err.value.hint
        torch.save(model.state_dict(), io.BytesIO())  # the original weights: fine while attached
    torch.save(model, io.BytesIO())  # detached: as usual


class NormedMLP(nn.Module):
    def __init__(self, d: int = 256) -> None:
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


@pytest.mark.parametrize("share", ["14%", "10%"])
def test_the_need_a_no_fit_error_quotes_is_a_budget_that_fits(share):
    """Where nothing fits, the planner's answer may be packed, its dequant scratch (2.51 MiB) more than plain
    streaming needs in all (2.02 MiB): the error quotes the least, and that budget then plans."""
    import re

    from residency.errors import ResidencyError

    torch.manual_seed(0)
    model, x = nn.Sequential(*[NormedMLP() for _ in range(6)], nn.Linear(256, 256)).eval(), torch.randn(2, 256)
    with pytest.raises(ResidencyError, match="the smallest plan found needs") as err:
        attach(model, x, vram=share)
    size, unit = re.search(r"the smallest plan found needs ([\d.]+) (\w+)", str(err.value)).groups()
    quoted = f"{float(size) * 1.005:.3f}{unit}"  # the figure is rounded for print
    with pytest.raises(ResidencyError, match="the smallest plan found needs"):
        attach(model, x, vram=f"{float(size) * 0.98:.3f}{unit}")  # it is the least: 2 % under fits nothing
    with attach(model, x, vram=quoted) as rt, torch.inference_mode():
        assert rt.plan.prediction.peak_total_bytes <= rt.plan.budget.vram_bytes
        model(x)


def test_entering_a_detached_runtime_is_refused():
    model, x = mlp_stack()
    with attach(model, x) as rt:
        pass
    with pytest.raises(ResidencyError, match="not attached"), rt:
        pass


def test_a_budget_beyond_the_device_is_planned_as_asked_and_said_so():
    model, x = mlp_stack()
    profile = flat_profile(backend="cpu", memory_bytes=2**30)
    with pytest.warns(PlanWarning, match=r"vram 2.00 GiB is more than flat has to use \(1.00 GiB\)"):
        rt = residency.attach(model, vram="2GiB", profile=profile, backend="cpu", example_inputs=x)
    assert rt.plan.budget.vram_bytes == 2**31
    rt.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlanWarning)
        residency.attach(model, vram="512MiB", profile=profile, backend="cpu", example_inputs=x).detach()


def test_an_example_with_no_elements_is_refused_at_attach():
    model, x = mlp_stack()
    with pytest.raises(ResidencyError, match=r"has no elements \(shape \(0, 64\)\)"):
        residency.attach(model, vram="100%", profile=flat_profile(backend="cpu"), backend="cpu", example_inputs=x[:0])
    assert not any(m._forward_pre_hooks for m in model.modules())


class TakesAWeight(nn.Module):
    """A forward that multiplies by a matrix it is given: a caller may hand it one of the model's own weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(6))

    def forward(self, x, w):
        for layer in self.layers:
            x = layer(x)
        return x @ w


def test_a_call_given_one_of_its_streamed_weights_is_refused_naming_it_and_a_copy_runs():
    """The weight of a streamed block points at a slot the ring refills: passed in as an argument (itself, a view,
    its .detach() or .data taken while attached) it held another block's values (outputs off by 5, no error). A view
    taken before attaching lives in the model's own storage: it holds the right values, and runs."""
    model, x = TakesAWeight().eval(), torch.randn(4, 64)
    w = model.layers[0][0].weight
    copy, early = w.detach().clone(), w[:, :]
    with torch.inference_mode():
        expected = model(x, copy)
    with attach(model, (x, copy)) as rt, torch.inference_mode():
        assert rt.plan.by_name[rt.plan.blocks[0].name].placement == "streamed"
        for given in (w, w.t(), w[:8]):
            with pytest.raises(ResidencyError, match=r"the model's own weight TakesAWeight\.layers\.0\.0\.weight") as e:
                model(x, given)
            assert "w.detach().clone()" in e.value.hint
        for given in (w.detach(), w.data):
            with pytest.raises(ResidencyError, match=r"in the memory the model's weight \S+ is bound to"):
                model(x, given)
        assert torch.equal(model(x, copy), expected) and torch.equal(model(x, early), expected)
    assert rt._swapped_inputs is None and rt._weights is None  # detached: no view of the device memory is held
