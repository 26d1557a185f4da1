"""`GaussianDiffusion`: forward process, posterior, parameterizations, variances, losses and the bound.

A thin frozen bundle of schedule + parameterization + variance + loss. The model is a callable passed in
(`model(x_t, t, y=None)`, called with ORIGINAL timestep indices), never owned. Equations: Ho et al. 2020
(DDPM), Nichol & Dhariwal 2021 (Improved DDPM), Salimans & Ho 2022 (v), Hang et al. 2023 (min-SNR).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from .formulations import FORMULATIONS, X0, Eps, Formulation, Levels, V, make_formulation
from .losses import NATS_PER_BIT, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import NoiseSchedule

PARAMETERIZATIONS = tuple(FORMULATIONS)
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSSES = ("simple", "hybrid", "vlb", "weighted")

Parameterization = Literal["eps", "x0", "v", "mu", "edm"]
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
LossType = Literal["simple", "hybrid", "vlb", "weighted"]
Denoiser = Callable[..., torch.Tensor]
_EPS, _X0, _V = Eps(), X0(), V()  # the conversions between eps, x0 and v


def extract(coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """coef[t] (float64 schedule constant, shape [T]) cast to x's dtype/device, shaped [B, 1, ...] to broadcast."""
    out = coef.to(x.device)[t.to(x.device)].to(x.dtype)
    return out.view(-1, *([1] * (x.dim() - 1)))


# Schedule constants the hot paths index every step, computed once in float64 from the schedule.
COEFFICIENTS: dict[str, Callable[[NoiseSchedule], torch.Tensor]] = {
    "sqrt_ab": lambda s: s.alphas_cumprod.sqrt(),
    "one_minus_ab": lambda s: 1.0 - s.alphas_cumprod,
    "sqrt_one_minus_ab": lambda s: (1.0 - s.alphas_cumprod).sqrt(),
    "log_one_minus_ab": lambda s: torch.log(1.0 - s.alphas_cumprod),
    "sqrt_recip_ab": lambda s: (1.0 / s.alphas_cumprod).sqrt(),
    "sqrt_recipm1_ab": lambda s: (1.0 / s.alphas_cumprod - 1.0).sqrt(),
    "posterior_mean_coef1": lambda s: s.posterior_mean_coef1,
    "posterior_mean_coef2": lambda s: s.posterior_mean_coef2,
    "posterior_variance": lambda s: s.posterior_variance,
    "posterior_log_variance_clipped": lambda s: s.posterior_log_variance_clipped,
    "log_betas": lambda s: torch.log(s.betas),
    "log_fixed_large": lambda s: torch.log(torch.cat([s.posterior_variance[1:2], s.betas[1:]])
                                           if s.num_timesteps > 1 else s.betas),
}


def check_combination(parameterization: str, variance: str, loss: str, min_snr_gamma: float | None) -> None:
    """Refuse settings that cannot work, at configuration time, with a one-line reason."""
    for name, value, accepted in (("parameterization", parameterization, tuple(FORMULATIONS)),
                                  ("variance", variance, VARIANCES), ("loss", loss, LOSSES)):
        if value not in accepted:
            raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(accepted)}")
    if variance == "learned_range" and loss not in ("hybrid", "vlb"):
        raise ValueError(f"variance 'learned_range' needs loss 'hybrid' or 'vlb' (got {loss!r}): "
                         "the simple loss never trains the variance channels")
    if loss == "weighted" and variance == "learned_range":
        raise ValueError("loss 'weighted' uses the fixed variance sigma_t^2 as weight; use fixed_small or fixed_large")
    if min_snr_gamma is not None and min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0 or null, got {min_snr_gamma}")
    if parameterization == "edm" and (variance == "learned_range" or loss in ("weighted", "vlb")):
        raise ValueError(f"parameterization 'edm' trains its preconditioned output with the simple loss and a fixed "
                         f"variance; got variance {variance!r}, loss {loss!r}")


@dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """Schedule + parameterization (a `Formulation`: eps, x0, v, mu, edm) + variance + training loss.

    `formulation_options` go to the formulation's constructor (edm: sigma_data, p_mean, p_std).
    """

    schedule: NoiseSchedule
    parameterization: Parameterization = "eps"
    variance: Variance = "fixed_small"
    loss: LossType = "simple"
    min_snr_gamma: float | None = None
    train_schedule: NoiseSchedule | None = None  # set on respaced copies: the schedule the model was trained on
    formulation_options: dict = field(default_factory=dict)
    formulation: Formulation = field(init=False, repr=False)  # built from parameterization + formulation_options

    def __post_init__(self):
        check_combination(self.parameterization, self.variance, self.loss, self.min_snr_gamma)
        object.__setattr__(self, "_tables", {})
        object.__setattr__(self, "formulation", make_formulation(self.parameterization, **self.formulation_options))

    def coef(self, name: str, t: torch.Tensor, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """extract(COEFFICIENTS[name](schedule), t, x) from a table cast once per device/dtype (same values).

        `train` reads the training schedule of a respaced diffusion. Saves recomputing and casting the float64
        table on every call of the sampler's and the loss's hot paths.
        """
        key = (name, train, x.device, x.dtype)
        table = self._tables.get(key)
        if table is None:
            sched = self.train_schedule if train else self.schedule
            table = self._tables[key] = COEFFICIENTS[name](sched).to(x.device).to(x.dtype)
        return table[t.to(x.device)].view(-1, *([1] * (x.dim() - 1)))

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def learn_sigma(self) -> bool:
        return self.variance == "learned_range"

    def respaced(self, schedule: NoiseSchedule) -> "GaussianDiffusion":
        """The same diffusion on another (respaced) schedule."""
        return GaussianDiffusion(schedule, self.parameterization, self.variance, self.loss, self.min_snr_gamma,
                                 self.train_schedule or self.schedule, dict(self.formulation_options))

    def levels(self, t: torch.Tensor, x: torch.Tensor | None = None) -> Levels:
        """The noise levels at schedule indices t that the formulation reads, shaped against x (see `Levels`)."""

        def lookup(name: str) -> torch.Tensor:
            if name == "snr":
                return self.schedule.snr.to(t.device)[t]
            if name == "mean_coef1_64":
                return self.schedule.posterior_mean_coef1.to(t.device)[t]
            if name in ("mu_coef1", "mu_coef2"):  # the one-step posterior of the schedule the model learnt
                train = self.train_schedule is not None
                return self.coef(f"posterior_mean_coef{name[-1]}", self.model_timesteps(t) if train else t, x, train)
            return self.coef(name, t, x)

        return Levels(lookup)

    def model_input(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network sees at schedule indices t (x_t itself, except for a preconditioned formulation)."""
        return self.formulation.model_input(self.levels(t, x_t), x_t)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timestep indices to feed the model for schedule indices t."""
        return self.schedule.timesteps.to(t.device)[t]

    def call_model(self, model: Denoiser, x_t, t, y=None) -> torch.Tensor:
        """The network's output at schedule indices t: the formulation's input, the original timestep index."""
        return model(self.model_input(x_t, t), self.model_timesteps(t), y)

    # ----- forward process -------------------------------------------------------------------------
    def q_mean_variance(self, x0, t):
        """Mean, variance, log-variance of q(x_t | x0) = N(sqrt(ab) x0, (1 - ab) I)."""
        mean = self.coef("sqrt_ab", t, x0) * x0
        var = self.coef("one_minus_ab", t, x0)
        return mean, var, self.coef("log_one_minus_ab", t, x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (Ho et al. eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self.coef("sqrt_ab", t, x0) * x0 + self.coef("sqrt_one_minus_ab", t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (Ho et al. eqs. 6-7)."""
        mean = self.coef("posterior_mean_coef1", t, x_t) * x0 + self.coef("posterior_mean_coef2", t, x_t) * x_t
        return mean, self.coef("posterior_variance", t, x_t), self.coef("posterior_log_variance_clipped", t, x_t)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.snr.to(t.device)[t]

    # ----- conversions between eps, x0 and v (the formulations' own maths, at schedule indices t) ----------
    def x0_from_eps(self, x_t, t, eps):
        return _EPS.x0(self.levels(t, x_t), x_t, eps)

    def eps_from_x0(self, x_t, t, x0):
        return _X0.eps(self.levels(t, x_t), x_t, x0)

    def v_from_x0_eps(self, x0, eps, t):
        """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho)."""
        return _V.target(self.levels(t, x0), x0, eps, None)

    def x0_from_v(self, x_t, t, v):
        return _V.x0(self.levels(t, x_t), x_t, v)

    def x0_from_output(self, x_t, t, out):
        """The model's x0 estimate from its (mean-channel) output under this parameterization."""
        return self.formulation.x0(self.levels(t, x_t), x_t, out)

    def eps_from_output(self, x_t, t, out):
        """The model's eps estimate from its (mean-channel) output under this parameterization."""
        return self.formulation.eps(self.levels(t, x_t), x_t, out)

    def split_output(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean channels, variance channels or None); learned_range doubles the channel dim (dim 1)."""
        if not self.learn_sigma:
            return out, None
        if out.shape[1] % 2:
            raise ValueError(f"learned_range expects the model to output 2x channels, got {out.shape[1]}")
        return out.chunk(2, dim=1)

    # ----- reverse process --------------------------------------------------------------------------
    def model_log_variance(self, t, x_t, var_out=None):
        """log sigma_t^2 of p(x_{t-1}|x_t): fixed_small, fixed_large (t=0 decoder fix) or learned_range."""
        if self.variance == "fixed_small":
            return self.coef("posterior_log_variance_clipped", t, x_t)
        if self.variance == "fixed_large":
            return self.coef("log_fixed_large", t, x_t)
        min_log = self.coef("posterior_log_variance_clipped", t, x_t)
        max_log = self.coef("log_betas", t, x_t)
        frac = (var_out + 1) / 2  # the network predicts v in [-1, 1] (Nichol & Dhariwal eq. 15)
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance_from_output(self, out, x_t, t, clip_denoised: bool = False):
        """Mean, variance, log-variance, pred_x0 and eps of p(x_{t-1}|x_t) from a model output."""
        mean_out, var_out = self.split_output(out)
        log_var = self.model_log_variance(t, x_t, var_out)
        pred_x0 = self.x0_from_output(x_t, t, mean_out)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        if self.parameterization == "mu" and not clip_denoised and self.train_schedule is None:
            mean = mean_out
        else:
            mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        eps = self.eps_from_x0(x_t, t, pred_x0) if clip_denoised else self.eps_from_output(x_t, t, mean_out)
        return {"mean": mean, "variance": log_var.exp(), "log_variance": log_var, "pred_x0": pred_x0, "eps": eps,
                "model_output": out}

    def p_mean_variance(self, model: Denoiser, x_t, t, y=None, clip_denoised: bool = False):
        """Call the model at schedule indices t and return p(x_{t-1}|x_t)'s terms (see p_mean_variance_from_output)."""
        out = self.call_model(model, x_t, t, y)
        return self.p_mean_variance_from_output(out, x_t, t, clip_denoised)

    # ----- losses -----------------------------------------------------------------------------------
    def vb_terms_bpd(self, out, x0, x_t, t, clip_denoised: bool = False):
        """L_t in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t>0, decoder NLL -log p(x0|x1) at t=0.

        `clip_denoised`: p's mean from x0 clipped to [-1, 1], the reverse process pixel-space sampling runs.
        """
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance_from_output(out, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / NATS_PER_BIT
        first = t == 0
        if not bool(first.any()):
            return kl
        # the decoder term is costly (log-CDFs): evaluate it only on the t=0 rows
        log_scale = 0.5 * p["log_variance"].expand_as(x0)[first]
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0[first], p["mean"][first], log_scale)) / NATS_PER_BIT
        out = kl.clone()
        out[first] = nll.to(kl.dtype)
        return out

    def prior_bpd(self, x0):
        """KL(q(x_T|x0) || N(0, I)) in bits/dim: the prior term of the bound."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / NATS_PER_BIT

    def min_snr_weight(self, t):
        """min(SNR, gamma) on the x0 error, as a weight on the formulation's own loss (Hang et al. 2023).

        ||F - target||^2 = lambda_t ||x0_hat - x0||^2, so min(SNR, gamma) ||x0_hat - x0||^2 is
        min(SNR, gamma) / lambda_t times the formulation's MSE: min(SNR, gamma) / SNR for eps, / (SNR + 1) for v
        (the paper's forms), and so on.
        """
        snr = self.schedule.snr.to(t.device)[t]
        return snr.clamp(max=self.min_snr_gamma) / self.formulation.x0_weight(self.levels(t))

    def seeds_weight(self, t, x):
        """omega_t = 1 / sigma_t^2 of the seeds' risk omega_t ||mu_w(x_t,t) - eta_t||^2 (fixed variance)."""
        return torch.exp(-self.model_log_variance(t, x)).view(-1)

    def training_losses(self, model: Denoiser, x0, t, y=None, noise=None):
        """Per-sample losses at schedule indices t: dict with "loss" [B] and its parts "mse", "vb"."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = self.call_model(model, x_t, t, y)
        return self.losses_from_output(out, x0, x_t, t, noise)

    def losses_from_output(self, out, x0, x_t, t, noise):
        """The losses of training_losses, given the model output on x_t (lets callers batch the forward pass)."""
        out = out.float() if out.dtype != x0.dtype else out
        mean_out, var_out = self.split_output(out)
        terms = {}
        if self.loss == "weighted":
            true_mean, _, _ = self.q_posterior(x0, x_t, t)
            pred_mean = self.p_mean_variance_from_output(out, x_t, t)["mean"]
            terms["mse"] = mean_flat((pred_mean - true_mean) ** 2)
            terms["loss"] = self.seeds_weight(t, x0) * terms["mse"]
            return terms
        target = self.formulation.target(self.levels(t, x_t), x0, noise, x_t)
        terms["mse"] = mean_flat((mean_out - target) ** 2)
        mse = terms["mse"] * self.min_snr_weight(t) if self.min_snr_gamma is not None else terms["mse"]
        if self.loss == "simple":
            terms["loss"] = mse
            return terms
        # Hybrid: the bound trains only the variance; the mean gets its gradient from the mse (stop-gradient).
        frozen = (torch.cat([mean_out.detach(), var_out], dim=1) if var_out is not None and self.loss == "hybrid"
                  else out)
        terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
        if self.loss == "hybrid":
            # L_hybrid = L_simple + 0.001 L_vlb with L_vlb ~= T * L_t under uniform t (improved-diffusion).
            terms["loss"] = mse + terms["vb"] * (self.num_timesteps / 1000.0)
        else:
            terms["loss"] = terms["vb"]
        return terms

    @torch.no_grad()
    def bound_terms(self, model: Denoiser, x0, y=None, generator: torch.Generator | None = None,
                    progress: bool = False, clip_denoised: bool = False):
        """All terms of the variational bound per sample, bits/dim: vb [B, T], prior [B], total [B], x0_mse [B, T].

        `clip_denoised` bounds the reverse process whose x0 prediction is clipped to [-1, 1] (the one `generate`
        samples in pixel space; improved-diffusion's `calc_bpd_loop` default). Still a bound: the clip is part of
        that process's mean. Without it, an eps-model's error at a step where alpha_bar falls steeply (the cosine
        schedule's last, beta clipped to 0.999) reaches the mean amplified by sqrt(alpha_bar_{t-1} / alpha_bar_t).
        """
        from tqdm.auto import tqdm

        b, T = x0.shape[0], self.num_timesteps
        vb = torch.zeros(b, T, dtype=torch.float64, device=x0.device)
        mse = torch.zeros_like(vb)
        for i in tqdm(reversed(range(T)), total=T, disable=not progress, desc="bits/dim", leave=False):
            t = torch.full((b,), i, dtype=torch.long, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            out = self.call_model(model, x_t, t, y).to(x0.dtype)
            vb[:, i] = self.vb_terms_bpd(out, x0, x_t, t, clip_denoised).double()
            pred_x0 = self.p_mean_variance_from_output(out, x_t, t, clip_denoised)["pred_x0"]
            mse[:, i] = mean_flat((pred_x0 - x0) ** 2).double()
        prior = self.prior_bpd(x0).double()
        return {"vb": vb, "prior": prior, "total": vb.sum(1) + prior, "x0_mse": mse}

    def bits_per_dim(self, model: Denoiser, x0, y=None, generator=None, progress: bool = False,
                     clip_denoised: bool = False) -> torch.Tensor:
        """Per-sample variational bound on -log p(x0) in bits/dim for 8-bit data scaled to [-1, 1]."""
        return self.bound_terms(model, x0, y, generator, progress, clip_denoised)["total"]
