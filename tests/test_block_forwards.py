"""A block's forward under the runtime's hook: replaced on the instance (refused, or a wrapper run on), patched on
its class after attach, held by the class as a staticmethod or a callable object."""

from __future__ import annotations

import pytest
import torch


class _ScaledBlock(torch.nn.Module):
    """A block that reads a tensor of its own before any submodule: skipping the hook, it reads its slot."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.randn(64))
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x * self.scale))


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_ScaledBlock() for _ in range(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


_ORIGINAL = {}


def _global_wrapper(*args, **kwargs):  # a notebook's patch: the original kept in a global
    return _ORIGINAL["forward"](*args, **kwargs)


def test_a_block_forward_replaced_by_one_that_skips_the_hook_is_refused_and_a_wrapper_runs_on():
    """A patch that calls the class's forward (or `del block.forward`) skips residency's hook: a streamed block that
    reads a tensor of its own computed on its slot's contents (1619 of 3000 outputs wrong, no error). A wrapper
    that calls the forward it replaced — however it holds it — is proven on its first call and runs on."""
    import residency
    from residency.errors import ForwardReplacedError

    torch.manual_seed(0)
    net, x = _Net().eval(), torch.randn(3, 64)
    with torch.inference_mode():
        plain = net(x)
    rt = residency.attach(net, vram="40%", example_inputs=x)
    block = net.blocks[1]
    ours = block.forward
    try:
        assert rt.plan.by_name["_Net.blocks.1"].placement == "streamed"
        klass = type(block).forward
        block.forward = lambda t: klass(block, t)  # skips ours: its output is refused, not returned
        with torch.inference_mode(), pytest.raises(ForwardReplacedError, match=r"_Net\.blocks\.1 \(_ScaledBlock\)"):
            net(x)
        del block.forward  # the class's forward shows through: refused before the call
        with torch.inference_mode(), pytest.raises(ForwardReplacedError, match="deleted or replaced"):
            net(x)
        wrappers = [lambda t, _orig=ours: _orig(t),  # a default argument
                    _global_wrapper,  # a global
                    lambda t: [ours][0](t)]  # a closure over a list
        _ORIGINAL["forward"] = ours
        for wrapper in wrappers:
            block.forward = wrapper
            with torch.inference_mode():
                assert torch.equal(net(x), plain) and torch.equal(net(x), plain)
        block.forward = ours
        inner = block.lin  # a submodule's forward replaced: the block's own call has loaded its weights
        inner.forward = lambda t: torch.nn.functional.linear(t, inner.weight, inner.bias)
        with torch.inference_mode():
            assert torch.equal(net(x), plain)
        del inner.forward
    finally:
        block.forward = ours
        rt.detach()
    assert not any("forward" in m.__dict__ for m in net.modules())


def test_a_block_class_patched_after_attach_runs_patched_on_every_block(monkeypatch):
    """The hook held each block's bound forward from attach: a class-level patch after it (an attention swap) ran
    only on blocks with a torch hook of their own, the others silently ran the old code."""
    import residency

    torch.manual_seed(0)
    net, x = _Net().eval(), torch.randn(3, 64)
    net.blocks[2].register_forward_hook(lambda *a: None)  # takes torch's hook path
    original = _ScaledBlock.forward

    def doubled(self, t):
        return 2 * original(self, t)

    with torch.inference_mode():
        rt = residency.attach(net, vram="40%", example_inputs=x)
        try:
            assert "streamed" in {b.placement for b in rt.plan.blocks}
            monkeypatch.setattr(_ScaledBlock, "forward", doubled)
            got = net(x)
        finally:
            rt.detach()
        assert torch.equal(got, net(x))  # as the unattached model runs the patched class


def test_a_forward_the_class_holds_as_a_staticmethod_or_a_callable_object_runs_through_the_hook():
    """The hook called the class's forward with the module as its first argument: a staticmethod (or a callable
    object) forward raised TypeError once hooked, before and after a class-level patch."""
    from residency.runtime.hooks import ModelHook, add_hook, remove_hook

    class Doubler:
        def __call__(self, x):
            return 2 * x

    class Static(torch.nn.Module):
        forward = staticmethod(lambda x: 2 * x)

    class Called(torch.nn.Module):
        forward = Doubler()

    x = torch.ones(3)
    for cls in (Static, Called):
        module = cls()
        add_hook(module, ModelHook())
        try:
            assert torch.equal(module(x), 2 * x)
            cls.forward = staticmethod(lambda t: 3 * t) if cls is Static else Doubler()
            assert torch.equal(module(x), 3 * x if cls is Static else 2 * x)
        finally:
            remove_hook(module)
