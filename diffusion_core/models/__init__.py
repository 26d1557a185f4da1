"""Denoisers, classifiers, autoencoder and EMA; `build_model(config)` rebuilds any of them from its `.config`."""

from __future__ import annotations

import inspect

from torch import nn

from .autoencoder import AutoencoderKL, DiagonalGaussian
from .classifier import FeatureNet, NoisyClassifier
from .ema import EMA, unwrap_model
from .mlp import MLPDenoiser
from .student import StudentFamily
from .unet import UNet

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    cls.kind: cls for cls in (UNet, MLPDenoiser, NoisyClassifier, FeatureNet, AutoencoderKL, StudentFamily)}


def build_model(config: dict) -> nn.Module:
    """Model from {"kind": ..., **constructor kwargs} (a model's `.config`); ValueError on unknown kind or keys."""
    if not isinstance(config, dict) or config.get("kind") not in MODEL_REGISTRY:
        kind = config.get("kind") if isinstance(config, dict) else config
        raise ValueError(f"model config key 'kind' = {kind!r} is not one of {sorted(MODEL_REGISTRY)}")
    cls = MODEL_REGISTRY[config["kind"]]
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    for key in kwargs:
        if key not in accepted:
            raise ValueError(f"model config key {key!r} is not accepted by kind {config['kind']!r}; "
                             f"accepted keys: {accepted}")
    return cls(**kwargs)


__all__ = ["AutoencoderKL", "DiagonalGaussian", "EMA", "FeatureNet", "MLPDenoiser", "MODEL_REGISTRY",
           "NoisyClassifier", "StudentFamily", "UNet", "build_model", "unwrap_model"]
