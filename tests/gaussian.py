"""Gaussian data, whose optimal denoiser is known in closed form."""

from __future__ import annotations

import torch

from diffusion_core.schedules import NoiseSchedule


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser for data x0 ~ N(m, s^2) (independent dims) under a full schedule.

    x_t = sqrt(ab) x0 + sqrt(1-ab) eps is jointly Gaussian with x0, so E[x0|x_t] = m + sqrt(ab) s^2 /
    (ab s^2 + 1 - ab) (x_t - sqrt(ab) m); the output is that posterior mean expressed as eps, x0, v or mu.
    """

    def __init__(self, schedule: NoiseSchedule, mean, std, parameterization: str = "eps", extra_var_channels=False,
                 sigma_data: float = 1.0):
        super().__init__()
        self.ab = schedule.alphas_cumprod
        self.ab_prev = schedule.alphas_cumprod_prev
        self.betas = schedule.betas
        self.m = torch.as_tensor(mean, dtype=torch.float64)
        self.s = torch.as_tensor(std, dtype=torch.float64)
        self.parameterization = parameterization
        self.sigma_data = sigma_data
        self.extra = extra_var_channels
        self.calls = 0

    def posterior_x0(self, x_t, t):
        ab = self.ab[t.long()].view(-1, *([1] * (x_t.dim() - 1)))
        x = x_t.double()
        gain = ab.sqrt() * self.s ** 2 / (ab * self.s ** 2 + 1 - ab)
        return self.m + gain * (x - ab.sqrt() * self.m), ab

    def forward(self, x_t, t, y=None):
        self.calls += 1
        p = self.parameterization
        if p == "edm":  # the network sees c_in x_t / alpha = x_t / sqrt(1 - ab + ab sd^2) (Karras et al. table 1)
            ab = self.ab[t.long()].view(-1, *([1] * (x_t.dim() - 1)))
            x_t = x_t * (1 - ab + ab * self.sigma_data ** 2).sqrt().to(x_t.dtype)
        x0, ab = self.posterior_x0(x_t, t)
        x = x_t.double()
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        if p == "edm":
            s2, sd2 = (1 - ab) / ab, self.sigma_data ** 2
            out = (x0 - sd2 / (s2 + sd2) * x / ab.sqrt()) / (s2.sqrt() * self.sigma_data / (s2 + sd2).sqrt())
        elif p == "eps":
            out = eps
        elif p == "x0":
            out = x0
        elif p == "v":
            out = ab.sqrt() * eps - (1 - ab).sqrt() * x0
        else:  # mu: posterior mean of q(x_{t-1}|x_t, x0=E[x0|x_t])
            idx = t.long()
            shape = (-1, *([1] * (x_t.dim() - 1)))
            b, abp = self.betas[idx].view(shape), self.ab_prev[idx].view(shape)
            out = b * abp.sqrt() / (1 - ab) * x0 + (1 - b).sqrt() * (1 - abp) / (1 - ab) * x
        out = out.to(x_t.dtype)
        if self.extra:
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out

    def posterior_var_x0(self, t):
        """Var(x0 | x_t) per dim, [len(t), D]."""
        ab = self.ab[t.long()].view(-1, 1)
        return self.s ** 2 * (1 - ab) / (ab * self.s ** 2 + 1 - ab)


class GaussianConsistency(GaussianDenoiser):
    """The exact consistency function of N(m, s^2) data: f(x_t, t) is where the probability-flow ODE through x_t
    ends at the data (u = (x_t - sqrt(ab) m) / sqrt(ab s^2 + 1 - ab) is constant along it, so f = m + s u),
    written as the denoiser's output of its parameterization."""

    def posterior_x0(self, x_t, t):
        ab = self.ab[t.long()].view(-1, *([1] * (x_t.dim() - 1)))
        u = (x_t.double() - ab.sqrt() * self.m) / (ab * self.s ** 2 + 1 - ab).sqrt()
        return self.m + self.s * u, ab


class GaussianMixtureDenoiser(GaussianDenoiser):
    """Class-conditional Gaussian data x0 | y ~ N(means[y], std^2 I), the K classes equally likely; label K (the
    null class of classifier-free guidance) is the unconditional data, the mixture. forward(x_t, t, y) is the exact
    E[x0 | x_t, y] as the parameterization's output: per class the Gaussian posterior mean, for the null class its
    average under p(k | x_t) (`class_posterior`)."""

    def __init__(self, schedule: NoiseSchedule, means, std: float, parameterization: str = "eps",
                 sigma_data: float = 1.0):
        means = torch.as_tensor(means, dtype=torch.float64)
        super().__init__(schedule, means[0], std, parameterization, sigma_data=sigma_data)
        self.means, self._y = means, None

    def class_posterior(self, x_t, t):
        """p(k | x_t) [B, K]: x_t | k ~ N(sqrt(ab) m_k, (ab s^2 + 1 - ab) I), equal priors."""
        ab = self.ab[t.long()].view(-1, 1, 1)
        var = ab * self.s ** 2 + 1 - ab
        d2 = ((x_t.double()[:, None, :] - ab.sqrt() * self.means[None]) ** 2).sum(-1)
        return torch.softmax(-d2 / (2 * var[:, :, 0]), dim=1)

    def posterior_x0(self, x_t, t):
        ab = self.ab[t.long()].view(-1, 1)
        x = x_t.double()
        gain = ab.sqrt() * self.s ** 2 / (ab * self.s ** 2 + 1 - ab)
        per_class = self.means[None] + gain[:, :, None] * (x[:, None, :] - ab[:, :, None].sqrt() * self.means[None])
        y = self._y
        null = y == len(self.means)
        x0 = per_class[torch.arange(len(x)), y.clamp(max=len(self.means) - 1)]
        mixture = (self.class_posterior(x_t, t)[:, :, None] * per_class).sum(1)
        return torch.where(null[:, None], mixture, x0), ab

    def forward(self, x_t, t, y=None):
        self._y = torch.full((x_t.shape[0],), len(self.means)) if y is None else y.long()
        return super().forward(x_t, t, y)


class GaussianNoisyClassifier(torch.nn.Module):
    """The exact noisy classifier of `GaussianMixtureDenoiser`'s data: logits(x_t, t) = log p(k | x_t) + const,
    -||x_t - sqrt(ab) m_k||^2 / (2 (ab s^2 + 1 - ab)), at original timestep indices t."""

    def __init__(self, schedule: NoiseSchedule, means, std: float):
        super().__init__()
        self.ab = schedule.alphas_cumprod
        self.means, self.s = torch.as_tensor(means, dtype=torch.float64), float(std)
        self.calls = 0

    def forward(self, x_t, t):
        self.calls += 1
        ab = self.ab[t.long()].view(-1, 1, 1)
        var = ab * self.s ** 2 + 1 - ab
        d2 = ((x_t.double()[:, None, :] - ab.sqrt() * self.means[None]) ** 2).sum(-1)
        return (-d2 / (2 * var[:, :, 0])).to(x_t.dtype)
