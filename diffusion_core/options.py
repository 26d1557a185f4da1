"""The library's typed options: small frozen dataclasses its builders take (not the pipeline's params sections).

The pipeline's params sections (`pipeline/config/`) validate params.yaml and hand these over with `.to_options()`;
a script that uses the library alone builds them directly, e.g. `build_denoiser(NetOptions(base_channels=32), ...)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class NetOptions:
    """Size of a U-Net (the denoiser) or of its encoder half (the noisy classifier); in/out channels, image size
    and classes come from the data."""

    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4,)  # feature-map sides with self-attention
    num_heads: int = 4
    dropout: float = 0.1


@dataclass(frozen=True)
class DiTOptions:
    """Size of a diffusion transformer (models/dit.py: patches of patch_size, depth blocks of hidden_size with
    num_heads heads); in/out channels, image size and classes come from the data."""

    patch_size: int = 2
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass(frozen=True)
class AutoencoderOptions:
    """Architecture of the KL autoencoder (latent diffusion): one stride-2 level between channel_mult entries."""

    in_channels: int = 1
    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    downsample: int = 4


@dataclass(frozen=True)
class ScheduleOptions:
    name: str = "cosine"  # linear | cosine | sigmoid
    num_timesteps: int = 1000
    logsnr_shift: float = 0.0  # added to the log-SNR at every t (> 0: less noise)


@dataclass(frozen=True)
class DiffusionOptions:
    """What the network predicts and how it is trained (lecture notes; `diffusion.GaussianDiffusion`)."""

    parameterization: str = "eps"  # eps | x0 | v | mu | edm
    variance: str = "fixed_small"  # fixed_small | fixed_large | learned_range
    loss: str = "simple"  # simple | hybrid | vlb | weighted
    min_snr_gamma: float | None = None
    timestep_sampler: str = "uniform"  # uniform | loss_aware
    sigma_data: float | None = None  # edm only: the data's std (None: measured on the training data)
    edm_p_mean: float = -1.2
    edm_p_std: float = 1.2


@dataclass(frozen=True)
class PrepareOptions:
    """A dataset to load (`data.load_source`) and how to shard it (`data.prepare_dataset`)."""

    dataset: str = "mnist5k"
    data_dir: str = "data/raw"  # torchvision files / image folder root
    test_fraction: float = 0.2
    samples_per_shard: int = 1000
    seed: int = 0
    image_size: int | None = None  # resize to image_size x image_size (None: keep)
    swissroll_samples: int = 10000  # the 2-D Swiss roll (library only)
    swissroll_classes: int = 4
    swissroll_noise: float = 0.5


def options_from(cls: type[T], source: Any) -> T:
    """`cls` filled from the attributes of `source` that it has fields for (a params section, a namespace);
    the others keep their defaults. Lists become tuples where the field is a tuple."""
    values = {}
    for field in dataclasses.fields(cls):
        if hasattr(source, field.name):
            value = getattr(source, field.name)
            values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


__all__ = ["AutoencoderOptions", "DiffusionOptions", "NetOptions", "PrepareOptions", "ScheduleOptions",
           "options_from"]
