"""Pieces every sampler shares: seeded noise, the (respaced) step list, guided model predictions."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..diffusion import GaussianDiffusion
from ..schedules import spaced_timesteps
from ..guidance import ClassifierFreeGuidance, ClassifierGuidance


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


def sampling_diffusion(diffusion: GaussianDiffusion, steps: int | None, spacing: str,
                       lambda_min: float | None = None) -> GaussianDiffusion:
    """The diffusion respaced to `steps` steps (the full schedule when steps is None or T).

    With `lambda_min`, steps whose log-SNR 2*lambda lies below 2*lambda_min are moved down to the last step
    above it. At the end of the cosine schedule (beta capped at 0.999, alpha_bar_999 ~ 2e-9) an eps-model's
    x0 = (x - sqrt(1-ab) eps)/sqrt(ab) multiplies its error by 1/sqrt(ab) ~ 2e4, which deterministic samplers
    carry into the sample; starting from SNR ~ e^-10.2 instead changes x_T's distribution by < 1%.
    """
    sched = diffusion.schedule
    T = diffusion.num_timesteps
    keep = torch.arange(T) if steps is None else spaced_timesteps(T, steps, spacing)
    if lambda_min is not None:
        lam = 0.5 * torch.log(sched.snr)
        ok = torch.nonzero(lam >= lambda_min).flatten()
        if len(ok):
            keep = torch.unique(keep.clamp(max=int(ok.max())))
    if len(keep) == T:
        return diffusion
    return diffusion.respaced(sched.respace(keep))


class Predictor:
    """Calls the (guided) model at schedule index i and returns p_mean_variance's dict.

    Classifier guidance is applied as an eps correction eps - sqrt(1 - ab) * grad (Dhariwal & Nichol alg. 2)
    when `eps_guidance`, else as the DDPM mean shift mean + sigma^2 * grad (alg. 1).
    """

    def __init__(self, diffusion: GaussianDiffusion, model: Callable, y, guidance, clip_denoised: bool,
                 eps_guidance: bool):
        self.diffusion, self.y, self.clip = diffusion, y, clip_denoised
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
        d = self.diffusion
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
