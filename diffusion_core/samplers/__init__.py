"""Samplers that own their loop: `sample(diffusion, model, shape, sampler=...)`.

- `ddpm`: ancestral sampling with the diffusion's variance (fixed_small / fixed_large / learned_range)
- `ddim`: DDIM with eta in [0, 1]
- `dpmpp2m`: DPM-Solver++(2M)
All run on a schedule respaced to `steps` (diffusers' `leading`, `trailing` or `linspace` spacing; the final
step lands on alpha_bar = 1), are deterministic given `generator`, and with `seeds` sample i depends only on
seeds[i], whatever the batch size.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..diffusion import GaussianDiffusion
from .common import NoiseSource, Predictor, sampling_diffusion
from .ddim import ddim_loop
from .ddpm import ddpm_loop
from .dpm_solver import dpmpp_2m_loop

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")

__all__ = ["SAMPLERS", "sample", "NoiseSource"]


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], sampler: str = "ddim",
           steps: int | None = None, eta: float = 0.0, spacing: str = "trailing",
           generator: torch.Generator | None = None, seeds: Sequence[int] | None = None, y=None, x_T=None,
           clip_denoised: bool = True, guidance=None, device=None, progress: bool = False,
           callback=None, lambda_min: float | None = -5.1) -> torch.Tensor:
    """Draw samples of `shape` [B, ...]; returns x0 in the data space (clipped to [-1,1] if clip_denoised).

    `lambda_min`: start no lower than log-SNR 2*lambda_min (diffusers' value for cosine, -5.1); None keeps the
    schedule's first step whatever its SNR. Every sampler needs it on the cosine schedule without x0 clipping
    (latents): DDPM's first ancestral step there multiplies the eps error by ~60. See `sampling_diffusion`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; accepted: {', '.join(SAMPLERS)}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    T = diffusion.num_timesteps
    if steps is not None and not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T} (the model's T), got {steps}")
    if device is None:
        device = x_T.device if x_T is not None else next(_params(model), torch.empty(0)).device
    d = sampling_diffusion(diffusion, steps, spacing, lambda_min)
    noise = NoiseSource(shape, device, torch.float32, generator, seeds)
    x = noise() if x_T is None else x_T.to(device, torch.float32)
    if y is not None:
        y = torch.as_tensor(y, dtype=torch.long, device=device)
    predict = Predictor(d, model, y, guidance, clip_denoised, eps_guidance=sampler != "ddpm")
    if progress:
        callback = _with_progress(d.num_timesteps, sampler, callback)
    if sampler == "ddpm":
        return ddpm_loop(predict, x, noise, callback)
    if sampler == "ddim":
        return ddim_loop(predict, x, noise, eta, callback)
    return dpmpp_2m_loop(predict, x, noise, lambda_min=-float('inf') if lambda_min is None else lambda_min,
                         callback=callback)


def _params(model):
    return model.parameters() if isinstance(model, torch.nn.Module) else iter(())


def _with_progress(total: int, desc: str, callback):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)

    def cb(i, x, x0):
        bar.update(1)
        if i == 0:
            bar.close()
        if callback is not None:
            callback(i, x, x0)

    return cb
