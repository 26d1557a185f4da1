"""Training, one optimizer step at a time: one `Trainer` for any objective (`objectives.py`: the diffusion model's,
the noisy classifier's, the distillations') with AdamW, linear warm-up and gradient clipping, bf16 autocast, EMA,
NaN/inf checks, per-timestep-quartile losses (as improved-diffusion logs them), checkpoints with exact resume,
and `train_loop`, the loop every Ray Train stage runs.

Engine-free: no ray, no mlflow. `torch.distributed` is used only when a process group is initialized (DDP
wrapping, gathering (t, loss) so every rank's loss-aware sampler keeps the same history, rank-0 checkpoints).
Each step's randomness is a function of (seed, rank, step) (`rank_data.py`), so a resumed run takes exactly the
steps an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from .builders import adamw, lr_factor
from .checkpoint import (
    EMA_FILE,
    MODEL_FILE,
    STEP_DIR_PATTERN,
    TRAINING_STATE_FILE,
    CheckpointError,
    load_training_state,
    save_checkpoint_dir,
    step_dir,
    verify_checkpoint_dir,
)
from .diffusion import GaussianDiffusion
from .models import EMA, UNet, unwrap_model
from .precision import resolve_bf16
from .rank_data import RankData, _mix, batch_indices, capture_rng_state, restore_rng_state, step_generator
from .resample import LossAwareSampler, UniformSampler, make_timestep_sampler

NUM_QUARTILES = 4


class NumericalError(FloatingPointError):
    """The loss or the gradient norm became NaN/inf; the message names the step."""


# ----------------------------------------------------------------------------------------------- logging


class QuartileLoss:
    """Running means of the loss per quarter of the timestep range, plus the overall mean (improved-diffusion)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(NUM_QUARTILES, dtype=torch.float64)
        self.counts = torch.zeros(NUM_QUARTILES, dtype=torch.int64)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        q = (t.cpu() * NUM_QUARTILES // self.num_timesteps).clamp(max=NUM_QUARTILES - 1)
        self.sums.index_add_(0, q, losses.detach().double().cpu())
        self.counts.index_add_(0, q, torch.ones_like(q))

    def pop(self) -> dict[str, float]:
        """{"loss": mean, "loss_q0".."loss_q3": means per quartile with samples}; resets the window."""
        out = {}
        if self.counts.sum() > 0:
            out["loss"] = float(self.sums.sum() / self.counts.sum())
        for i in range(NUM_QUARTILES):
            if self.counts[i] > 0:
                out[f"loss_q{i}"] = float(self.sums[i] / self.counts[i])
        self.reset()
        return out


@dataclass
class StepStats:
    step: int  # optimizer steps completed
    loss: float  # global mean of the importance-weighted loss of this step
    lr: float
    grad_norm: float
    t: torch.Tensor = field(repr=False)  # global timesteps of this step
    losses: torch.Tensor = field(repr=False)  # global per-sample weighted losses
    extras: dict[str, float] = field(default_factory=dict)  # this rank's means of the objective's extras


# ----------------------------------------------------------------------------------------------- trainer


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank (identity when not distributed)."""
    rank, world = _distributed()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@dataclass(frozen=True)
class TrainOptions:
    """Typed options of `Trainer` (the pipeline builds them from its params section: `train_options()`)."""

    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    seed: int = 0
    ema_decay: float | None = None  # None: no EMA copy
    bf16: bool | str = False  # autocast of the network; "auto": only where the device computes bf16 natively
    channels_last: bool = False  # U-Net inputs and weights in channels_last
    loss_name: str = "loss"  # how a NaN error names the loss ("classifier loss")
    fix_hint: str = "lower the learning rate or enable grad_clip"  # what a NaN error tells the user to do


class Trainer:
    """One training loop's state for any objective: the model (DDP-wrapped when a process group is up), its EMA,
    AdamW with linear warm-up and gradient clipping, bf16 autocast, the timestep sampler and the step counter;
    NaN/inf checks on the loss and the gradient norm; checkpoints with exact resume.

    An objective has `diffusion` (its forward process: the timestep range), `timestep_probs()` (None: uniform) and
    `objective(net, x0, y, t, generator)` -> per-sample losses [b] and extra per-sample tensors to average in the
    logs (e.g. {"train_accuracy": correct}); it draws its noise from `generator` after the trainer drew t, and
    calls `net` (the model under the trainer's autocast and DDP). Distillation would be one more such class.
    """

    def __init__(self, model: nn.Module, objective: Callable, timestep_sampler: str, options: TrainOptions,
                 device: str | torch.device = "cpu"):
        self.objective, self.options = objective, options
        self.device = torch.device(device)
        self.rank, self.world_size = _distributed()
        self.model = model.to(self.device)
        self.channels_last = options.channels_last and isinstance(model, UNet)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp: nn.Module = self.model
        if self.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ema = EMA(self.model, options.ema_decay) if options.ema_decay is not None else None
        self.opt = adamw(self.model.parameters(), options.lr * lr_factor(0, options.warmup_steps), options.weight_decay,
                         self.device)
        T = objective.diffusion.num_timesteps
        self.sampler: UniformSampler = make_timestep_sampler(timestep_sampler, T, objective.timestep_probs())
        self.quartiles = QuartileLoss(T)
        self.bf16 = resolve_bf16(options.bf16, self.device)
        self.step = 0
        self.samples_seen = 0
        self.train_seconds = 0.0  # time spent in train_step, summed over resumes
        self.history: list[dict[str, float]] = []  # logged points of the loss curve, carried across resumes

    def _net(self, *inputs):
        """The (DDP) model under the trainer's autocast, its image input in channels_last where set."""
        x, *rest = inputs
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.ddp(x, *rest)

    # ---- one optimizer step
    def train_step(self, x0: torch.Tensor, y: torch.Tensor | None = None) -> StepStats:
        """One AdamW step on this rank's batch x0 [b, ...] (labels y [b]); raises NumericalError on NaN/inf."""
        o = self.options
        g = step_generator(o.seed, self.rank, self.step, stream=1)
        torch.manual_seed(_mix(o.seed, self.rank, self.step, 2))  # model dropout, reproducible per step
        x0 = x0.to(self.device, torch.float32)
        b = x0.shape[0]
        t, weights = self.sampler.sample(b, generator=g, device=self.device)
        self.model.train()
        losses, extras = self.objective(self._net, x0, y, t, g)
        weighted = losses * weights
        # gather before backward: every rank sees the same global loss, so all stop at the same step on NaN
        all_t, all_w = _gather(t), _gather(weighted.detach().float())
        global_loss = float(all_w.mean())
        step_no = self.step + 1
        self._check_finite(o.loss_name, global_loss, step_no)
        self.opt.zero_grad(set_to_none=True)
        weighted.mean().backward()
        clip = o.grad_clip if o.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self._check_finite("gradient norm", grad_norm, step_no)
        lr = o.lr * lr_factor(self.step, o.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        if isinstance(self.sampler, LossAwareSampler):
            self.sampler.update(all_t, _gather(losses.detach().float()))  # same history on every rank
        self.quartiles.update(all_t, all_w)
        self.step = step_no
        self.samples_seen += b * self.world_size
        return StepStats(self.step, global_loss, lr, grad_norm, all_t, all_w,
                         {k: float(v.float().mean()) for k, v in extras.items()})

    def _check_finite(self, what: str, value: float, step: int) -> None:
        if not math.isfinite(value):
            raise NumericalError(f"{what} is {value} at step {step}: training stopped, the last good checkpoint is "
                                 f"kept; {self.options.fix_hint}")

    # ---- state
    def state_dict(self) -> dict[str, Any]:
        """Training state for `training_state.pt` (tensors and plain values only: weights_only loading)."""
        ema = {"decay": self.ema.decay, "num_updates": self.ema.num_updates} if self.ema is not None else None
        return {"step": self.step, "samples_seen": self.samples_seen, "optimizer": self.opt.state_dict(),
                "ema": ema, "timestep_sampler": self.sampler.state_dict(), "rng": capture_rng_state(),
                "history": [dict(h) for h in self.history], "seed": int(self.options.seed),
                "world_size": self.world_size, "train_seconds": float(self.train_seconds)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.decay, self.ema.num_updates = float(state["ema"]["decay"]), int(state["ema"]["num_updates"])
        self.sampler.load_state_dict(state["timestep_sampler"])
        restore_rng_state(state["rng"])
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self.history = [dict(h) for h in state.get("history", [])]
        self.train_seconds = float(state.get("train_seconds", 0.0))

    def save_checkpoint(self, root: str | os.PathLike, extra_config: dict | None = None) -> Path:
        """root/step-%08d (model, EMA, training state, config.json last), written atomically; rank 0 only."""
        return save_checkpoint_dir(step_dir(root, self.step), self.model, self.ema, self.state_dict(), extra_config)

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restore weights, EMA, optimizer, sampler, RNG and step from a checkpoint folder; returns its config."""
        path = Path(path)
        config = verify_checkpoint_dir(path)
        if config.get("model") != unwrap_model(self.model).config:
            raise CheckpointError(f"{path} was written for a different model ({config.get('model', {}).get('kind')}, "
                                  f"other sizes); delete {path.parent} to start over or restore the params")
        tensors = load_file(str(path / MODEL_FILE), device=str(self.device))
        self.model.load_state_dict(tensors)
        if self.ema is not None and (path / EMA_FILE).exists():
            self.ema.module.load_state_dict(load_file(str(path / EMA_FILE), device=str(self.device)))
        self.load_state_dict(load_training_state(path / TRAINING_STATE_FILE, map_location=self.device))
        return config


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` step folders, and temp folders left by interrupted saves."""
    root = Path(root)
    if not root.is_dir():
        return
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR_PATTERN.match(p.name)))
    for _, p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".step-*"):
        if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            shutil.rmtree(p, ignore_errors=True)


def weights_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): equal iff the weights are bitwise equal."""
    h = hashlib.sha256()
    for k, v in sorted(unwrap_model(module).state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        # reshape(-1): a channels_last 1x1 conv weight counts as contiguous but keeps stride(-1) != 1
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- loop


@dataclass
class LoopHooks:
    """Callbacks of `train_loop`; each gets the trainer. log: every log_every steps with the window's stats."""

    log: Callable[[Trainer, dict[str, float]], None] | None = None
    checkpoint: Callable[[Trainer], None] | None = None  # every checkpoint_every steps and at the end
    sample: Callable[[Trainer], None] | None = None  # every sample_every steps (and at the end)


