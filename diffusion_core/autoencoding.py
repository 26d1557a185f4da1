"""KL autoencoder training, evaluation and latent encoding (Rombach et al. 2022, LDM); no ray/mlflow here.

Loss per image (LDM's `LPIPSWithDiscriminator` without the perceptual and GAN terms, divided by the pixel count D):
    loss = mean_pixels(|x - x_rec|  or  (x - x_rec)^2) + kl_weight * KL(q(z|x) || N(0, I)) / D
so `kl_weight` means what it does in LDM's configs (1e-6). Images are in [-1, 1]; metrics use [0, 1].

Latent scale (LDM sec. 4.3.2, Stable Diffusion's 0.18215): `scale_factor = 1 / std(train latents)`, where the
latents are posterior means. Latent shards store the raw means z; diffusion trains on `z * scale_factor` and
samples are decoded as `decode(z_scaled / scale_factor)`.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .models.autoencoder import AutoencoderKL


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image mean over pixels of |x - x_rec| (l1) or (x - x_rec)^2 (l2): [B,C,H,W] -> [B]."""
    if kind == "l1":
        err = (x_rec - x).abs()
    elif kind == "l2":
        err = (x_rec - x).square()
    else:
        raise ValueError(f"recon_loss must be 'l1' or 'l2', got {kind!r}")
    return err.flatten(1).mean(dim=1)


def autoencoder_loss(model: AutoencoderKL, x: torch.Tensor, kl_weight: float, recon: str,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(scalar loss, {"loss", "recon", "kl"}) for a batch x [B,C,H,W]; z is sampled from the posterior."""
    x_rec, posterior = model(x, sample_posterior=True, generator=generator)
    rec = reconstruction_loss(x_rec.float(), x, recon)
    kl = posterior.kl().float()
    loss = (rec + kl_weight * kl / x[0].numel()).mean()
    return loss, {"loss": loss.item(), "recon": rec.mean().item(), "kl": kl.mean().item()}


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatch indices: a fresh seeded permutation of range(n) per epoch, the tail carried over."""
    carry = torch.empty(0, dtype=torch.long)
    while True:
        perm = torch.cat([carry, torch.randperm(n, generator=generator)])
        full = len(perm) // batch_size * batch_size
        yield from perm[:full].split(batch_size)
        carry = perm[full:]


def psnr_db(mse: float, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio 10 log10(range^2 / mse) in dB."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(data_range ** 2 / mse)


@torch.no_grad()
def reconstruct(model: AutoencoderKL, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Deterministic reconstructions decode(posterior mean), clamped to [-1, 1]: [N,C,H,W] -> [N,C,H,W]."""
    out = [model.decode(model.encode(xb).mode()).float().clamp(-1.0, 1.0) for xb in x.split(batch_size)]
    return torch.cat(out)


@torch.no_grad()
def evaluate_autoencoder(model: AutoencoderKL, x: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """{"mse", "psnr", "kl"} on x [N,C,H,W] in [-1,1]: MSE and PSNR (dB) of [0,1]-scaled images,
    mean KL per image (nats)."""
    was_training = model.training
    model.eval()
    sq, kl = 0.0, 0.0
    for xb in x.split(batch_size):
        posterior = model.encode(xb)
        x_rec = model.decode(posterior.mode()).float().clamp(-1.0, 1.0)
        sq += ((x_rec - xb) / 2.0).square().sum().item()  # /2: [-1,1] -> [0,1] scale
        kl += posterior.kl().sum().item()
    model.train(was_training)
    mse = sq / x.numel()
    return {"mse": mse, "psnr": psnr_db(mse), "kl": kl / len(x)}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1,1] images [N,C,H,W] -> uint8 [N,H,W,C]."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def reconstruction_pairs(model: AutoencoderKL, x: torch.Tensor, n: int = 10) -> np.ndarray:
    """uint8 [2n,H,W,C]: the first n images of x, then their reconstructions (a 2-row grid with nrow=n)."""
    was_training = model.training
    model.eval()
    rec = reconstruct(model, x[:n])
    model.train(was_training)
    return np.concatenate([to_uint8(x[:n]), to_uint8(rec)])


def grid_scale(image_side: int) -> int:
    """Integer upscaling so small images (8x8 digits) are visible in grids (~56 px per image)."""
    return max(1, 56 // image_side)


@torch.no_grad()
def encode_means(model: AutoencoderKL, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means z = E[q(z|x)]: [N,C,H,W] -> float32 [N,latent_channels,h,w] (unscaled)."""
    model.eval()
    return torch.cat([model.encode(xb).mode().float() for xb in x.split(batch_size)])


def latent_scale_factor(z: torch.Tensor) -> float:
    """1 / std of all elements of the train latents z [N,C,h,w], so that z * scale_factor has unit variance."""
    std = z.double().std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"train latents have std {std}; cannot compute a latent scale factor")
    return 1.0 / std


__all__ = ["autoencoder_loss", "batch_indices", "encode_means", "evaluate_autoencoder",
           "latent_scale_factor", "psnr_db", "reconstruct", "grid_scale", "reconstruction_pairs", "reconstruction_loss",
           "to_uint8"]
