"""Multistep consistency sampling (Song et al. 2023, Algorithm 1) on any respaced schedule, in the VP form.

x^ = f(z, t_N) at the first grid point; at each later one the estimate is noised afresh to that level,
z = sqrt(ab) x^ + sqrt(1 - ab) noise, and mapped back, x^ = f(z, t). For a consistency model (distillation.
ConsistencyObjective) every call lands on the data; for any other denoiser it is a poor stochastic sampler.
"""

from __future__ import annotations

import torch

from .common import Grid, NoiseSource, Predictor
from .registry import SamplerSpec, register


def consistency_loop(predict: Predictor, x: torch.Tensor, grid: Grid, noise: NoiseSource, options: dict,
                     callback=None) -> torch.Tensor:
    for i in reversed(range(len(grid))):
        x0 = predict(x, i)["pred_x0"]
        a_prev = grid.alphas_cumprod_prev[i]
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * noise() if i > 0 else x0
        if callback is not None:
            callback(i, x, x0)
    return x


register(SamplerSpec("consistency", consistency_loop,
                     "multistep consistency sampling: x0 estimate, noised afresh to the next grid point",
                     "Song et al. 2023, Algorithm 1", stochastic=lambda o: True))
