"""Noise schedules as data: `NoiseSchedule` holds float64 betas and the constants derived from them.

Conventions: timestep index t in 0..T-1 (t is the seeds' step t+1); everything in float64, cast at use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Sequence

import torch

SCHEDULES = ("linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace")
Spacing = Literal["leading", "trailing", "linspace"]


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """Ho et al. linear betas, 1e-4..0.02 at T=1000, endpoints scaled by 1000/T for other T."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def betas_from_alpha_bar(alpha_bar_fn, num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), capped at max_beta (Nichol & Dhariwal eq. 17)."""
    s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = alpha_bar_fn(s)
    return (1.0 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def cosine_alpha_bar(s: torch.Tensor, offset: float = 0.008) -> torch.Tensor:
    """f(s) = cos^2(((s + offset)/(1 + offset)) * pi/2), s = t/T in [0, 1] (unnormalized: f(0) != 1)."""
    return torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal cosine schedule: alpha_bar_t = f(t/T)/f(0), betas capped at 0.999."""
    return betas_from_alpha_bar(lambda s: cosine_alpha_bar(s, offset), num_timesteps, max_beta)


def sigmoid_betas(num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> torch.Tensor:
    """Sigmoid schedule (Jabri et al. 2022): alpha_bar(s) from a sigmoid over [start, end] with temperature tau."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def alpha_bar(s: torch.Tensor) -> torch.Tensor:
        return (v_end - torch.sigmoid((s * (end - start) + start) / tau)) / (v_end - v_start)

    return betas_from_alpha_bar(alpha_bar, num_timesteps, max_beta)


def shift_logsnr(betas: torch.Tensor, shift: float, max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose log-SNR is the given schedule's plus `shift` at every step (Hoogeboom et al. 2023, sec. 3.1;
    Chen 2023): alpha_bar' = sigmoid(logit(alpha_bar) + shift). shift > 0: less noise at every t (small images
    and latents lose their information later); shift < 0: more noise. Betas capped at max_beta as cosine's are."""
    ab = torch.cumprod(1.0 - betas.to(torch.float64), 0)
    ab_new = torch.sigmoid(torch.logit(ab) + float(shift))
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ab_new[:-1]])
    return (1.0 - ab_new / prev).clamp(min=1e-12, max=max_beta)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: Spacing = "leading") -> torch.Tensor:
    """Kept timesteps (ascending, int64) for `steps` sampling steps, as diffusers' `timestep_spacing` defines them."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps} (the schedule's T), got {steps}")
    if spacing == "leading":
        ratio = num_timesteps // steps
        ts = torch.arange(steps, dtype=torch.float64).mul(ratio).round()
    elif spacing == "trailing":
        # diffusers: round(arange(T, 0, -T/steps)) - 1. A float-step arange can yield steps + 1 values (the last
        # ~0, giving t = -1: T=711, steps=469); T - i * ratio for i < steps is the same list without that edge
        ratio = num_timesteps / steps
        ts = torch.round(num_timesteps - torch.arange(steps, dtype=torch.float64) * ratio) - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown spacing {spacing!r}; accepted: {', '.join(SPACINGS)}")
    return torch.unique(ts.long())  # sorted ascending, duplicates (possible for linspace) removed


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A diffusion noise schedule: betas [T] in float64, and `timesteps` [T], the original index of each step.

    For a full schedule `timesteps` is arange(T); a respaced schedule keeps a subset of the original steps
    with betas recomputed from the kept alpha_bar, and the model is always called with the original index.
    """

    betas: torch.Tensor
    timesteps: torch.Tensor
    name: str = "custom"

    def __post_init__(self):
        b = self.betas
        if b.dim() != 1 or b.numel() < 1:
            raise ValueError("betas must be a non-empty 1-D tensor")
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        object.__setattr__(self, "betas", b.to(torch.float64))
        object.__setattr__(self, "timesteps", self.timesteps.to(torch.int64))

    @classmethod
    def from_name(cls, name: str, num_timesteps: int = 1000, logsnr_shift: float = 0.0) -> "NoiseSchedule":
        """Build `linear`, `cosine` or `sigmoid` with `num_timesteps` steps, its log-SNR shifted by
        `logsnr_shift` (`shift_logsnr`; 0 leaves the schedule as published)."""
        makers = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}
        if name not in makers:
            raise ValueError(f"unknown schedule {name!r}; accepted: {', '.join(SCHEDULES)}")
        if int(num_timesteps) < 2:
            raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
        if name == "linear" and int(num_timesteps) <= 20:
            raise ValueError(f"the linear schedule needs num_timesteps > 20 (its last beta is 20/T and must stay "
                             f"below 1), got {num_timesteps}; use cosine or sigmoid for fewer steps")
        betas = makers[name](int(num_timesteps))
        if not math.isfinite(float(logsnr_shift)):
            raise ValueError(f"logsnr_shift must be a finite number, got {logsnr_shift}")
        if float(logsnr_shift) != 0.0:
            betas, name = shift_logsnr(betas, logsnr_shift), f"{name}{float(logsnr_shift):+g}"
        return cls(betas, torch.arange(int(num_timesteps)), name)

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def is_respaced(self) -> bool:
        return not torch.equal(self.timesteps, torch.arange(self.num_timesteps))

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t = prod_{s<=t} alpha_s."""
        return torch.cumprod(self.alphas, 0)

    @cached_property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """alpha_bar_{t-1}, with alpha_bar_{-1} = 1 (the final step lands on clean data)."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @cached_property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_variance(self) -> torch.Tensor:
        """beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (variance of q(x_{t-1}|x_t,x0))."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta_tilde_t with t=0 (where it is 0) replaced by t=1's value, as improved-diffusion does."""
        pv = self.posterior_variance
        if pv.numel() == 1:
            return torch.log(self.betas)
        return torch.log(torch.cat([pv[1:2], pv[1:]]))

    @cached_property
    def posterior_mean_coef1(self) -> torch.Tensor:
        """Coefficient of x0 in the posterior mean: sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)."""
        return self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)

    @cached_property
    def posterior_mean_coef2(self) -> torch.Tensor:
        """Coefficient of x_t in the posterior mean: sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)."""
        return self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def respace(self, keep: Sequence[int] | torch.Tensor) -> "NoiseSchedule":
        """Schedule over a subset of this schedule's steps; betas recomputed so alpha_bar matches at kept steps."""
        keep = torch.as_tensor(keep, dtype=torch.int64)
        keep = torch.unique(keep)
        if keep.numel() == 0 or keep.min() < 0 or keep.max() >= self.num_timesteps:
            raise ValueError(f"respaced steps must be a non-empty subset of 0..{self.num_timesteps - 1}")
        ab = self.alphas_cumprod[keep]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        return NoiseSchedule(1.0 - ab / ab_prev, self.timesteps[keep], self.name)

    def spaced(self, steps: int, spacing: Spacing = "leading") -> "NoiseSchedule":
        """Respace to `steps` steps with diffusers' `leading`, `trailing` or `linspace` spacing."""
        return self.respace(spaced_timesteps(self.num_timesteps, steps, spacing))
