"""Likelihood and label metrics: `nll_bpd` (variational bound, bits/dim) and `class_accuracy` of samples."""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import MetricsError
from .images import as_uint8_nchw


def nll_bpd(bundle, x0: torch.Tensor, batch_size: int = 64, generator: torch.Generator | None = None,
            labels: torch.Tensor | None = None, progress: bool = False) -> tuple[float, float]:
    """(mean, standard error) over samples of `diffusion.bits_per_dim` (Ho et al. eq. 5 with the discretized
    Gaussian decoder at t=0) for x0 [N, C, H, W] in [-1, 1] (uint8 is converted); pixel-space image models only.

    `labels` conditions a class-conditional model (None: its null class, i.e. the unconditional bound).
    The bound is that of the process `generate` samples: x0 predictions clipped to [-1, 1] (improved-diffusion's
    `calc_bpd_loop` default; `GaussianDiffusion.bound_terms`).
    """
    if bundle.is_latent:
        raise MetricsError("nll_bpd needs a pixel-space model: a latent model's bound is on latents, not on the "
                           "8-bit images, so it is not reported")
    if bundle.config["data"].get("kind", "image") != "image":
        raise MetricsError("nll_bpd is defined for 8-bit images, not for point data")
    if x0.dtype == torch.uint8:
        x0 = x0.float() / 127.5 - 1.0
    if x0.ndim != 4 or tuple(x0.shape[1:]) != tuple(bundle.shape):
        raise MetricsError(f"x0 must be [N, {', '.join(map(str, bundle.shape))}] to match the model, got "
                           f"{tuple(x0.shape)}")
    if len(x0) < 2:
        raise MetricsError("nll_bpd needs at least 2 samples for a standard error")
    if batch_size < 1:
        raise MetricsError(f"batch size must be >= 1, got {batch_size}")
    p = next(bundle.model.parameters())
    model = bundle.model.eval()
    if bundle.num_classes is None:
        labels = None
    per_sample = []
    for lo in range(0, len(x0), batch_size):
        xb = x0[lo:lo + batch_size].to(p.device, torch.float32)
        yb = None if labels is None else torch.as_tensor(labels[lo:lo + batch_size], device=p.device)
        per_sample.append(bundle.diffusion.bits_per_dim(model, xb, y=yb, generator=generator, progress=progress,
                                                        clip_denoised=True).double().cpu())
    bpd = torch.cat(per_sample)
    return float(bpd.mean()), float(bpd.std(unbiased=True) / math.sqrt(len(bpd)))


@torch.no_grad()
def class_accuracy(feature_net, images_uint8, labels, batch_size: int = 256) -> float:
    """Fraction of images the clean-image feature net classifies as their requested label.

    images: uint8 numpy [N, H, W, C] (samples.npz) or tensor [N, C, H, W]; labels [N] (no -1: unconditional
    samples have no requested class).
    """
    x = as_uint8_nchw(images_uint8)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if y.shape != (x.shape[0],):
        raise MetricsError(f"need one label per image: {x.shape[0]} images, labels of shape {tuple(y.shape)}")
    if (y < 0).any():
        raise MetricsError("class_accuracy needs requested classes; these samples are unconditional (label -1)")
    k = feature_net.config["num_classes"]
    if (y >= k).any():
        raise MetricsError(f"label {int(y.max())} is outside the feature net's {k} classes")
    if x.shape[1] != feature_net.config["in_channels"]:
        raise MetricsError(f"feature net takes {feature_net.config['in_channels']}-channel images, got {x.shape[1]}")
    p = next(feature_net.parameters())
    feature_net.eval()
    correct = 0
    for lo in range(0, len(x), batch_size):
        logits = feature_net(x[lo:lo + batch_size].to(p.device, p.dtype) / 127.5 - 1.0)
        correct += int((logits.argmax(1).cpu() == y[lo:lo + batch_size]).sum())
    return correct / len(x)
