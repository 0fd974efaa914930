"""Training losses: the batched clip context is the reference context, and the losses train the real modules."""

import torch

from pipelines.world_model import WorldModelPipeline
from pipelines.world_model.reference import reference_forward
from pipelines.world_model.training import (
    EMA,
    adaln_zero_,
    clip_forward,
    diffusion_forcing_loss,
    frame_times,
    vae_loss,
)

SMALL = {"dim": 64, "heads": 2, "depth": 2, "vae_channels": [8, 8, 16, 16], "context_frames": 4}


def _pipe(seed=0):
    return WorldModelPipeline.from_config(SMALL, seed=seed)


def test_clip_context_matches_the_reference_context_including_a_gap_before_the_anchor():
    pipe = _pipe()
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(2, 4, 8, 8, 8, generator=gen)
    times = torch.rand(2, 4, generator=gen)
    actions = torch.randint(0, 11, (2, 4), generator=gen)
    for indices in ([0, 1, 2, 3], [0, 9, 10, 11]):
        ours = clip_forward(pipe.dit, frames, times, actions, indices)
        reference = reference_forward(pipe.dit, frames, times, actions, indices)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_a_frame_does_not_see_later_frames():
    pipe = _pipe()
    gen = torch.Generator().manual_seed(1)
    frames = torch.randn(1, 4, 8, 8, 8, generator=gen)
    times, actions = torch.rand(1, 4, generator=gen), torch.zeros(1, 4, dtype=torch.long)
    changed = frames.clone()
    changed[:, 3] += 1.0
    a = clip_forward(pipe.dit, frames, times, actions, [0, 1, 2, 3])
    b = clip_forward(pipe.dit, changed, times, actions, [0, 1, 2, 3])
    torch.testing.assert_close(a[:, :3], b[:, :3])


def test_the_anchor_is_always_a_context_frame():
    t, target = frame_times(64, 6, torch.Generator().manual_seed(0))
    assert (t[:, 0] <= 0.1).all() and not target[:, 0].any()
    assert target.any() and (t[~target] <= 0.1).all()


def test_diffusion_forcing_loss_reaches_every_dit_parameter():
    pipe = _pipe()
    adaln_zero_(pipe.dit)
    latents = torch.randn(2, 4, 8, 8, 8)
    actions = torch.zeros(2, 4, dtype=torch.long)
    loss = diffusion_forcing_loss(pipe.dit, latents, actions, [0, 1, 2, 3], torch.Generator().manual_seed(0),
                                  context_p=0.0)
    loss.backward()
    # adaLN-Zero: only the gates and output projection get gradient on the first step (as in DiT).
    assert pipe.dit.final.proj.weight.grad.abs().sum() > 0
    assert torch.isfinite(loss)


def test_a_few_vae_steps_reduce_the_reconstruction_loss():
    torch.manual_seed(0)
    pipe = _pipe()
    frames = torch.rand(4, 1, 3, 64, 64) * 2 - 1
    opt = torch.optim.Adam(pipe.vae.parameters(), 2e-3)
    losses = []
    for i in range(8):
        loss, _ = vae_loss(pipe.vae, frames, torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_ema_follows_the_weights():
    pipe = _pipe()
    ema = EMA(pipe.dit, decay=0.5)
    with torch.no_grad():
        for p in pipe.dit.parameters():
            p.add_(1.0)
    ema.update(pipe.dit, step=100)
    name, param = next(iter(pipe.dit.named_parameters()))
    assert torch.allclose(ema.shadow[name], param - 0.5)
