"""Tiny randomly initialised model folders (diffusion, noisy classifier, feature net) for sampling/metrics tests."""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion_core.checkpoint import save_model_dir
from diffusion_core.model_folders import save_diffusion_dir
from diffusion_core.models import AutoencoderKL, FeatureNet, NoisyClassifier, UNet

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, num_groups=4,
            attention_resolutions=())
DIFFUSION = {"schedule": "cosine", "num_timesteps": 50, "parameterization": "eps", "variance": "fixed_small",
             "loss": "simple", "min_snr_gamma": None}
SIZE, CHANNELS = 8, 1


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised output layers random values so a random model's samples are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def make_diffusion_dir(path: Path, num_classes: int | None = None, seed: int = 0, label_dropout: float = 0.0) -> Path:
    torch.manual_seed(seed)
    model = randomize(UNet(in_channels=CHANNELS, image_size=SIZE, num_classes=num_classes, **TINY), seed)
    data = {"space": "pixel", "shape": [CHANNELS, SIZE, SIZE], "num_classes": num_classes,
            "class_names": [str(i) for i in range(num_classes or 0)], "dataset": "tiny", "kind": "image",
            "label_dropout": label_dropout}
    save_diffusion_dir(path, model, None, dict(DIFFUSION), data)
    return path


def make_latent_dir(path: Path, seed: int = 3) -> Path:
    """A latent model (2x4x4 latents) beside its tiny autoencoder (1x8x8 images) in path/autoencoder."""
    torch.manual_seed(seed)
    ae = AutoencoderKL(in_channels=CHANNELS, image_size=SIZE, latent_channels=2, base_channels=8, channel_mult=(1, 2),
                       num_groups=4)
    save_model_dir(path / "autoencoder", ae)
    c, h, _ = ae.latent_shape
    model = randomize(UNet(in_channels=c, image_size=h, **TINY), seed)
    data = {"space": "latent", "shape": [c, h, h], "num_classes": None, "class_names": [], "dataset": "tiny",
            "kind": "image"}
    save_diffusion_dir(path / "diffusion", model, None, dict(DIFFUSION), data,
                       {"autoencoder": str(path / "autoencoder"), "scale_factor": 0.5})
    return path / "diffusion"


def make_classifier_dir(path: Path, num_classes: int = 3, seed: int = 1, diffusion: dict | None = None) -> Path:
    torch.manual_seed(seed)
    model = randomize(NoisyClassifier(in_channels=CHANNELS, image_size=SIZE, num_classes=num_classes, base_channels=8,
                                      channel_mult=(1, 2), num_heads=2, num_groups=4), seed)
    save_model_dir(path, model, {"num_classes": num_classes, "diffusion": dict(diffusion or DIFFUSION)})
    return path


def make_feature_net(num_classes: int = 3, seed: int = 2, channels: int = CHANNELS, size: int = SIZE) -> FeatureNet:
    torch.manual_seed(seed)
    return FeatureNet(in_channels=channels, image_size=size, num_classes=num_classes, width=8, feature_dim=16,
                      num_groups=4).eval()


def make_feature_net_dir(path: Path, num_classes: int = 3, seed: int = 2) -> Path:
    save_model_dir(path, make_feature_net(num_classes, seed), {"num_classes": num_classes})
    return path
