"""Grids of noise levels for sampling: which of the model's timesteps a sampler visits.

Timestep spacings (diffusers' `timestep_spacing`): `leading`, `trailing`, `linspace`. Noise-level grids:
`logsnr` (uniform in log-SNR, DPM-Solver's choice) and `karras` (sigma_i = (s_max^(1/rho) + i/(N-1)
(s_min^(1/rho) - s_max^(1/rho)))^rho with rho = 7, Karras et al. 2022 eq. 5, in EDM's sigma = sqrt(1/SNR)). A
discrete-time model is only queried at its own timesteps, so continuous levels snap to the nearest timestep in
log-sigma (distinct, keeping N points). Every grid starts no lower than log-SNR 2 * lambda_min (see `grid_timesteps`).
"""

from __future__ import annotations

import math

import torch

from ..schedules import NoiseSchedule, spaced_timesteps

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SPACINGS = TIMESTEP_SPACINGS + ("logsnr", "karras")
KARRAS_RHO = 7.0


def _snap(targets: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Distinct timesteps nearest to `targets` (log-sigma, descending), ascending; log_sigma ascends with t."""
    n, hi, out = len(targets), len(log_sigma) - 1, []
    for k, v in enumerate(targets.tolist()):
        cand = torch.arange(n - 1 - k, hi + 1)  # leave room for the points still to place
        j = int(cand[(log_sigma[cand] - v).abs().argmin()])
        out.append(j)
        hi = j - 1
    return torch.tensor(sorted(out), dtype=torch.int64)


def grid_timesteps(schedule: NoiseSchedule, steps: int | None, spacing: str = "trailing",
                   lambda_min: float | None = None) -> torch.Tensor:
    """Ascending timesteps of a `steps`-point grid (all T when steps is None).

    With `lambda_min`, no step lies below log-SNR 2 * lambda_min: timestep spacings move such steps down to the
    last timestep above it, noise-level grids start there. At the end of the cosine schedule (alpha_bar_999 ~ 2e-9)
    an eps-model's x0 = (x - sqrt(1-ab) eps)/sqrt(ab) multiplies its error by 1/sqrt(ab) ~ 2e4; starting from
    SNR ~ e^-10.2 instead changes x_T's distribution by < 1%.
    """
    T = schedule.num_timesteps
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; accepted: {', '.join(SPACINGS)}")
    lam = 0.5 * torch.log(schedule.snr)
    ok = torch.nonzero(lam >= lambda_min).flatten() if lambda_min is not None else torch.arange(T)
    top = int(ok.max()) if len(ok) else T - 1
    if steps is None:
        return torch.arange(top + 1)
    if spacing in TIMESTEP_SPACINGS:
        keep = spaced_timesteps(T, steps, spacing)
        return torch.unique(keep.clamp(max=top))
    if not 1 <= steps <= top + 1:
        raise ValueError(f"steps must be in 1..{top + 1} for the {spacing} grid, got {steps}")
    log_sigma = -lam  # log(sigma / alpha), ascending in t
    lo, hi = float(log_sigma[0]), float(log_sigma[top])
    if spacing == "logsnr":
        targets = torch.linspace(hi, lo, steps, dtype=torch.float64)
    else:  # Karras et al. eq. 5 on sigma = exp(log_sigma), from sigma_max down to sigma_min
        i = torch.linspace(0, 1, steps, dtype=torch.float64)
        a, b = math.exp(hi / KARRAS_RHO), math.exp(lo / KARRAS_RHO)  # sigma_max^(1/rho), sigma_min^(1/rho)
        targets = KARRAS_RHO * torch.log(a + i * (b - a))
    return _snap(targets, log_sigma[: top + 1])
