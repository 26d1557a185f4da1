"""Euler and Heun samplers of Karras et al. 2022 (EDM), algorithms 1 and 2, with stochastic churn.

In EDM's variables x~ = x_t / alpha_t, sigma = sigma_t / alpha_t = 1/sqrt(SNR), the probability-flow ODE is
dx~/dsigma = (x~ - D(x~; sigma)) / sigma, D = the model's x0. Euler steps it (deterministic Euler is DDIM eta 0);
Heun adds a trapezoidal correction with a second call at the next level (none on the last step, which lands on
sigma = 0), so NFE = 2 N - 1. Churn (alg. 2, S_churn > 0): at levels with S_tmin <= sigma <= S_tmax, noise is added
to raise sigma to sigma_hat = sigma (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1), before the step; for a
discrete-time model sigma_hat is the nearest of its own timesteps' levels (never below sigma), and the added
noise has exactly the variance that brings x~ to that level (times S_noise^2).
"""

from __future__ import annotations

import math

import torch

from .common import Grid, NoiseSource, Predictor
from .registry import Option, SamplerSpec, register

CHURN_OPTIONS = (
    Option("s_churn", 0.0, 0.0, math.inf, "stochasticity: 0 deterministic (EDM's S_churn)"),
    Option("s_tmin", 0.0, 0.0, math.inf, "churn only at sigma = 1/sqrt(SNR) >= s_tmin"),
    Option("s_tmax", math.inf, 0.0, math.inf, "churn only at sigma <= s_tmax"),
    Option("s_noise", 1.0, 0.0, math.inf, "scale of the churn noise (EDM's S_noise)"),
)


def _churn(predict: Predictor, grid: Grid, x_tilde, i: int, s: float, options: dict, noise: NoiseSource):
    """(x~_hat, sigma_hat, predictions at sigma_hat): EDM alg. 2 lines 4-6 on the model's own timesteps."""
    in_range = options["s_tmin"] <= s <= options["s_tmax"]
    gamma = min(options["s_churn"] / len(grid), math.sqrt(2) - 1) if in_range else 0.0
    if gamma <= 0:
        return x_tilde, s, None
    base = predict.base.schedule
    t_i = grid.timesteps[i]
    log_sigma = -0.5 * torch.log(base.snr[t_i:])
    t_hat = t_i + int((log_sigma - math.log(s * (1 + gamma))).abs().argmin())
    a_hat = float(base.alphas_cumprod[t_hat])
    s_hat = Grid.sigma(a_hat)
    if t_hat == t_i:
        return x_tilde, s, None
    x_tilde = x_tilde + math.sqrt(s_hat ** 2 - s ** 2) * options["s_noise"] * noise()
    return x_tilde, s_hat, predict.at_timestep(x_tilde * math.sqrt(a_hat), t_hat)


def edm_loop(predict: Predictor, x: torch.Tensor, grid: Grid, noise: NoiseSource, options: dict, heun: bool,
             callback=None) -> torch.Tensor:
    for i in reversed(range(len(grid))):
        a, a_next = grid.alphas_cumprod[i], grid.alphas_cumprod_prev[i]
        s, s_next = Grid.sigma(a), Grid.sigma(a_next)
        x_tilde, s_hat, out = _churn(predict, grid, x / math.sqrt(a), i, s, options, noise)
        if out is None:
            out = predict(x, i)
        d = (x_tilde - out["pred_x0"]) / s_hat
        x_next = x_tilde + (s_next - s_hat) * d
        if heun and s_next > 0:
            d2 = (x_next - predict(x_next * math.sqrt(a_next), i - 1)["pred_x0"]) / s_next
            x_next = x_tilde + (s_next - s_hat) * 0.5 * (d + d2)
        x = x_next * math.sqrt(a_next)
        if callback is not None:
            callback(i, x, out["pred_x0"])
    return x


def euler_loop(predict, x, grid, noise, options, callback=None):
    return edm_loop(predict, x, grid, noise, options, False, callback)


def heun_loop(predict, x, grid, noise, options, callback=None):
    return edm_loop(predict, x, grid, noise, options, True, callback)


register(SamplerSpec("euler", euler_loop, "Euler on the probability-flow ODE, optional churn",
                     "Karras et al. 2022, alg. 1-2", options=CHURN_OPTIONS, stochastic=lambda o: o["s_churn"] > 0))
register(SamplerSpec("heun", heun_loop, "Heun (2nd order, 2 calls per step but the last), optional churn",
                     "Karras et al. 2022, alg. 1-2", options=CHURN_OPTIONS, calls_per_step=2,
                     stochastic=lambda o: o["s_churn"] > 0))
