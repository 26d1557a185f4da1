"""Classifier training math: the noisy classifier p(y | x_t, t) for guidance (Dhariwal & Nichol 2021, sec. 4)
and the clean-image FeatureNet whose penultimate features are the domain FID embedding. No ray/mlflow here.

The noisy classifier sees exactly what a sampler will show it: t from the diffusion model's timestep sampler and
x_t from `GaussianDiffusion.q_sample` (the forward process exists once), timesteps through `model_timesteps`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .builders import adamw, lr_factor
from .diffusion import GaussianDiffusion
from .rank_data import batch_indices, step_generator
from .training import NumericalError

LogFn = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------------------------- shared helpers


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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, steps))
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


__all__ = ["classification_accuracy", "evaluate_noisy_classifier", "noisy_classifier_losses", "quarter_key",
           "random_shift", "timestep_quarters", "train_feature_net"]
