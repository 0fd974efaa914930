"""The training tool's resume checkpoint: safetensors plus JSON, so resuming never unpickles anything."""

from __future__ import annotations

import torch
from rich.console import Console

from tools.train_world_model import TrainConfig, Trainer

CFG = TrainConfig(episodes=2, episode_frames=3)


def test_a_resumed_trainer_has_the_saved_weights_optimizer_state_and_progress(tmp_path):
    quiet = Console(file=open(tmp_path / "log.txt", "w"))
    first = Trainer(CFG, tmp_path, quiet)
    for opt, module in ((first.vae_opt, first.pipe.vae), (first.dit_opt, first.pipe.dit)):
        for p in module.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    first.phase, first.step = "dit", 7
    first.history["vae"].append((1, 0.5))
    first.save()
    assert [p.name for p in tmp_path.iterdir() if p.name != "log.txt"] == ["checkpoint.safetensors"]

    second = Trainer(CFG, tmp_path, quiet)
    second.load()
    a, b = first.pipe.state_dict(), second.pipe.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for saved, loaded in ((first.vae_opt, second.vae_opt), (first.dit_opt, second.dit_opt)):
        s, t = saved.state_dict(), loaded.state_dict()
        assert s["param_groups"] == t["param_groups"]
        assert all(torch.equal(s["state"][i][n], t["state"][i][n]) for i in s["state"] for n in s["state"][i])
    assert (second.phase, second.step, second.history["vae"]) == ("dit", 7, [(1, 0.5)])
    quiet.file.close()

