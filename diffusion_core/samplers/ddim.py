"""DDIM (Song et al. 2021, eq. 12) with eta in [0, 1] on any respaced schedule; eta=1 matches DDPM's sigma."""

from __future__ import annotations

import torch

from .common import Grid, NoiseSource, Predictor
from .registry import Option, SamplerSpec, register


def ddim_loop(predict: Predictor, x: torch.Tensor, grid: Grid, noise: NoiseSource, options: dict,
              callback=None) -> torch.Tensor:
    """x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z; the last step lands on ab = 1."""
    eta = options["eta"]
    for i in reversed(range(len(grid))):
        out = predict(x, i)
        a, a_prev = grid.alphas_cumprod[i], grid.alphas_cumprod_prev[i]
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev ** 0.5 * out["pred_x0"] + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * out["eps"]
        if sigma > 0:
            x = x + sigma * noise()
        if callback is not None:
            callback(i, x, out["pred_x0"])
    return x


register(SamplerSpec("ddim", ddim_loop, "DDIM; eta 0 deterministic, eta 1 = DDPM's posterior variance",
                     "Song et al. 2021, eq. 12",
                     options=(Option("eta", 0.0, 0.0, 1.0, "noise scale: 0 deterministic, 1 DDPM"),),
                     stochastic=lambda o: o["eta"] > 0))