def train_loop(trainer: Trainer, data: RankData, total_steps: int, local_batch: int, *,
               log_every: int, checkpoint_every: int = 0, sample_every: int = 0,
               hooks: LoopHooks | None = None) -> dict[str, float]:
    """Run steps trainer.step+1 .. total_steps on this rank's data; returns the last logged window's stats:
    {"loss", "loss_q0".., "lr", "grad_norm", "samples_per_second"} and the window means of the objective's
    extras. checkpoint_every 0: the checkpoint hook runs at the end only."""
    hooks = hooks or LoopHooks()
    window_t0, window_samples, last = time.perf_counter(), 0, {}
    extras: dict[str, list[float]] = {}
    n = len(data.keys)
    while trainer.step < total_steps:
        idx = batch_indices(n, local_batch, trainer.step, trainer.options.seed, trainer.rank)
        t0 = time.perf_counter()
        stats = trainer.train_step(data.x[idx], data.y[idx])
        trainer.train_seconds += time.perf_counter() - t0
        window_samples += local_batch * trainer.world_size
        for k, v in stats.extras.items():
            extras.setdefault(k, []).append(v)
        s = stats.step
        if s % log_every == 0 or s == total_steps:
            now = time.perf_counter()
            last = {**trainer.quartiles.pop(), **{k: sum(v) / len(v) for k, v in extras.items()}, "lr": stats.lr,
                    "grad_norm": stats.grad_norm, "samples_per_second": window_samples / max(now - window_t0, 1e-9)}
            trainer.history.append({"step": s, **{k: v for k, v in last.items() if k.startswith("loss")},
                                    "lr": stats.lr})
            window_t0, window_samples, extras = now, 0, {}
            if hooks.log:
                hooks.log(trainer, last)
        if hooks.sample and sample_every and s % sample_every == 0 and s != total_steps:
            hooks.sample(trainer)
        if hooks.checkpoint and ((checkpoint_every and s % checkpoint_every == 0) or s == total_steps):
            hooks.checkpoint(trainer)
    return last


