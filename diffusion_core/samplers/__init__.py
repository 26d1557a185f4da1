"""Samplers that own their loop: `sample(diffusion, model, shape, sampler=..., steps=..., spacing=...)`.

Every module of this package registers its samplers in `registry.SAMPLERS` (importing the package imports them
all), which is the one list the CLI, params validation, the sweep and the docs read: ddpm, ddim, euler, heun,
dpmpp2m, dpmpp2m_sde, dpmpp3m (`registry.describe()`). All run on a grid of the model's own timesteps
(`grids.SPACINGS`: leading / trailing / linspace timesteps, logsnr / karras noise levels; the final step lands on
alpha_bar = 1), are deterministic given `generator`, and with `seeds` sample i depends only on seeds[i], whatever
the batch size.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Sequence

import torch

from ..diffusion import GaussianDiffusion
from .common import Grid, NoiseSource, Predictor, sampling_diffusion
from .grids import SPACINGS
from .registry import SAMPLERS, SamplerSpec, describe, get_sampler, resolve_options

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["SAMPLERS", "SPACINGS", "Grid", "NoiseSource", "SamplerSpec", "describe", "get_sampler", "resolve_options",
           "sample", "sampler_options"]


def sampler_options(sampler: str, eta: float | None = None, options: dict | None = None) -> dict:
    """Resolved options; `eta` (kept for the DDIM-era API) goes to the sampler's eta option, and a nonzero eta
    for a sampler without one is an error."""
    options = dict(options or {})
    spec = get_sampler(sampler)
    if eta is not None:
        if any(o.name == "eta" for o in spec.options):
            options.setdefault("eta", eta)
        elif eta != 0:
            raise ValueError(f"sampler {sampler!r} has no eta option (eta applies to ddim); got eta={eta}")
    return resolve_options(sampler, options)


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], sampler: str = "ddim",
           steps: int | None = None, eta: float | None = None, spacing: str = "trailing",
           generator: torch.Generator | None = None, seeds: Sequence[int] | None = None, y=None, x_T=None,
           clip_denoised: bool = True, guidance=None, device=None, progress: bool = False,
           callback=None, lambda_min: float | None = -5.1, options: dict | None = None) -> torch.Tensor:
    """Draw samples of `shape` [B, ...]; returns x0 in the data space (clipped to [-1,1] if clip_denoised).

    `steps`: grid points (None: every timestep); `options`: the sampler's own (see `registry.describe()`).
    `lambda_min`: start no lower than log-SNR 2*lambda_min (diffusers' value for cosine, -5.1); None keeps the
    schedule's first step whatever its SNR. Every sampler needs it on the cosine schedule without x0 clipping
    (latents): DDPM's first ancestral step there multiplies the eps error by ~60. See `grids.grid_timesteps`.
    A float64 `x_T` keeps the whole trajectory in float64 (oracle tests).
    """
    spec = get_sampler(sampler)
    opts = sampler_options(sampler, eta, options)
    T = diffusion.num_timesteps
    if steps is not None and not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T} (the model's T), got {steps}")
    if device is None:
        device = x_T.device if x_T is not None else next(_params(model), torch.empty(0)).device
    d = sampling_diffusion(diffusion, steps, spacing, lambda_min)
    dtype = x_T.dtype if x_T is not None and x_T.dtype == torch.float64 else torch.float32
    noise = NoiseSource(shape, device, dtype, generator, seeds)
    x = noise() if x_T is None else x_T.to(device, dtype)
    if y is not None:
        y = torch.as_tensor(y, dtype=torch.long, device=device)
    predict = Predictor(d, model, y, guidance, clip_denoised, eps_guidance=spec.guidance == "eps",
                        lambda_min=lambda_min, base=diffusion)
    if progress:
        callback = _with_progress(d.num_timesteps, sampler, callback)
    return spec.loop(predict, x, Grid.of(d), noise, opts, callback)


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
