"""Builders: the networks, the diffusion and the optimizer of every training stage, from the library's typed
options (`options.py`), and the one learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import nn

from .diffusion import GaussianDiffusion
from .model_folders import build_diffusion, diffusion_spec
from .models import AutoencoderKL, DiT, MLPDenoiser, NoisyClassifier, UNet
from .options import AutoencoderOptions, DiffusionOptions, DiTOptions, NetOptions, ScheduleOptions


def build_denoiser(net: NetOptions | DiTOptions, data_shape: tuple[int, ...], num_classes: int | None,
                   learn_sigma: bool) -> nn.Module:
    """U-Net (NetOptions) or diffusion transformer (DiTOptions) for [C, H, W] data (pixels or latents), residual
    MLP for [D] points; sizes from `net`."""
    if isinstance(net, DiTOptions):
        if len(data_shape) != 3:
            raise ValueError(f"a DiT denoises [C, H, W] images or latents, not data of shape {list(data_shape)}")
        return DiT(in_channels=data_shape[0], image_size=data_shape[-1], num_classes=num_classes,
                   learn_sigma=learn_sigma, **dataclasses.asdict(net))
    if len(data_shape) == 1:
        return MLPDenoiser(dim=data_shape[0], hidden=4 * net.base_channels, num_layers=2 * net.num_res_blocks,
                           num_classes=num_classes, learn_sigma=learn_sigma)
    c, h, w = data_shape
    if h != w:
        raise ValueError(f"train_diffusion needs square images or latents, got {h}x{w}")
    return UNet(in_channels=c, image_size=h, base_channels=net.base_channels, channel_mult=tuple(net.channel_mult),
                num_res_blocks=net.num_res_blocks, attention_resolutions=tuple(net.attention_resolutions),
                num_heads=net.num_heads, dropout=net.dropout, num_classes=num_classes, learn_sigma=learn_sigma)


def formulation_options(diffusion: DiffusionOptions, sigma_data: float | None = None) -> dict:
    """Constructor options of the parameterization; edm's sigma_data from `diffusion`, else `sigma_data`."""
    if diffusion.parameterization != "edm":
        return {}
    sd = diffusion.sigma_data if diffusion.sigma_data is not None else sigma_data
    if sd is None:
        raise ValueError("parameterization 'edm' needs sigma_data: set diffusion.sigma_data or measure it on the "
                         "training data (data_std)")
    return {"sigma_data": float(sd), "p_mean": float(diffusion.edm_p_mean), "p_std": float(diffusion.edm_p_std)}


def data_std(x: torch.Tensor) -> float:
    """Standard deviation of all values of x over every rank (all-reduced under torch.distributed)."""
    x = x.double()
    stats = torch.stack([x.sum(), (x ** 2).sum(), torch.tensor(float(x.numel()), dtype=torch.float64)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    total, sq, n = stats.tolist()
    return math.sqrt(max(sq / n - (total / n) ** 2, 0.0))


def build_diffusion_from_options(schedule: ScheduleOptions, diffusion: DiffusionOptions,
                                 sigma_data: float | None = None) -> GaussianDiffusion:
    """GaussianDiffusion from typed options (`sigma_data`: the measured data std, for edm)."""
    return build_diffusion(diffusion_spec(schedule, diffusion, formulation_options(diffusion, sigma_data)))


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel on CPU and CUDA: one kernel over all tensors instead of several small ops per
    parameter tensor."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))


def lr_factor(step: int, warmup_steps: int, total_steps: int | None = None) -> float:
    """The learning rate's multiplier at optimizer step `step` (counted from 0): linear warm-up over `warmup_steps`,
    then constant, or, with `total_steps`, a cosine decay to 0 at `total_steps` (the feature net's)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_noisy_classifier(net: NetOptions, data_shape: Sequence[int], num_classes: int) -> NoisyClassifier:
    """NoisyClassifier for square [C, H, W] pixels or latents; sizes from `net`."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"the noisy classifier needs square images or latents [C, H, H], got shape {list(data_shape)}")
    c, h, _ = data_shape
    return NoisyClassifier(in_channels=c, image_size=h, num_classes=num_classes, base_channels=net.base_channels,
                           channel_mult=tuple(net.channel_mult), num_res_blocks=net.num_res_blocks,
                           attention_resolutions=tuple(net.attention_resolutions), num_heads=net.num_heads,
                           dropout=net.dropout)


def build_autoencoder(options: AutoencoderOptions, image_size: int) -> AutoencoderKL:
    """AutoencoderKL for square images of side `image_size`."""
    return AutoencoderKL(in_channels=options.in_channels, image_size=image_size,
                         latent_channels=options.latent_channels, base_channels=options.base_channels,
                         channel_mult=tuple(options.channel_mult))