@torch.no_grad()
def sample_preview(model: nn.Module, diffusion: GaussianDiffusion, shape: tuple[int, ...], num_classes: int | None,
                   decoder: Callable[[torch.Tensor], torch.Tensor] | None = None, per_class: int = 4,
                   steps: int = 25, seed: int = 0, clip_denoised: bool = True) -> np.ndarray:
    """uint8 [N, H, W, C] preview samples (DDIM): `per_class` rows of every class, or 40 unconditional samples."""
    from .samplers import SamplingSpec, sample

    was_training = model.training
    model.eval()
    if num_classes is not None:
        k = min(num_classes, 10)
        y = torch.arange(k).repeat(per_class)
    else:
        y = None
    n = len(y) if y is not None else 40
    device = next(model.parameters()).device
    x = sample(diffusion, model, (n, *shape), SamplingSpec("ddim", steps=min(steps, diffusion.num_timesteps)),
               generator=torch.Generator(device=device).manual_seed(seed), y=y, clip_denoised=clip_denoised)
    if decoder is not None:
        x = decoder(x).clamp(-1, 1)
    model.train(was_training)
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


__all__ = ["LoopHooks", "NumericalError", "QuartileLoss", "StepStats", "TrainOptions", "Trainer", "prune_checkpoints",
           "sample_preview", "train_loop", "weights_sha256"]
