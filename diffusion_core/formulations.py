"""What the network predicts: one small class per formulation (eps, x0, v, mu, edm).

A formulation knows four things about its network output F(x_t, t):
- `target`: what F is trained to match (given x0, the noise and x_t);
- `x0`: how F turns into the model's estimate of x0 (and `eps` from it);
- `x0_weight`: lambda_t in ||F - target||^2 = lambda_t ||x0_hat - x0||^2 (SNR for eps, SNR + 1 for v), which turns
  any weighting defined on the x0 error (Min-SNR-gamma: min(SNR, gamma), Hang et al. 2023) into a weight on this
  formulation's own loss;
- `model_input`: what the network sees (x_t, except for the preconditioned `edm`).
and optionally `timestep_probs`, a training distribution over timesteps of its own (weights 1, it is part of the
objective). Everything is written for the discrete-time VP process x_t = alpha_t x0 + sigma_t eps with
alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t); the model is always called at the original timestep index.
A formulation sees only the noise levels at the batch's timesteps (`Levels`), never the diffusion that holds it.
Adding a formulation (flow matching, ...) is one new class registered in FORMULATIONS.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, ClassVar

import torch

from .schedules import NoiseSchedule


class Levels:
    """The schedule's coefficients at a batch's timesteps t, each looked up on first use.

    Every one is cast to x_t's dtype and shaped [B, 1, ...] to broadcast against it, except `snr` and
    `mean_coef1_64` (float64 [B], for loss weights). `mean_coef1/2` are the coefficients of q(x_{t-1} | x_t, x0)'s
    mean on this schedule; `mu_coef1/2` those a mean-predicting network learnt (the training schedule's, at the
    original timestep, when the sampler runs on a respaced one). `lookup(name)` returns the named table's rows.
    """

    def __init__(self, lookup: Callable[[str], torch.Tensor]):
        self._lookup = lookup

    alpha = property(lambda s: s._lookup("sqrt_ab"), doc="alpha_t = sqrt(ab_t)")
    sigma = property(lambda s: s._lookup("sqrt_one_minus_ab"), doc="sigma_t = sqrt(1 - ab_t)")
    sigma2 = property(lambda s: s._lookup("one_minus_ab"), doc="sigma_t^2 = 1 - ab_t")
    recip_alpha = property(lambda s: s._lookup("sqrt_recip_ab"), doc="1 / alpha_t")
    sigma_over_alpha = property(lambda s: s._lookup("sqrt_recipm1_ab"), doc="sigma_t / alpha_t = 1 / sqrt(SNR)")
    mean_coef1 = property(lambda s: s._lookup("posterior_mean_coef1"))
    mean_coef2 = property(lambda s: s._lookup("posterior_mean_coef2"))
    mu_coef1 = property(lambda s: s._lookup("mu_coef1"))
    mu_coef2 = property(lambda s: s._lookup("mu_coef2"))
    snr = property(lambda s: s._lookup("snr"), doc="SNR_t = ab_t / (1 - ab_t), float64 [B]")
    mean_coef1_64 = property(lambda s: s._lookup("mean_coef1_64"), doc="mean_coef1, float64 [B]")


class Formulation(ABC):
    """Abstract base: the eps estimate derives from the x0 estimate; the network sees x_t itself."""

    name: ClassVar[str] = ""

    @abstractmethod
    def target(self, lv: Levels, x0, noise, x_t) -> torch.Tensor:
        """The training target of the network output."""

    @abstractmethod
    def x0(self, lv: Levels, x_t, out) -> torch.Tensor:
        """x0 estimate from the network output."""

    def eps(self, lv: Levels, x_t, out) -> torch.Tensor:
        """eps = (x_t - alpha x0) / sigma, written as (x_t / alpha - x0) / (sigma / alpha)."""
        return (lv.recip_alpha * x_t - self.x0(lv, x_t, out)) / lv.sigma_over_alpha

    @abstractmethod
    def x0_weight(self, lv: Levels) -> torch.Tensor:
        """lambda_t [B] (float64) with ||F - target||^2 = lambda_t ||x0_hat - x0||^2."""

    def model_input(self, lv: Levels, x_t) -> torch.Tensor:
        return x_t

    def timestep_probs(self, schedule: NoiseSchedule) -> torch.Tensor | None:
        """A training distribution over timesteps that belongs to the objective; None: the configured sampler."""
        return None

    def spec(self) -> dict:
        """Options to store in a model's config.json (beside the name) to rebuild this formulation."""
        return {}


class Eps(Formulation):
    """F = eps (Ho et al. 2020): x0 = (x_t - sigma F) / alpha, so F's error is multiplied by 1/sqrt(SNR)."""

    name = "eps"

    def target(self, lv, x0, noise, x_t):
        return noise

    def x0(self, lv, x_t, out):
        return lv.recip_alpha * x_t - lv.sigma_over_alpha * out

    def eps(self, lv, x_t, out):
        return out

    def x0_weight(self, lv):
        return lv.snr


