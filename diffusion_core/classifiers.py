"""Classifier training math: the noisy classifier p(y | x_t, t) for guidance (Dhariwal & Nichol 2021, sec. 4)
and the clean-image FeatureNet whose penultimate features are the domain FID embedding. No ray/mlflow here.

The noisy classifier sees exactly what a sampler will show it: t from the diffusion model's timestep sampler and
x_t from `GaussianDiffusion.q_sample` (the forward process exists once), timesteps through `model_timesteps`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import GaussianDiffusion
from .models import NoisyClassifier
from .resample import LossAwareSampler, UniformSampler, make_timestep_sampler
from .training import (
    NumericalError,
    QuartileLoss,
    RankData,
    _distributed,
    _gather,
    adamw,
    batch_indices,
    lr_at,
    step_generator,
)

LogFn = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------------------------- shared helpers


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """lr multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def classification_accuracy(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                            *args: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of argmax(model(x, *args)) == y over x [N,...], y [N]; extra per-sample args are batched alongside."""
    params = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    device = params.device if params is not None else x.device
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size].to(device), *(a[i:i + batch_size].to(device) for a in args))
        correct += int((logits.argmax(dim=1).cpu() == y[i:i + batch_size].cpu()).sum())
    return correct / len(x)


# ----------------------------------------------------------------------------------------------- noisy classifier


def timestep_quarters(num_timesteps: int) -> list[tuple[int, int]]:
    """[0,T/4), [T/4,T/2), [T/2,3T/4), [3T/4,T) as integer (lo, hi) pairs (rounded; they tile 0..T-1)."""
    if num_timesteps < 4:
        raise ValueError(f"timestep quarters need num_timesteps >= 4, got {num_timesteps}")
    edges = [round(k * num_timesteps / 4) for k in range(5)]
    return list(zip(edges[:-1], edges[1:]))


def quarter_key(lo: int, hi: int) -> str:
    """Metric name of the accuracy on t in [lo, hi): `acc_t{lo}_{hi}`."""
    return f"acc_t{lo}_{hi}"


def noisy_classifier_losses(classifier: Callable[..., torch.Tensor], diffusion: GaussianDiffusion,
                            x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                            noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample cross-entropy of classifier(q_sample(x0, t, noise), t) against y: {"loss" [B], "logits" [B,K]}."""
    x_t = diffusion.q_sample(x0, t, noise)
    logits = classifier(x_t, diffusion.model_timesteps(t))
    return {"loss": F.cross_entropy(logits.float(), y, reduction="none"), "logits": logits}


def noisy_classifier_step(classifier: Callable[..., torch.Tensor], diffusion: GaussianDiffusion,
                          timestep_sampler: UniformSampler, x0: torch.Tensor, y: torch.Tensor,
                          generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """One training batch: t, w ~ timestep_sampler; x_t = q_sample(x0, t, eps); loss = mean(w * CE).

    Returns {"loss" (scalar, importance-weighted so its expectation is the uniform-t loss), "losses" [B] per-sample
    CE (what a loss-aware sampler records), "t" [B], "correct" [B] bool}. `generator` (CPU) draws t and eps.
    """
    t, weights = timestep_sampler.sample(x0.shape[0], generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    out = noisy_classifier_losses(classifier, diffusion, x0, y, t, noise)
    return {"loss": (out["loss"] * weights).mean(), "losses": out["loss"].detach(), "t": t,
            "correct": out["logits"].detach().argmax(dim=1) == y}


@torch.no_grad()
def evaluate_noisy_classifier(classifier: Callable[..., torch.Tensor], diffusion: GaussianDiffusion,
                              x0: torch.Tensor, y: torch.Tensor, *, repeats: int = 1, batch_size: int = 500,
                              seed: int = 0) -> dict[str, float]:
    """Test accuracy per quarter of the timestep range, t uniform within each quarter, `repeats` draws per sample.

    Returns {"acc_t{lo}_{hi}": ... for each quarter, "accuracy": uniform-t accuracy (quarters weighted by length),
    "chance": 1/K}. Deterministic given `seed`.
    """
    g = torch.Generator().manual_seed(seed)
    num_classes = int(y.max()) + 1 if len(y) else 1
    out: dict[str, float] = {}
    total = 0.0
    T = diffusion.num_timesteps
    for lo, hi in timestep_quarters(T):
        accs = []
        for _ in range(repeats):
            t = torch.randint(lo, hi, (len(x0),), generator=g)
            noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            x_t = diffusion.q_sample(x0, t, noise)
            accs.append(classification_accuracy(classifier, x_t, y, diffusion.model_timesteps(t),
                                                batch_size=batch_size))
        out[quarter_key(lo, hi)] = sum(accs) / len(accs)
        total += out[quarter_key(lo, hi)] * (hi - lo) / T
    out["accuracy"] = total
    out["chance"] = 1.0 / max(num_classes, getattr(classifier, "num_classes", 0) or 0, 1)
    return out


# ----------------------------------------------------------------------------------------------- feature net


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                 fill: float = -1.0) -> torch.Tensor:
    """Translate each image of x [B,C,H,W] by an integer offset in [-max_shift, max_shift]^2, filling with `fill`."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def train_feature_net(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int,
                      lr: float, weight_decay: float = 0.0, warmup_steps: int = 0, max_shift: int = 0,
                      label_smoothing: float = 0.0, seed: int = 0, log_every: int = 0,
                      log_fn: LogFn | None = None) -> dict[str, float]:
    """Train a clean-image classifier on x [N,C,H,W] in [-1,1], y [N] with AdamW + warm-up/cosine lr.

    Light augmentation: random translations of up to `max_shift` pixels. Batches and shifts are a function of
    (seed, step). Returns the last window's {"loss", "train_accuracy", "lr"}; `log_fn(step, that)` every
    `log_every` steps and at the end.
    """
    torch.manual_seed(seed)
    opt = adamw(model.parameters(), lr, weight_decay, next(model.parameters()).device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup_steps))
    model.train()
    window_loss, window_correct, window_n, stats = 0.0, 0, 0, {}
    for step in range(steps):
        idx = batch_indices(len(x), batch_size, step, seed, 0)
        xb = random_shift(x[idx], max_shift, step_generator(seed, 0, step, stream=2))
        logits = model(xb)
        loss = F.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)
        loss_value = loss.item()  # one host sync per step, for the check and the window mean
        if not math.isfinite(loss_value):
            raise NumericalError(f"feature net loss is {loss_value} at step {step + 1}: training stopped before "
                                 f"anything was saved; lower the learning rate (train_feature_net.lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window_loss += loss_value * len(idx)
        window_correct += int((logits.detach().argmax(1) == y[idx]).sum())
        window_n += len(idx)
        if (log_every and (step + 1) % log_every == 0) or step + 1 == steps:
            stats = {"loss": window_loss / window_n, "train_accuracy": window_correct / window_n,
                     "lr": sched.get_last_lr()[0]}
            if log_fn is not None:
                log_fn(step + 1, stats)
            window_loss, window_correct, window_n = 0.0, 0, 0
    model.eval()
    return stats


# ----------------------------------------------------------------------------------------------- noisy classifier loop


def build_noisy_classifier(net_cfg: Any, data_shape: Sequence[int], num_classes: int) -> NoisyClassifier:
    """NoisyClassifier for square [C, H, W] pixels or latents; sizes from a `NoisyClassifierNetConfig`."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"the noisy classifier needs square images or latents [C, H, H], got shape {list(data_shape)}")
    c, h, _ = data_shape
    return NoisyClassifier(in_channels=c, image_size=h, num_classes=num_classes, base_channels=net_cfg.base_channels,
                           channel_mult=net_cfg.channel_mult, num_res_blocks=net_cfg.num_res_blocks,
                           attention_resolutions=net_cfg.attention_resolutions, num_heads=net_cfg.num_heads,
                           dropout=net_cfg.dropout)


class NoisyClassifierTrainer:
    """Owns the classifier (DDP-wrapped when a process group is up), AdamW with linear warm-up, gradient
    clipping and the diffusion's timestep sampler. Randomness per step is a function of (seed, rank, step).
    """

    def __init__(self, model: nn.Module, diffusion: GaussianDiffusion, timestep_sampler: str, *, lr: float,
                 weight_decay: float = 0.0, warmup_steps: int = 0, grad_clip: float | None = None, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.diffusion, self.lr, self.warmup_steps, self.grad_clip, self.seed = (diffusion, lr, warmup_steps,
                                                                                 grad_clip, seed)
        self.device = torch.device(device)
        self.rank, self.world_size = _distributed()
        self.model = model.to(self.device)
        self.ddp: nn.Module = self.model
        if self.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = adamw(self.model.parameters(), lr_at(0, lr, warmup_steps), weight_decay, self.device)
        self.sampler: UniformSampler = make_timestep_sampler(timestep_sampler, diffusion.num_timesteps)
        self.quartiles = QuartileLoss(diffusion.num_timesteps)
        self.step = 0

    def train_step(self, x0: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One AdamW step on this rank's batch x0 [b, ...], y [b]; raises NumericalError on a NaN/inf loss."""
        g = step_generator(self.seed, self.rank, self.step, stream=1)
        torch.manual_seed(step_generator(self.seed, self.rank, self.step, stream=2).initial_seed())  # model dropout
        lr = lr_at(self.step, self.lr, self.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.ddp.train()
        out = noisy_classifier_step(self.ddp, self.diffusion, self.sampler, x0.to(self.device), y.to(self.device), g)
        if not torch.isfinite(out["loss"]):
            raise NumericalError(f"classifier loss is {out['loss'].item()} at step {self.step + 1}; lower lr")
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        t, losses = out["t"], out["losses"]
        if isinstance(self.sampler, LossAwareSampler):  # every rank records every rank's losses: same history
            t, losses = _gather(t), _gather(losses)
            self.sampler.update(t, losses)
        self.quartiles.update(t, losses)
        self.step += 1
        return {"loss": out["loss"].item(), "train_accuracy": out["correct"].float().mean().item(), "lr": lr}


def train_noisy_classifier(trainer: NoisyClassifierTrainer, data: RankData, total_steps: int, local_batch: int, *,
                           log_every: int, log_fn: LogFn | None = None) -> dict[str, float]:
    """Steps trainer.step+1 .. total_steps on this rank's data; log_fn(step, {"loss", "loss_q0".., "train_accuracy",
    "lr", "samples_per_second"}) every log_every steps and at the end; returns the last window's stats."""
    n, last = len(data.y), {}
    t0, acc_sum, acc_n = time.perf_counter(), 0.0, 0
    window_start = trainer.step
    while trainer.step < total_steps:
        idx = batch_indices(n, local_batch, trainer.step, trainer.seed, trainer.rank)
        stats = trainer.train_step(data.x[idx], data.y[idx])
        acc_sum, acc_n = acc_sum + stats["train_accuracy"], acc_n + 1
        if trainer.step % log_every == 0 or trainer.step == total_steps:
            now = time.perf_counter()
            seen = (trainer.step - window_start) * local_batch * trainer.world_size
            last = {**trainer.quartiles.pop(), "train_accuracy": acc_sum / acc_n, "lr": stats["lr"],
                    "samples_per_second": seen / max(now - t0, 1e-9)}
            if log_fn is not None:
                log_fn(trainer.step, last)
            t0, acc_sum, acc_n, window_start = now, 0.0, 0, trainer.step
    return last


__all__ = ["build_noisy_classifier", "NoisyClassifierTrainer", "train_noisy_classifier", "classification_accuracy",
           "evaluate_noisy_classifier", "noisy_classifier_losses", "noisy_classifier_step", "quarter_key",
           "random_shift", "timestep_quarters", "train_feature_net", "warmup_cosine"]
