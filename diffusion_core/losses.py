"""Distribution terms of the variational bound: Gaussian KL, discretized Gaussian decoder likelihood."""

from __future__ import annotations

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.log_ndtr(x)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        bin_width: float = 2.0 / 255.0) -> torch.Tensor:
    """log P(x) of 8-bit data in [-1,1] under N(mean, e^{2 log_scale}) integrated over each pixel's bin.

    The edge bins extend to -inf / +inf (Ho et al. eq. 13). Uses exact log-CDFs, stable in the tails.
    """
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + bin_width / 2)
    lower = inv_std * (centered - bin_width / 2)
    log_cdf_upper = _log_ndtr(upper)
    log_one_minus_cdf_lower = _log_ndtr(-lower)
    # log(Phi(upper) - Phi(lower)) computed as log Phi(upper) + log1p(-exp(log Phi(lower) - log Phi(upper)))
    # on the left half and mirrored on the right half, so neither tail underflows.
    left = log_cdf_upper + torch.log1p(-torch.exp(_log_ndtr(lower) - log_cdf_upper).clamp(max=1 - 1e-12))
    right = log_one_minus_cdf_lower + torch.log1p(
        -torch.exp(_log_ndtr(-upper) - log_one_minus_cdf_lower).clamp(max=1 - 1e-12))
    mid = torch.where(centered < 0, left, right)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, mid))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.dim())))


NATS_PER_BIT = math.log(2.0)
