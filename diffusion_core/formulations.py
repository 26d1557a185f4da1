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
Adding a formulation (flow matching, ...) is one new class registered in FORMULATIONS.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .diffusion import GaussianDiffusion


class Formulation(ABC):
    """Abstract base: the eps estimate derives from the x0 estimate; the network sees x_t itself."""

    name: ClassVar[str] = ""

    @abstractmethod
    def target(self, d: "GaussianDiffusion", x0, noise, x_t, t) -> torch.Tensor:
        """The training target of the network output."""

    @abstractmethod
    def x0(self, d: "GaussianDiffusion", x_t, t, out) -> torch.Tensor:
        """x0 estimate from the network output."""

    def eps(self, d: "GaussianDiffusion", x_t, t, out) -> torch.Tensor:
        return d.eps_from_x0(x_t, t, self.x0(d, x_t, t, out))

    @abstractmethod
    def x0_weight(self, d: "GaussianDiffusion", t) -> torch.Tensor:
        """lambda_t [B] (float64) with ||F - target||^2 = lambda_t ||x0_hat - x0||^2."""

    def model_input(self, d: "GaussianDiffusion", x_t, t) -> torch.Tensor:
        return x_t

    def timestep_probs(self, d: "GaussianDiffusion") -> torch.Tensor | None:
        """A training distribution over timesteps that belongs to the objective; None: the configured sampler."""
        return None

    def spec(self) -> dict:
        """Options to store in a model's config.json (beside the name) to rebuild this formulation."""
        return {}


class Eps(Formulation):
    """F = eps (Ho et al. 2020): x0 = (x_t - sigma F) / alpha, so F's error is multiplied by 1/sqrt(SNR)."""

    name = "eps"

    def target(self, d, x0, noise, x_t, t):
        return noise

    def x0(self, d, x_t, t, out):
        return d.x0_from_eps(x_t, t, out)

    def eps(self, d, x_t, t, out):
        return out

    def x0_weight(self, d, t):
        return d.schedule.snr.to(t.device)[t]


class X0(Formulation):
    """F = x0."""

    name = "x0"

    def target(self, d, x0, noise, x_t, t):
        return x0

    def x0(self, d, x_t, t, out):
        return out

    def x0_weight(self, d, t):
        return torch.ones(t.shape, dtype=torch.float64, device=t.device)


class V(Formulation):
    """F = v = alpha eps - sigma x0 (Salimans & Ho 2022): x0 = alpha x_t - sigma F, bounded at every SNR."""

    name = "v"

    def target(self, d, x0, noise, x_t, t):
        return d.v_from_x0_eps(x0, noise, t)

    def x0(self, d, x_t, t, out):
        return d.x0_from_v(x_t, t, out)

    def eps(self, d, x_t, t, out):
        return d.coef("sqrt_one_minus_ab", t, x_t) * x_t + d.coef("sqrt_ab", t, x_t) * out

    def x0_weight(self, d, t):
        return d.schedule.snr.to(t.device)[t] + 1.0


class Mu(Formulation):
    """F = the posterior mean of q(x_{t-1} | x_t, x0) (Ho et al. eq. 11's mu parameterization)."""

    name = "mu"

    def target(self, d, x0, noise, x_t, t):
        return d.q_posterior(x0, x_t, t)[0]

    def x0(self, d, x_t, t, out):
        return d.x0_from_mean(x_t, t, out)

    def x0_weight(self, d, t):
        return d.schedule.posterior_mean_coef1.to(t.device)[t] ** 2


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

    def _levels(self, d, t, x):
        """(alpha, s^2) shaped to broadcast against x."""
        alpha = d.coef("sqrt_ab", t, x)
        return alpha, d.coef("one_minus_ab", t, x) / alpha ** 2

    def model_input(self, d, x_t, t):
        alpha, s2 = self._levels(d, t, x_t)
        return x_t / (alpha * (s2 + self.sigma_data ** 2).sqrt())

    def x0(self, d, x_t, t, out):
        alpha, s2 = self._levels(d, t, x_t)
        sd2 = self.sigma_data ** 2
        return sd2 / (s2 + sd2) * (x_t / alpha) + (s2.sqrt() * self.sigma_data / (s2 + sd2).sqrt()) * out

    def target(self, d, x0, noise, x_t, t):
        alpha, s2 = self._levels(d, t, x_t)
        sd2 = self.sigma_data ** 2
        c_out = s2.sqrt() * self.sigma_data / (s2 + sd2).sqrt()
        return (x0 - sd2 / (s2 + sd2) * (x_t / alpha)) / c_out

    def x0_weight(self, d, t):
        s2, sd2 = 1.0 / d.schedule.snr.to(t.device)[t], self.sigma_data ** 2
        return (s2 + sd2) / (s2 * sd2)  # 1 / c_out^2: EDM's lambda(sigma)

    def timestep_probs(self, d):
        """P(t): the mass of N(p_mean, p_std^2) over ln s between the midpoints of neighbouring timesteps."""
        log_s = -0.5 * torch.log(d.schedule.snr)  # increasing in t
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
