"""DPM-Solver++(2M) (Lu et al. 2022, alg. 2): a second-order multistep solver of the probability-flow ODE
in data (x0) prediction, with lambda_t = log(alpha_t / sigma_t).

Two guards keep it stable at the ends of the cosine schedule: the last step is first order (it lands on
sigma = 0, where x = x0), and the second-order correction is skipped when the previous x0 came from a point
of SNR below exp(2 * lambda_min) (default lambda_min = -5.1, as diffusers recommends for cosine): there
x0 = (x - sigma eps) / alpha amplifies the network's error by 1/alpha, and the correction would carry it on.
"""

from __future__ import annotations

import math

import torch

from .common import NoiseSource, Predictor


def dpmpp_2m_loop(predict: Predictor, x: torch.Tensor, noise: NoiseSource, lambda_min: float = -5.1,
                  callback=None) -> torch.Tensor:
    sched = predict.diffusion.schedule
    ab, ab_prev_all = sched.alphas_cumprod.tolist(), sched.alphas_cumprod_prev.tolist()
    x0_prev, h_prev, lam_prev = None, None, None
    for i in reversed(range(sched.num_timesteps)):
        out = predict(x, i)
        x0 = out["pred_x0"]
        a_s, a_t = ab[i], ab_prev_all[i]
        if a_t >= 1.0:  # final step onto clean data: sigma_t = 0, first order gives x0
            x = x0
        else:
            lam_s = 0.5 * math.log(a_s / (1 - a_s))
            lam_t = 0.5 * math.log(a_t / (1 - a_t))
            h = lam_t - lam_s
            if x0_prev is None or lam_prev < lambda_min:
                d = x0
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = math.sqrt((1 - a_t) / (1 - a_s)) * x - math.sqrt(a_t) * math.expm1(-h) * d
            x0_prev, h_prev, lam_prev = x0, h, lam_s
        if callback is not None:
            callback(i, x, x0)
    return x
