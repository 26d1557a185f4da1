"""DPM-Solver++ (Lu et al. 2022): multistep solvers in data (x0) prediction, lambda_t = log(alpha_t / sigma_t).

- `dpmpp2m`: second-order multistep solver of the probability-flow ODE (alg. 2);
- `dpmpp2m_sde`: its SDE variant (the paper's SDE-DPM-Solver++(2M), diffusers' `sde-dpmsolver++`), which injects
  fresh noise each step like ancestral sampling;
- `dpmpp3m`: the third-order multistep ODE solver (diffusers' `solver_order=3`).
Guards at the ends of the cosine schedule: the last step is first order (it lands on sigma = 0, where x = x0); a
history point is not used when it came from a point of log-SNR below 2 * lambda_min (x0 = (x - sigma eps) / alpha
amplifies the network's error by 1/alpha there); with fewer than 15 steps the second-last step is at most second
order (diffusers' `lower_order_final`).

The third-order step: with D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0''/2, the exact integral's x0'' term is
alpha_t (h^2/2 - h + 1 - e^{-h}) x0'' = 2 alpha_t phi_3 D2 (phi_3 = (e^{-h} - 1 + h)/h^2 - 1/2 up to sign). The
DPM-Solver reference code and diffusers (0.3x) weigh D2 by phi_3 alone, which leaves a local error O(h^3), i.e. a
second-order method; measured on the exact Gaussian trajectory (tests/test_sampler_oracles.py) their step's local
error falls as h^3, this one's as h^4. `D2_WEIGHT = 1.0` reproduces diffusers' trajectory.
"""

from __future__ import annotations

import math

import torch

from .common import Grid, NoiseSource, Predictor
from .registry import SamplerSpec, register

D2_WEIGHT = 2.0  # weight of phi_3 D2 in the third-order step (2: third order; 1: DPM-Solver/diffusers code)


def multistep_loop(predict: Predictor, x: torch.Tensor, grid: Grid, noise: NoiseSource, order: int, sde: bool,
                   callback=None) -> torch.Tensor:
    n = len(grid)
    hist: list[tuple[torch.Tensor, float]] = []  # (x0, lambda) of earlier points, newest last
    for i in reversed(range(n)):
        out = predict(x, i)
        x0, a_s, a_t = out["pred_x0"], grid.alphas_cumprod[i], grid.alphas_cumprod_prev[i]
        lam_s = Grid.log_snr_half(a_s)
        if a_t >= 1.0:  # final step onto clean data: sigma_t = 0, first order gives x0
            x = x0
        else:
            lam_t = Grid.log_snr_half(a_t)
            h = lam_t - lam_s
            k = 1  # order of this step: 1 + the newest history points that are usable, in a row
            for _, lam_p in reversed(hist[len(hist) - (order - 1):]):
                if lam_p < predict.lambda_min:
                    break
                k += 1
            if n < 15 and i == 1:
                k = min(k, 2)
            a_t_sqrt, s_t, s_s = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(1 - a_s)
            if sde:
                x = _sde_step(x, x0, hist, k, h, lam_s, a_t_sqrt, s_t, s_s, noise)
            else:
                x = _ode_step(x, x0, hist, k, h, lam_s, a_t_sqrt, s_t, s_s)
            hist = (hist + [(x0, lam_s)])[-2:]
        if callback is not None:
            callback(i, x, x0)
    return x


def _differences(x0, hist, k, h, lam_s):
    """(D1, D2) of DPM-Solver++: scaled first and second divided differences of the x0 history."""
    if k == 1:
        return None, None
    m1, lam1 = hist[-1]
    r0 = (lam_s - lam1) / h
    d1_0 = (x0 - m1) / r0
    if k == 2:
        return d1_0, None
    m2, lam2 = hist[-2]
    r1 = (lam1 - lam2) / h
    d1_1 = (m1 - m2) / r1
    return d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


def _ode_step(x, x0, hist, k, h, lam_s, a_t, s_t, s_s):
    e = math.expm1(-h)  # e^{-h} - 1
    d1, d2 = _differences(x0, hist, k, h, lam_s)
    x = (s_t / s_s) * x - a_t * e * x0
    if k == 2:
        x = x - 0.5 * a_t * e * d1  # midpoint form (alg. 2)
    elif k == 3:
        x = x + a_t * (e / h + 1.0) * d1 - D2_WEIGHT * a_t * ((e + h) / h ** 2 - 0.5) * d2
    return x


def _sde_step(x, x0, hist, k, h, lam_s, a_t, s_t, s_s, noise):
    e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
    d1, _ = _differences(x0, hist, min(k, 2), h, lam_s)
    x = (s_t / s_s * math.exp(-h)) * x + a_t * e2 * x0
    if d1 is not None:
        x = x + 0.5 * a_t * e2 * d1
    return x + s_t * math.sqrt(e2) * noise()


def dpmpp_2m_loop(predict, x, grid, noise, options, callback=None):
    return multistep_loop(predict, x, grid, noise, 2, False, callback)


def dpmpp_2m_sde_loop(predict, x, grid, noise, options, callback=None):
    return multistep_loop(predict, x, grid, noise, 2, True, callback)


def dpmpp_3m_loop(predict, x, grid, noise, options, callback=None):
    return multistep_loop(predict, x, grid, noise, 3, False, callback)


register(SamplerSpec("dpmpp2m", dpmpp_2m_loop, "DPM-Solver++(2M), second-order multistep ODE solver",
                     "Lu et al. 2022, alg. 2"))
register(SamplerSpec("dpmpp2m_sde", dpmpp_2m_sde_loop, "SDE-DPM-Solver++(2M), stochastic second-order multistep",
                     "Lu et al. 2022, sec. 5", stochastic=lambda o: True))
register(SamplerSpec("dpmpp3m", dpmpp_3m_loop, "DPM-Solver++(3M), third-order multistep ODE solver",
                     "Lu et al. 2022, app. B"))
