"""Samplers that own their loop: `sample(diffusion, model, shape, SamplingSpec("dpmpp2m", steps=20))`.

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
from .common import Grid, NoiseSource, Predictor, SamplingSpec, sampling_diffusion
from .grids import SPACINGS
from .registry import SAMPLERS, SamplerSpec, describe, get_sampler, resolve_options

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["SAMPLERS", "SPACINGS", "Grid", "NoiseSource", "SamplerSpec", "SamplingSpec", "describe", "get_sampler",
           "resolve_options", "sample"]


@torch.no_grad()
def sample(diffusion: GaussianDiffusion, model: Callable, shape: Sequence[int], spec: SamplingSpec | None = None, *,
           generator: torch.Generator | None = None, seeds: Sequence[int] | None = None, y=None, x_T=None,
           clip_denoised: bool = True, guidance=None, device=None, progress: bool = False, callback=None,
           lambda_min: float | None = -5.1) -> torch.Tensor:
    """Draw samples of `shape` [B, ...] with `spec` (default: DDIM on every timestep); returns x0 in the data space
    (clipped to [-1,1] if clip_denoised).

    `spec`: the sampler, its grid (`steps` points, None: every timestep, placed by `spacing`) and its own options
    (see `registry.describe()`). Guidance is the `guidance` object (ClassifierFreeGuidance, ClassifierGuidance);
    `generate` builds it from a spec's `guidance` and `scale`; here a spec that asks for guidance without the
    object is an error.
    `lambda_min`: start no lower than log-SNR 2*lambda_min (diffusers' value for cosine, -5.1); None keeps the
    schedule's first step whatever its SNR. Every sampler needs it on the cosine schedule without x0 clipping
    (latents): DDPM's first ancestral step there multiplies the eps error by ~60. See `grids.grid_timesteps`.
    A float64 `x_T` keeps the whole trajectory in float64 (oracle tests).
    """
    spec = spec if spec is not None else SamplingSpec()
    if spec.guidance != "none" and guidance is None:
        raise ValueError(f"the spec asks for {spec.guidance} guidance but no guidance object was given: pass "
                         f"guidance=ClassifierFreeGuidance(...) or ClassifierGuidance(...), or use generation.generate")
    sampler, steps = spec.sampler, spec.steps
    loop = get_sampler(sampler)
    opts = resolve_options(sampler, dict(spec.options))
    T = diffusion.num_timesteps
    if steps is not None and not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..{T} (the model's T), got {steps}")
    if device is None:
        device = x_T.device if x_T is not None else next(_params(model), torch.empty(0)).device
    d = sampling_diffusion(diffusion, steps, spec.spacing, lambda_min)
    dtype = x_T.dtype if x_T is not None and x_T.dtype == torch.float64 else torch.float32
    noise = NoiseSource(shape, device, dtype, generator, seeds)
    x = noise() if x_T is None else x_T.to(device, dtype)
    if y is not None:
        y = torch.as_tensor(y, dtype=torch.long, device=device)
    predict = Predictor(d, model, y, guidance, clip_denoised, eps_guidance=loop.guidance == "eps",
                        lambda_min=lambda_min, base=diffusion)
    if progress:
        callback = _with_progress(d.num_timesteps, sampler, callback)
    return loop.loop(predict, x, Grid.of(d), noise, opts, callback)


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
