"""Denoisers, classifiers, autoencoder and EMA; `build_model(config)` rebuilds any of them from its `.config`."""

from __future__ import annotations

from .autoencoder import AutoencoderKL, DiagonalGaussian
from .classifier import FeatureNet, NoisyClassifier
from .dit import DiT
from .ema import EMA, unwrap_model
from .mlp import MLPDenoiser
from .registry import MODEL_REGISTRY, build_model, register_model
from .student import StudentFamily
from .unet import UNet

register_model(UNet, DiT, MLPDenoiser, NoisyClassifier, FeatureNet, AutoencoderKL, StudentFamily)


__all__ = ["AutoencoderKL", "DiagonalGaussian", "DiT", "EMA", "FeatureNet", "MLPDenoiser", "MODEL_REGISTRY",
           "NoisyClassifier", "StudentFamily", "UNet", "build_model", "unwrap_model"]