class X0(Formulation):
    """F = x0."""

    name = "x0"

    def target(self, lv, x0, noise, x_t):
        return x0

    def x0(self, lv, x_t, out):
        return out

    def x0_weight(self, lv):
        return torch.ones_like(lv.snr)


class V(Formulation):
    """F = v = alpha eps - sigma x0 (Salimans & Ho 2022): x0 = alpha x_t - sigma F, bounded at every SNR."""

    name = "v"

    def target(self, lv, x0, noise, x_t):
        return lv.alpha * noise - lv.sigma * x0

    def x0(self, lv, x_t, out):
        return lv.alpha * x_t - lv.sigma * out

    def eps(self, lv, x_t, out):
        return lv.sigma * x_t + lv.alpha * out

    def x0_weight(self, lv):
        return lv.snr + 1.0


class Mu(Formulation):
    """F = the posterior mean of q(x_{t-1} | x_t, x0) (Ho et al. eq. 11's mu parameterization)."""

    name = "mu"

    def target(self, lv, x0, noise, x_t):
        return lv.mean_coef1 * x0 + lv.mean_coef2 * x_t

    def x0(self, lv, x_t, out):
        """Invert the mean the network learnt: x0 = (mu - coef2 x_t) / coef1 (`Levels.mu_coef1/2`)."""
        return (out - lv.mu_coef2 * x_t) / lv.mu_coef1

    def x0_weight(self, lv):
        return lv.mean_coef1_64 ** 2


class EDM(Formulation):
    """Karras et al. 2022's preconditioned denoiser (table 1) on the VP process.

    In EDM's variables x~ = x_t / alpha has noise level s = sigma / alpha = 1 / sqrt(SNR), and
    D(x~; s) = c_skip x~ + c_out F(c_in x~, c_noise) with c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2), sd = `sigma_data` (the data's standard deviation, set from the data). F's target
    (x0 - c_skip x~) / c_out has unit variance at every noise level, so EDM's weight lambda(s) = 1 / c_out^2 on
    ||D - x0||^2 is a plain MSE on F. c_noise stays the model's own timestep index (a discrete-time network). Training
    draws ln s ~ N(p_mean, p_std^2) (EDM's log-normal), discretized to the schedule's timesteps.
    With sd = 1 this is v-prediction up to sign (c_in x~ = x_t, target -v); sd < 1 moves the skip toward x_t at
    lower noise.
    """

    name = "edm"

    def __init__(self, sigma_data: float = 1.0, p_mean: float = -1.2, p_std: float = 1.2):
        if not sigma_data > 0 or not p_std > 0:
            raise ValueError(f"edm needs sigma_data > 0 and p_std > 0, got sigma_data={sigma_data}, p_std={p_std}")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)

    @staticmethod
    def _levels(lv):
        """(alpha, s^2) shaped to broadcast against x."""
        alpha = lv.alpha
        return alpha, lv.sigma2 / alpha ** 2

    def model_input(self, lv, x_t):
        alpha, s2 = self._levels(lv)
        return x_t / (alpha * (s2 + self.sigma_data ** 2).sqrt())

    def x0(self, lv, x_t, out):
        alpha, s2 = self._levels(lv)
        sd2 = self.sigma_data ** 2
        return sd2 / (s2 + sd2) * (x_t / alpha) + (s2.sqrt() * self.sigma_data / (s2 + sd2).sqrt()) * out

    def target(self, lv, x0, noise, x_t):
        alpha, s2 = self._levels(lv)
        sd2 = self.sigma_data ** 2
        c_out = s2.sqrt() * self.sigma_data / (s2 + sd2).sqrt()
        return (x0 - sd2 / (s2 + sd2) * (x_t / alpha)) / c_out

    def x0_weight(self, lv):
        s2, sd2 = 1.0 / lv.snr, self.sigma_data ** 2
        return (s2 + sd2) / (s2 * sd2)  # 1 / c_out^2: EDM's lambda(sigma)

    def timestep_probs(self, schedule):
        """P(t): the mass of N(p_mean, p_std^2) over ln s between the midpoints of neighbouring timesteps."""
        log_s = -0.5 * torch.log(schedule.snr)  # increasing in t
        edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), 0.5 * (log_s[1:] + log_s[:-1]),
                           torch.tensor([math.inf], dtype=torch.float64)])
        cdf = torch.special.ndtr((edges - self.p_mean) / self.p_std)
        return (cdf[1:] - cdf[:-1]).clamp(min=0)

    def spec(self):
        return {"sigma_data": self.sigma_data, "p_mean": self.p_mean, "p_std": self.p_std}


FORMULATIONS: dict[str, type[Formulation]] = {cls.name: cls for cls in (Eps, X0, V, Mu, EDM)}


def make_formulation(name: str, **options) -> Formulation:
    """The formulation called `name`; ValueError (one line) naming the accepted ones."""
    if name not in FORMULATIONS:
        raise ValueError(f"unknown parameterization {name!r}; accepted: {', '.join(FORMULATIONS)}")
    try:
        return FORMULATIONS[name](**options)
    except TypeError as e:
        raise ValueError(f"parameterization {name!r} does not take options {sorted(options)}: {e}") from None
