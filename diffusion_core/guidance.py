"""Guidance: classifier guidance (Dhariwal & Nichol 2021) and classifier-free guidance (Ho & Salimans 2022).

Both wrap pieces the sampler already has; samplers never import a classifier. Guidance only touches the
mean (eps/x0/v) channels of a learned-variance output; the variance channels stay the conditional model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def cfg_label_dropout(y: torch.Tensor, null_class: int, p: float = 0.1,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time label dropout: each label becomes the null class with probability p."""
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device="cpu").to(y.device) < p
    return torch.where(drop, torch.full_like(y, null_class), y)


@dataclass
class ClassifierFreeGuidance:
    """eps = eps(x, null) + w (eps(x, y) - eps(x, null)); w=1 is the conditional model, w=0 the unconditional.

    `null_class` is the extra class index the model was trained with under label dropout. Conditional and
    unconditional passes run as one batched forward.
    """

    scale: float
    null_class: int

    def __post_init__(self):
        if self.scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.scale}")

    def wrap(self, model: Callable) -> Callable:
        def guided(x_t, t, y=None):
            null = torch.full((x_t.shape[0],), self.null_class, dtype=torch.long, device=x_t.device)
            if y is None or self.scale == 0:
                return model(x_t, t, null)
            if self.scale == 1:
                return model(x_t, t, y)
            out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
            cond, uncond = out.chunk(2)
            c = x_t.shape[1]  # mean channels; any further channels (learned variance) come from the conditional pass
            mixed = uncond[:, :c] + self.scale * (cond[:, :c] - uncond[:, :c])
            return torch.cat([mixed, cond[:, c:]], dim=1) if cond.shape[1] > c else mixed

        return guided


@dataclass
class ClassifierGuidance:
    """s * grad_x log p(y | x_t, t) from a noisy classifier `classifier(x_t, t) -> logits`."""

    classifier: Callable
    scale: float

    def __post_init__(self):
        if self.scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.scale}")

    def grad(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scaled gradient of log p(y|x_t,t) w.r.t. x_t; t are the ORIGINAL timestep indices."""
        if y is None:
            raise ValueError("classifier guidance needs class labels y")
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x, t).float(), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), y]
            (g,) = torch.autograd.grad(selected.sum(), x)
        return (g * self.scale).to(x_t.dtype)
