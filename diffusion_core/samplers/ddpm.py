"""DDPM ancestral sampling (Ho et al. alg. 2) with fixed or learned variances, on any respaced schedule."""

from __future__ import annotations

import torch

from .common import Grid, NoiseSource, Predictor
from .registry import SamplerSpec, register


def ddpm_loop(predict: Predictor, x: torch.Tensor, grid: Grid, noise: NoiseSource, options: dict,
              callback=None) -> torch.Tensor:
    """x_{t-1} = mu(x_t, t) + sigma_t z, z ~ N(0, I), no noise at the last step (the model's mean and variance at
    each grid point: the posterior onto the next one)."""
    for i in reversed(range(len(grid))):
        out = predict(x, i)
        z = noise()
        x = out["mean"] + (torch.exp(0.5 * out["log_variance"]) * z if i > 0 else 0.0)
        if callback is not None:
            callback(i, x, out["pred_x0"])
    return x


register(SamplerSpec("ddpm", ddpm_loop, "ancestral sampling with the model's variance", "Ho et al. 2020, alg. 2",
                     guidance="mean", stochastic=lambda o: True))
