"""Pieces every sampler shares: seeded noise, the grid of noise levels, guided model predictions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from ..diffusion import GaussianDiffusion
from ..guidance import ClassifierFreeGuidance, ClassifierGuidance
from .grids import grid_timesteps


@dataclass(frozen=True)
class SamplingSpec:
    """One sampling setting: a sampler (its registry name) on a grid, the sampler's own options, the guidance.

    `steps` grid points (None: every timestep) placed by `spacing` (samplers.SPACINGS); `options` are the sampler's
    own (`samplers.describe()`: eta, s_churn ...; `generate` fills in the defaults and checks them); `guidance`
    is none, cfg (the model's null class) or classifier (generate's `classifier_bundle`), at `scale`.
    """

    sampler: str = "ddim"
    steps: int | None = None
    spacing: str = "trailing"
    options: Mapping[str, float] = field(default_factory=dict)
    guidance: str = "none"
    scale: float = 1.0

    @classmethod
    def from_setting(cls, setting: Mapping, **changes) -> "SamplingSpec":
        """From a setting as the sweep, evaluate and MLflow requests write it (sampler, steps, spacing, options,
        guidance, scale, eta), with `changes` on top. A scale of None is 1; a nonzero eta goes into the options
        (DDIM's noise; an eta in `options` wins)."""
        values = {k: setting[k] for k in ("sampler", "steps", "spacing", "options", "guidance", "scale")
                  if k in setting}
        values = {**values, **changes}
        eta = setting.get("eta") or 0.0
        values["options"] = {**({"eta": eta} if eta else {}), **(values.get("options") or {})}
        if values.get("scale") is None:
            values["scale"] = 1.0
        return cls(**values)


class NoiseSource:
    """Standard normal draws of one batch shape; with `seeds`, sample i's draws depend only on seeds[i].

    Per-sample draws come from CPU generators so a set of samples is the same whatever the batch size,
    the worker count or the device.
    """

    def __init__(self, shape: Sequence[int], device, dtype=torch.float32,
                 generator: torch.Generator | None = None, seeds: Sequence[int] | None = None):
        self.shape, self.device, self.dtype = tuple(shape), device, dtype
        self.generator = generator
        self.generators = None
        if seeds is not None:
            if len(seeds) != self.shape[0]:
                raise ValueError(f"got {len(seeds)} seeds for a batch of {self.shape[0]}")
            self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self) -> torch.Tensor:
        if self.generators is not None:
            z = torch.stack([torch.randn(self.shape[1:], generator=g) for g in self.generators])
            return z.to(self.device, self.dtype)
        gen_device = self.generator.device if self.generator is not None else self.device
        return torch.randn(self.shape, generator=self.generator, device=gen_device).to(self.device, self.dtype)


@dataclass(frozen=True)
class Grid:
    """The noise levels a sampler steps through, computed once per `sample` call (k-diffusion's `sigmas`, in
    alpha_bar). Point i (0 the least noisy) is the model's timestep `timesteps[i]` at `alphas_cumprod[i]`; the step
    from point i lands on `alphas_cumprod_prev[i]`, point i - 1's level (1, clean data, below point 0). Loops run
    i = len(grid) - 1 down to 0 and call the network at point i as `predict(x, i)`."""

    timesteps: tuple[int, ...]
    alphas_cumprod: tuple[float, ...]
    alphas_cumprod_prev: tuple[float, ...]

    @classmethod
    def of(cls, diffusion: GaussianDiffusion) -> "Grid":
        """The grid of a (respaced) diffusion's schedule."""
        s = diffusion.schedule
        return cls(tuple(s.timesteps.tolist()), tuple(s.alphas_cumprod.tolist()),
                   tuple(s.alphas_cumprod_prev.tolist()))

    def __len__(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def sigma(alpha_bar: float) -> float:
        """EDM's sigma = sigma_t / alpha_t = 1 / sqrt(SNR) at a level (0 on clean data)."""
        return math.sqrt((1 - alpha_bar) / alpha_bar) if alpha_bar < 1 else 0.0

    @staticmethod
    def log_snr_half(alpha_bar: float) -> float:
        """DPM-Solver's lambda = log(alpha_t / sigma_t), half the log-SNR, at a level below 1."""
        return 0.5 * math.log(alpha_bar / (1 - alpha_bar))


def sampling_diffusion(diffusion: GaussianDiffusion, steps: int | None, spacing: str,
                       lambda_min: float | None = None) -> GaussianDiffusion:
    """The diffusion respaced to the `steps`-point grid `spacing` (see `grids.grid_timesteps`)."""
    keep = grid_timesteps(diffusion.schedule, steps, spacing, lambda_min)
    if len(keep) == diffusion.num_timesteps:
        return diffusion
    return diffusion.respaced(diffusion.schedule.respace(keep))


class Predictor:
    """Calls the (guided) model at schedule index i and returns p_mean_variance's dict.

    Classifier guidance is applied as an eps correction eps - sqrt(1 - ab) * grad (Dhariwal & Nichol alg. 2)
    when `eps_guidance`, else as the DDPM mean shift mean + sigma^2 * grad (alg. 1).
    """

    def __init__(self, diffusion: GaussianDiffusion, model: Callable, y, guidance, clip_denoised: bool,
                 eps_guidance: bool, lambda_min: float | None = None, base: GaussianDiffusion | None = None):
        self.diffusion, self.y, self.clip = diffusion, y, clip_denoised
        self.lambda_min = -float("inf") if lambda_min is None else lambda_min  # multistep solvers' guard
        self.base = base if base is not None else diffusion  # the model's full schedule (off-grid calls)
        self.cond_fn = None
        if isinstance(guidance, ClassifierFreeGuidance):
            model = guidance.wrap(model)
        elif isinstance(guidance, ClassifierGuidance):
            if guidance.scale != 0:
                self.cond_fn = guidance.grad
        elif guidance is not None:
            raise TypeError(f"guidance must be ClassifierGuidance, ClassifierFreeGuidance or None, got {guidance!r}")
        self.model, self.eps_guidance = model, eps_guidance
        self.nfe = 0

    def __call__(self, x: torch.Tensor, i: int) -> dict:
        """Predictions at step i of the sampling schedule."""
        return self._predict(self.diffusion, x, i)

    def at_timestep(self, x: torch.Tensor, t_model: int) -> dict:
        """Predictions at one of the model's own timesteps, on or off the grid (EDM's churn)."""
        return self._predict(self.base, x, t_model)

    def _predict(self, d: GaussianDiffusion, x: torch.Tensor, i: int) -> dict:
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = d.p_mean_variance(self.model, x, t, self.y, clip_denoised=self.clip)
        self.nfe += 1
        if self.cond_fn is None:
            return out
        grad = self.cond_fn(x, d.model_timesteps(t), self.y)
        if self.eps_guidance:
            eps = out["eps"] - d.coef("sqrt_one_minus_ab", t, x) * grad
            x0 = d.x0_from_eps(x, t, eps)
            if self.clip:
                x0 = x0.clamp(-1, 1)
                eps = d.eps_from_x0(x, t, x0)
            out = dict(out, eps=eps, pred_x0=x0, mean=d.q_posterior(x0, x, t)[0])
        else:
            out = dict(out, mean=out["mean"] + out["variance"] * grad)
        return out
