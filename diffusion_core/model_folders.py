"""Model folders, every kind: weights (safetensors) + `config.json` (+ provenance and card), saved atomically.

`save_model_dir` / `load_model_dir` (checkpoint.py's writer and reader) hold any model; the kinds a sampler needs
rebuild with one path: `load_diffusion_dir` (a denoiser or a student family with its diffusion, and the latent
decoder), `load_classifier_dir` (a noisy classifier), `load_autoencoder_decoder`.

`config.json` of `models/diffusion/` (written by `save_diffusion_dir`)::

    {"model": {...U-Net/MLP config...},
     "diffusion": {"schedule": "cosine", "num_timesteps": 1000, "logsnr_shift": 0.0, "parameterization": "eps",
                   "variance": "fixed_small", "loss": "simple", "min_snr_gamma": null},
     "data": {"space": "pixel" | "latent", "shape": [C, H, W], "num_classes": 10 | null,
              "class_names": [...], "dataset": "mnist5k", "kind": "image" | "points",
              "label_dropout": 0.1},  # p(label -> null class) in training; > 0: the null class is unconditional
     "latent": {"autoencoder": "<path of the autoencoder folder>", "scale_factor": 0.9} | null,
     "checksums": {...}}

`load_diffusion_dir(path)` rebuilds model + diffusion (+ decoder) so sampling needs no flags but the path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .checkpoint import CheckpointError, load_model_dir, read_config, save_model_dir  # noqa: F401 (one module)
from .diffusion import GaussianDiffusion
from .options import DiffusionOptions, ScheduleOptions
from .schedules import NoiseSchedule
from .storage import find_beside, is_url, local_model_path


def diffusion_spec(schedule: ScheduleOptions, diffusion: DiffusionOptions, formulation_options: dict | None = None
                   ) -> dict:
    """The `diffusion` block of config.json from the schedule's and the formulation's options.

    `formulation_options`: the resolved options of the parameterization (edm: sigma_data measured on the data).
    """
    return {"schedule": schedule.name, "num_timesteps": int(schedule.num_timesteps),
            "logsnr_shift": float(schedule.logsnr_shift),
            "parameterization": diffusion.parameterization, "variance": diffusion.variance,
            "loss": diffusion.loss, "min_snr_gamma": diffusion.min_snr_gamma,
            "formulation_options": dict(formulation_options or {})}


def build_diffusion(spec: dict) -> GaussianDiffusion:
    """GaussianDiffusion from a `diffusion` block (see module doc)."""
    try:
        sched = NoiseSchedule.from_name(spec["schedule"], int(spec["num_timesteps"]), spec.get("logsnr_shift", 0.0))
        return GaussianDiffusion(sched, spec["parameterization"], spec["variance"], spec.get("loss", "simple"),
                                 spec.get("min_snr_gamma"), formulation_options=spec.get("formulation_options") or {})
    except KeyError as e:
        raise CheckpointError(f"diffusion config lacks key {e.args[0]!r}; the folder was not written by this "
                              f"version's train_diffusion: retrain or fix config.json") from e


@dataclass
class DiffusionBundle:
    """Everything sampling needs: the denoiser, its diffusion, data facts and an optional latent decoder."""

    model: nn.Module
    diffusion: GaussianDiffusion
    config: dict
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None  # latents (scaled) -> images in [-1, 1]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space the diffusion runs in (pixels or latents)."""
        return tuple(self.config["data"]["shape"])

    @property
    def num_classes(self) -> int | None:
        return self.config["data"].get("num_classes")

    @property
    def is_latent(self) -> bool:
        return self.config["data"].get("space") == "latent"

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in the diffusion space -> data space (decodes latents; pixels pass through)."""
        if self.decoder is None:
            return x
        with torch.no_grad():
            return self.decoder(x).clamp(-1, 1)


def save_diffusion_dir(path: str | os.PathLike, model: nn.Module, ema_model, diffusion_block: dict,
                       data_block: dict, latent_block: dict | None = None,
                       extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write `models/diffusion/`-style folder atomically (weights, EMA weights, `extra_files`, config.json last)."""
    save_model_dir(path, model, {"diffusion": diffusion_block, "data": data_block, "latent": latent_block},
                   ema_model=ema_model, extra_files=extra_files)


def load_autoencoder_decoder(path: str | os.PathLike, scale_factor: float, map_location="cpu"):
    """decode(z_scaled) = autoencoder.decode(z_scaled / scale_factor)."""
    ae, _ = load_model_dir(path, use_ema=False, map_location=map_location)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return ae.decode(z / scale_factor)

    return decode


def load_diffusion_dir(path: str | os.PathLike, use_ema: bool = True, map_location="cpu",
                       autoencoder: str | os.PathLike | None = None) -> DiffusionBundle:
    """Load a diffusion model folder; latent models get their autoencoder's decoder automatically.

    The autoencoder path in config.json is resolved as written, then relative to the model folder's parent
    chain (for a storage URL: on the same store, e.g. s3://b/run/models/autoencoder beside
    s3://b/run/models/diffusion); `autoencoder` (a folder or URL) overrides it.
    """
    url = os.fspath(path) if is_url(path) else None
    path = local_model_path(path)
    model, config = load_model_dir(path, use_ema=use_ema, map_location=map_location)
    for key in ("diffusion", "data"):
        if key not in config:
            raise CheckpointError(f"{Path(path) / 'config.json'} has no {key!r} block: not a diffusion model folder "
                                  f"(point --model at the output of train_diffusion, e.g. models/diffusion)")
    diffusion = build_diffusion(config["diffusion"])
    decoder = None
    if config["data"].get("space") == "latent":
        latent = config.get("latent") or {}
        if url and not autoencoder and latent.get("autoencoder"):
            autoencoder = find_beside(url, latent["autoencoder"])
        if autoencoder:
            autoencoder = local_model_path(autoencoder)
        ae_path = Path(autoencoder) if autoencoder else _resolve(Path(path), latent.get("autoencoder"))
        if ae_path is None or not (ae_path / "config.json").exists():
            raise CheckpointError(f"latent model {path} needs its autoencoder (config says "
                                  f"{latent.get('autoencoder')!r}, not found): run train_autoencoder "
                                  "or pass its folder")
        decoder = load_autoencoder_decoder(ae_path, float(latent["scale_factor"]), map_location)
    return DiffusionBundle(model, diffusion, config, decoder)


def _resolve(model_dir: Path, recorded: str | None) -> Path | None:
    if not recorded:
        return None
    p = Path(recorded)
    if p.is_absolute() or (p / "config.json").exists():
        return p
    for base in [model_dir, *model_dir.resolve().parents]:
        if (base / p / "config.json").exists():
            return base / p
    return p


@dataclass
class ClassifierBundle:
    """A noisy classifier p(y | x_t, t) with its config.json (its `diffusion` block must match the model's)."""

    model: torch.nn.Module
    config: dict

    @property
    def num_classes(self) -> int:
        return int(self.config["model"]["num_classes"])


def load_classifier_dir(path: str | os.PathLike, use_ema: bool = True, map_location="cpu") -> ClassifierBundle:
    """Load a `models/classifier`-style folder (NoisyClassifier weights + config.json)."""
    model, config = load_model_dir(path, use_ema=use_ema, map_location=map_location)
    if config.get("model", {}).get("kind") != "noisy_classifier":
        raise CheckpointError(f"{path} holds a {config.get('model', {}).get('kind')!r} model, not a noisy classifier "
                              f"(point --classifier at the output of train_classifier, e.g. models/classifier)")
    return ClassifierBundle(model, config)
