"""Train the shipped world model on the procedural game of tools/game: the VAE, then the causal DiT.

CPU-only, deterministic given --seed (per-step RNGs are derived from (seed, phase, step), so a
--resume'd run continues exactly where it stopped). Writes config.json + model.safetensors (BF16,
EMA weights), held-out start images and training.json into --out (the package's default model).

    .venv/bin/python tools/train_world_model.py --quick --out /tmp/wm   # a 2-minute smoke run

The shipped model was trained (40.3 min of step time on 2 cores, partly shared with other jobs) by
    .venv/bin/python tools/train_world_model.py --max-minutes 35                  # VAE 600 + DiT 700 steps
    .venv/bin/python tools/train_world_model.py --resume --dit-steps 1300 --max-minutes 36
    .venv/bin/python tools/train_world_model.py --resume --dit-steps 2500 --max-minutes 44.5
Each --resume stretches the DiT's cosine schedule from where it stopped to the new --dit-steps (a warm
restart at a third of the peak rate); training.json records the last one. Measure the result with
tools/evaluate_world_model.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipelines.world_model import WorldModelPipeline  # noqa: E402
from pipelines.world_model.trained import DEFAULT_DIR, GAME_CONFIG  # noqa: E402
from pipelines.world_model.trained.png import write_png  # noqa: E402
from pipelines.world_model.training import EMA, adaln_zero_, diffusion_forcing_loss, vae_loss  # noqa: E402
from tools.game import dataset, new_game, render  # noqa: E402
from tools.game.engine import character_mask  # noqa: E402

HELD_OUT_SEEDS = tuple(range(8))  # start images shipped for tests/demo; training seeds start at TRAIN_SEED0
TRAIN_SEED0 = 1000


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    episodes: int = 600  # game episodes (one layout each)
    episode_frames: int = 40  # actions per episode (frames = this + 1)
    vae_steps: int = 600
    vae_batch: int = 24  # frames
    vae_lr: float = 2e-3
    dit_steps: int = 700
    dit_batch: int = 8  # clips
    clip: int = 12  # latent frames per clip: the anchor + 11 (the KV window of the config)
    dit_lr: float = 8e-4
    ema_decay: float = 0.995
    warmup_steps: int = 40
    character_weight: float = 10.0  # loss weight of the character's pixels (VAE) / latent pixels (DiT), vs 1
    checkpoint_every: int = 50  # steps
    max_minutes: float = 40.0  # wall-clock safety net: stop early (and say so) past this total


QUICK = {"episodes": 60, "vae_steps": 60, "dit_steps": 40, "checkpoint_every": 20, "warmup_steps": 10}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def to_unit(frames: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(frames).movedim(-1, -3).float().div_(127.5).sub_(1.0)


class Trainer:
    def __init__(self, cfg: TrainConfig, work: Path, console: Console):
        self.cfg, self.work, self.console = cfg, work, console
        self.pipe = WorldModelPipeline.from_config(GAME_CONFIG, seed=cfg.seed).train()
        adaln_zero_(self.pipe.dit)
        self.ema = EMA(self.pipe.dit, cfg.ema_decay)
        self.vae_opt = torch.optim.AdamW(self.pipe.vae.parameters(), cfg.vae_lr, weight_decay=0.0)
        self.dit_opt = torch.optim.AdamW(self.pipe.dit.parameters(), cfg.dit_lr, weight_decay=0.01)
        self.phase, self.step = "vae", 0
        self.seconds = {"data": 0.0, "vae": 0.0, "encode": 0.0, "dit": 0.0}
        self.history: dict[str, list[tuple[int, float]]] = {"vae": [], "dit": []}
        t0 = time.perf_counter()
        self.frames, self.actions = dataset(TRAIN_SEED0 + cfg.seed * 100_000, cfg.episodes, cfg.episode_frames)
        self.seconds["data"] = time.perf_counter() - t0
        self.latents: torch.Tensor | None = None
        self.stopped_early: str | None = None
        self.resumed_from: dict | None = None

    # --- checkpoints ---
    @property
    def checkpoint_path(self) -> Path:
        # safetensors plus a JSON metadata entry: resuming reads tensors and JSON, never a pickle.
        return self.work / "checkpoint.safetensors"

    def save(self) -> None:
        from safetensors.torch import save_file

        self.work.mkdir(parents=True, exist_ok=True)
        # clone: safetensors refuses tensors that share storage (tied weights, views of one buffer).
        tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in self.pipe.state_dict().items()}
        tensors.update({f"ema.{k}": v.detach().clone().contiguous() for k, v in self.ema.shadow.items()})
        param_groups = {}
        for key, opt in (("vae_opt", self.vae_opt), ("dit_opt", self.dit_opt)):
            state = opt.state_dict()
            param_groups[key] = state["param_groups"]
            for index, values in state["state"].items():
                for name, value in values.items():
                    tensors[f"{key}.{index}.{name}"] = torch.as_tensor(value).detach().clone().contiguous()
        doc = {"train_config": asdict(self.cfg), "phase": self.phase, "step": self.step,
               "seconds": self.seconds, "history": self.history, "param_groups": param_groups}
        tmp = self.checkpoint_path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata={"trainer": json.dumps(doc)})
        tmp.replace(self.checkpoint_path)  # atomic: a kill mid-save leaves the previous checkpoint

    def load(self) -> None:
        from safetensors import safe_open

        with safe_open(self.checkpoint_path, framework="pt") as f:
            doc = json.loads(f.metadata()["trainer"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        # Extending a run is allowed: more DiT steps (the cosine schedule stretches from here on) or time.
        extendable = {"dit_steps", "max_minutes"}
        saved = {k: v for k, v in doc["train_config"].items() if k not in extendable}
        if saved != {k: v for k, v in asdict(self.cfg).items() if k not in extendable} or (
                self.cfg.dit_steps < doc["train_config"]["dit_steps"]):
            raise SystemExit(f"error: {self.checkpoint_path} was written with other settings\n"
                             "hint: pass the same options as the interrupted run (--dit-steps may grow), "
                             "or a new --work directory")
        self.resumed_from = {"phase": doc["phase"], "step": doc["step"], "config": doc["train_config"]}

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.pipe.load_state_dict(part("model."))
        self.ema.shadow = part("ema.")
        for key, opt in (("vae_opt", self.vae_opt), ("dit_opt", self.dit_opt)):
            state: dict[int, dict[str, torch.Tensor]] = {}
            for name, value in part(f"{key}.").items():
                index, _, field = name.partition(".")
                state.setdefault(int(index), {})[field] = value
            groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                      for g in doc["param_groups"][key]]  # JSON made AdamW's betas tuple a list
            opt.load_state_dict({"state": state, "param_groups": groups})
        self.phase, self.step = doc["phase"], doc["step"]
        self.seconds.update(doc["seconds"])
        self.history = {k: [tuple(p) for p in v] for k, v in doc["history"].items()}
        self.console.print(f"resumed at {self.phase} step {self.step}")

    # --- phases ---
    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console)

    def _run(self, phase: str, total: int, one_step) -> None:
        cfg = self.cfg
        with self._progress() as progress:
            task = progress.add_task(phase, total=total, completed=self.step, info="")
            while self.step < total:
                if sum(self.seconds.values()) > cfg.max_minutes * 60:
                    self.stopped_early = f"{phase} stopped at step {self.step}/{total}: --max-minutes reached"
                    self.console.print(f"warning: {self.stopped_early}")
                    self.save()
                    return
                t0 = time.perf_counter()
                loss, info = one_step(self.step)
                self.seconds[phase] += time.perf_counter() - t0
                self.history[phase].append((self.step, loss))
                self.step += 1
                progress.update(task, advance=1, info=info)
                if self.step % 20 == 0 and not self.console.is_terminal:  # log lines for nohup runs
                    self.console.print(f"{phase} {self.step}/{total} {info} ({self.seconds[phase]:.0f} s)")
                if self.step % cfg.checkpoint_every == 0 or self.step == total:
                    self.save()

    def train_vae(self) -> None:
        cfg, vae = self.cfg, self.pipe.vae
        n_ep, n_fr = self.frames.shape[:2]

        def one_step(step: int):
            rng = np.random.default_rng([cfg.seed, 1, step])
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            ep, fr = rng.integers(0, n_ep, cfg.vae_batch), rng.integers(0, n_fr, cfg.vae_batch)
            x = to_unit(self.frames[ep, fr])[:, None]  # (B, T=1, 3, H, W)
            mask = torch.from_numpy(character_mask(self.frames[ep, fr])).float()[:, None, None]
            weight = 1.0 + (cfg.character_weight - 1.0) * mask  # (B, 1, 1, H, W)
            for group in self.vae_opt.param_groups:
                group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps)
            # bf16 autocast: the convs take oneDNN's bf16 path, ~2x the fp32 one on AVX512-BF16 CPUs.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, parts = vae_loss(vae, x, gen, weight=weight)
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            self.vae_opt.step()
            psnr = 10 * math.log10(4.0 / max(parts["mse"], 1e-10))
            return loss.item(), f"loss {loss.item():.4f} psnr {psnr:.1f} dB rms(z) {parts['latent_rms']:.2f}"

        self._run("vae", cfg.vae_steps, one_step)

    @torch.no_grad()
    def encode(self) -> None:
        t0 = time.perf_counter()
        self.pipe.vae.eval()
        flat = self.frames.reshape(-1, *self.frames.shape[2:])
        out = [self.pipe.vae.encoder(to_unit(flat[i : i + 256])[:, None]) for i in range(0, len(flat), 256)]
        self.latents = torch.cat(out).unflatten(0, self.frames.shape[:2])  # (E, F, C, h, w)
        # Latent pixels the character covers now or covered one frame before: where motion is.
        s = self.pipe.config.spatial_compression
        mask = torch.from_numpy(character_mask(self.frames)).float()  # (E, F, H, W)
        pooled = torch.nn.functional.max_pool2d(mask, s)  # (E, F, h, w)
        pooled[:, 1:] = torch.maximum(pooled[:, 1:], pooled[:, :-1].clone())
        self.latent_weight = 1.0 + (self.cfg.character_weight - 1.0) * pooled
        self.seconds["encode"] += time.perf_counter() - t0
        self.console.print(f"encoded {len(flat)} frames: latent rms {self.latents.pow(2).mean().sqrt():.3f}")

    def train_dit(self) -> None:
        cfg, dit = self.cfg, self.pipe.dit
        assert self.latents is not None
        n_ep, n_fr = self.latents.shape[:2]
        recent = cfg.clip - 1

        def one_step(step: int):
            rng = np.random.default_rng([cfg.seed, 2, step])
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_000 + step)
            # Offset 0 half the time: the window is contiguous from the anchor (the first frames of a
            # session); otherwise the anchor sits beyond a gap, as after the KV ring has wrapped.
            offset = 0 if rng.random() < 0.5 else int(rng.integers(1, n_fr - recent))
            idx = [0] + list(range(offset + 1, offset + 1 + recent))
            ep = rng.integers(0, n_ep, cfg.dit_batch)
            lat = self.latents[ep][:, idx]
            acts = np.zeros((cfg.dit_batch, cfg.clip), dtype=np.int64)  # the anchor's action: idle (0)
            acts[:, 1:] = self.actions[ep][:, [i - 1 for i in idx[1:]]]
            for group in self.dit_opt.param_groups:
                group["lr"] = lr_at(step, cfg.dit_steps, cfg.dit_lr, cfg.warmup_steps)
            weight = self.latent_weight[ep][:, idx]
            loss = diffusion_forcing_loss(dit, lat, torch.from_numpy(acts), idx, gen, weight=weight)
            self.dit_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
            self.dit_opt.step()
            self.ema.update(dit, step)
            return loss.item(), f"loss {loss.item():.4f}"

        self._run("dit", cfg.dit_steps, one_step)

    def run(self) -> None:
        if self.phase == "vae":
            self.train_vae()
            self.phase, self.step = "dit", 0
            self.save()
        self.encode()
        self.train_dit()

    # --- export ---
    def export(self, out: Path) -> dict:
        pipe = self.pipe.eval()
        pipe.dit.load_state_dict(self.ema.shadow)
        out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(out, format="BF16")
        starts = []
        for seed in HELD_OUT_SEEDS:
            name = f"start_{seed}.png"
            write_png(out / name, render(new_game(seed)))
            starts.append({"file": name, "game_seed": seed})
        (out / "starts.json").write_text(json.dumps(starts, indent=2) + "\n")

        def tail(phase: str) -> float:
            values = [loss for _, loss in self.history[phase][-50:]]
            return float(np.mean(values)) if values else float("nan")

        report = {
            "train_config": asdict(self.cfg),
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "total_seconds": round(sum(self.seconds.values()), 1),
            "final_vae_loss": round(tail("vae"), 5),  # mean of the last 50 steps
            "final_dit_loss": round(tail("dit"), 5),
            "stopped_early": self.stopped_early,
            "resumed_from": self.resumed_from,
            "weights_bytes": (out / "model.safetensors").stat().st_size,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help="where the trained model is written")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/residency/train_world_model",
                        help="checkpoint directory")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a couple of minutes")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the final report as one JSON line")
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    console = Console(stderr=args.json)
    settings = {**asdict(TrainConfig()), **(QUICK if args.quick else {})}
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    cfg = TrainConfig(**settings)

    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, args.work, console)
    if args.resume:
        if not trainer.checkpoint_path.exists():
            console.print(f"error: no checkpoint at {trainer.checkpoint_path}\nhint: run without --resume first")
            return 2
        trainer.load()
    elif trainer.checkpoint_path.exists():
        trainer.checkpoint_path.unlink()  # a fresh run must not be mistaken for this one's progress later
    trainer.run()
    report = trainer.export(args.out)
    console.print(f"wrote {args.out}: {report['weights_bytes'] / 1e6:.1f} MB, trained in "
                  f"{report['total_seconds'] / 60:.1f} min, final losses vae {report['final_vae_loss']} "
                  f"dit {report['final_dit_loss']}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
