"""KL-regularized convolutional autoencoder (Rombach et al. 2022, LDM) for latent diffusion."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import group_norm, model_config
from .unet import UNetDecoder, UNetEncoder, middle_block


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents [B,C,h,w]; logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = self.std.square()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * noise [B,C,h,w] (reparameterized, differentiable)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(N(mean, var) || N(0, I)) per sample [B] = 0.5 * sum(mean^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


class AutoencoderKL(nn.Module):
    """x [B,C,H,W] in [-1,1] -> posterior over z [B,latent_channels,h,w] -> x_rec [B,C,H,W].

    Inputs are replicate-padded to `padded_size` (auto: the smallest size giving an even latent, so 28 -> 32 -> 8x8
    at factor 4) and decode crops back, so latent U-Nets downsample cleanly; the resolved size is kept in config.
    """

    kind = "autoencoder_kl"

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_channels: int = 4, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, num_groups: int = 8,
                 padded_size: int | None = None):
        super().__init__()
        channel_mult = tuple(channel_mult)
        factor = 2 ** (len(channel_mult) - 1)
        if padded_size is None:
            latent = -(-image_size // factor)
            padded_size = factor * (latent + latent % 2 if latent > 1 else 1)
        if padded_size < image_size or padded_size % factor:
            raise ValueError(f"padded_size={padded_size} must be >= image_size={image_size} and a multiple of the "
                             f"downsampling factor {factor}")
        self.config = model_config(self.kind, in_channels=in_channels, image_size=image_size,
                                   latent_channels=latent_channels, base_channels=base_channels,
                                   channel_mult=channel_mult, num_res_blocks=num_res_blocks, num_groups=num_groups,
                                   padded_size=padded_size)
        self.image_size, self.padded_size, self.factor = image_size, padded_size, factor
        self.latent_channels = latent_channels
        kw = dict(num_heads=1, num_groups=num_groups)
        self.encoder = UNetEncoder(in_channels, padded_size, base_channels, channel_mult, num_res_blocks, **kw)
        ch = self.encoder.out_channels
        self.encoder_out = nn.Sequential(group_norm(ch, num_groups), nn.SiLU(),
                                         nn.Conv2d(ch, 2 * latent_channels, 3, padding=1))
        self.decoder_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.decoder_mid = middle_block(ch, None, 0.0, True, num_groups, num_heads=1)
        self.decoder = UNetDecoder(ch, in_channels, base_channels, channel_mult, num_res_blocks, zero_out=False, **kw)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of z for one image."""
        side = self.padded_size // self.factor
        return (self.latent_channels, side, side)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x [B,C,H,W] -> q(z|x)."""
        lo = (self.padded_size - self.image_size) // 2
        hi = self.padded_size - self.image_size - lo
        if lo or hi:
            x = F.pad(x, (lo, hi, lo, hi), mode="replicate")
        h, _ = self.encoder(x)
        return DiagonalGaussian(self.encoder_out(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,latent_channels,h,w] -> x_rec [B,C,image_size,image_size] (padding cropped off)."""
        x = self.decoder(self.decoder_mid(self.decoder_in(z)))
        lo = (self.padded_size - self.image_size) // 2
        return x[..., lo:lo + self.image_size, lo:lo + self.image_size]

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
