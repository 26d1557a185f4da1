"""Trained networks as MLflow models (pyfunc): the model folder (safetensors + config.json, no pickled weights) is
the model's artifact, and the code is shipped beside it, so `mlflow.pyfunc.load_model` needs only torch, numpy and
safetensors.

    m = mlflow.pyfunc.load_model("models:/diffusion-tiny-diffusion/1")   # or runs:/<run_id>/model
    images = m.predict({"num_samples": 4, "seed": 0, "sampler": "ddim", "steps": 20, "class_label": 3})

Diffusion models (`DiffusionModel`): the input is a dict, or a DataFrame whose first row is used, with the optional
keys num_samples (16), seed (0; sample i uses seed + i), sampler ("ddim"), steps (50, at most the model's T),
eta (0.0), spacing ("trailing"), guidance ("none" | "cfg"), scale (1.0), class_label (a class index; unset:
unconditional, or all classes cycled under cfg), batch_size (64). The output is uint8 images [N, H, W, C] (point
data: float32 [N, D]), the same as `diffusion_core.generation.generate(load_diffusion_dir(folder), ...)` gives.
Latent models carry their autoencoder folder as a second artifact.

Other networks (`NetworkModel`): input float images in [-1, 1], [N, C, H, W] (the classifier: {"x_t": images,
"t": int timesteps [N]}); output the autoencoder's reconstructions, the feature net's or the classifier's logits
(float32 arrays). `m.unwrap_python_model().network` is the loaded `nn.Module`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from .provenance import MODEL_ARTIFACT, registered_name  # noqa: F401 (registered_name re-exported)

CODE_ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("diffusion_core", "pipeline")  # shipped with each model: its loader is pipeline.mlflow_models
REQUIREMENTS = ("mlflow", "torch", "numpy", "safetensors", "pandas")
SAMPLE_DEFAULTS = {"num_samples": 16, "seed": 0, "sampler": "ddim", "steps": 50, "eta": 0.0, "spacing": "trailing",
                   "guidance": "none", "scale": 1.0, "class_label": None, "batch_size": 64}
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_COLUMN_TYPES = {int: "long", float: "double", str: "string"}


def _request(model_input: Any) -> dict:
    """A dict of sampling options from a dict or the first row of a DataFrame; unknown keys refused."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        rows = model_input.to_dict(orient="records")
        model_input = rows[0] if rows else {}
    if not isinstance(model_input, dict):
        raise ValueError(f"diffusion model input must be a dict or a DataFrame, got {type(model_input).__name__}")
    unknown = sorted(set(model_input) - set(SAMPLE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown sampling option(s) {unknown}; accepted: {', '.join(SAMPLE_DEFAULTS)}")
    req = dict(SAMPLE_DEFAULTS)
    for k, v in model_input.items():
        if v is not None and not (isinstance(v, float) and np.isnan(v)):  # a DataFrame's missing cell is NaN
            req[k] = v.item() if hasattr(v, "item") else v
    return req


def _given(model_input: Any, key: str) -> Any:
    """The value the request itself gave for `key` (None: left to the default)."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):
        rows = model_input.to_dict(orient="records")
        model_input = rows[0] if rows else {}
    value = model_input.get(key) if isinstance(model_input, dict) else None
    return None if isinstance(value, float) and np.isnan(value) else value


class DiffusionModel(mlflow.pyfunc.PythonModel):
    """A `models/diffusion` folder as a pyfunc model; predict draws samples (module doc)."""

    def load_context(self, context) -> None:
        from diffusion_core.model_folders import load_diffusion_dir

        self.bundle = load_diffusion_dir(context.artifacts["model"], autoencoder=context.artifacts.get("autoencoder"))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        from diffusion_core.generation import SamplingSpec, default_sampler, generate

        req = _request(model_input)
        if _given(model_input, "sampler") is None:  # a distilled student samples with its own by default
            req["sampler"] = default_sampler(self.bundle)
        steps = min(int(req["steps"]), self.bundle.diffusion.num_timesteps)
        classes = None if req["class_label"] is None else [int(req["class_label"])]
        spec = SamplingSpec.from_setting({"sampler": str(req["sampler"]), "steps": steps, "eta": float(req["eta"]),
                                          "guidance": str(req["guidance"]), "scale": float(req["scale"]),
                                          "spacing": str(req["spacing"])})
        out = generate(self.bundle, int(req["num_samples"]), spec, classes=classes, seed=int(req["seed"]),
                       batch_size=int(req["batch_size"]))
        return out["images"] if "images" in out else out["points"]


class NetworkModel(mlflow.pyfunc.PythonModel):
    """An autoencoder, noisy-classifier or feature-net folder as a pyfunc model (module doc)."""

    def load_context(self, context) -> None:
        from diffusion_core.checkpoint import load_model_dir

        self.network, self.config = load_model_dir(context.artifacts["model"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        kind = self.config["model"].get("kind")
        with torch.no_grad():
            if isinstance(model_input, dict):
                x = torch.as_tensor(np.asarray(model_input["x_t"]), dtype=torch.float32)
                t = torch.as_tensor(np.asarray(model_input["t"]), dtype=torch.long)
                return self.network(x, t).numpy()
            x = torch.as_tensor(np.asarray(model_input), dtype=torch.float32)
            if kind == "autoencoder_kl":
                return self.network.decode(self.network.encode(x).mode()).clamp(-1, 1).numpy()
            return self.network(x).numpy()


@contextlib.contextmanager
def _quiet_mlflow():
    """MLflow's INFO lines ("Validating input example ...") and download bars while logging a model kept off the
    stage's console."""
    logger, bar = logging.getLogger("mlflow"), os.environ.get(_PROGRESS_BAR)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    os.environ[_PROGRESS_BAR] = "false"  # the input example's check downloads the model it just logged
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop(_PROGRESS_BAR, None)
        else:
            os.environ[_PROGRESS_BAR] = bar


def _requirements() -> list[str]:
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _read_config(folder: str | os.PathLike) -> dict:
    from diffusion_core.checkpoint import read_config

    return read_config(folder)


def signature(folder: str | os.PathLike, diffusion: bool, autoencoder: str | os.PathLike | None = None):
    """The MLflow signature of a model folder (module doc): logged with the model, so MLflow neither infers one
    nor warns that it could not."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    config = _read_config(folder)
    model = config["model"]
    if diffusion:
        types = {"class_label": "long", **{k: _COLUMN_TYPES[type(v)] for k, v in SAMPLE_DEFAULTS.items()
                                            if v is not None}}
        inputs = Schema([ColSpec(types[k], k, required=False) for k in SAMPLE_DEFAULTS])
        shape = config["data"]["shape"]
        if len(shape) == 1:
            return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), (-1, shape[0]))]))
        if config["data"].get("space") == "latent":
            ae = _read_config(autoencoder)["model"]
            shape = [ae["in_channels"], ae["image_size"], ae["image_size"]]
        c, h, w = shape
        return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c))]))
    image = TensorSpec(np.dtype(np.float32), (-1, model["in_channels"], model["image_size"], model["image_size"]))
    if model["kind"] == "noisy_classifier":
        inputs = Schema([TensorSpec(np.dtype(np.float32), image.shape, "x_t"), TensorSpec(np.dtype(np.int64), (-1,),
                                                                                           "t")])
        return ModelSignature(inputs, Schema([TensorSpec(np.dtype(np.float32), (-1, model["num_classes"]))]))
    if model["kind"] == "autoencoder_kl":
        return ModelSignature(Schema([image]), Schema([image]))
    return ModelSignature(Schema([image]), Schema([TensorSpec(np.dtype(np.float32), (-1, model["num_classes"]))]))


def input_example(folder: str | os.PathLike, diffusion: bool) -> Any:
    """A small input that MLflow stores with the model and checks the model answers (one sample, two steps; a
    distilled student's fewest steps)."""
    config = _read_config(folder)
    if diffusion:
        return {"num_samples": 1, "seed": 0, "steps": min(config["student"]["steps"]) if config.get("student") else 2}
    model = config["model"]
    x = np.zeros((1, model["in_channels"], model["image_size"], model["image_size"]), dtype=np.float32)
    return {"x_t": x, "t": np.zeros(1, dtype=np.int64)} if model["kind"] == "noisy_classifier" else x


def log_model_folder(run: Any, folder: str | os.PathLike, *, diffusion: bool = False,
                     autoencoder: str | os.PathLike | None = None, register_as: str | None = None) -> str | None:
    """Log `folder` to the active run as MLflow model `model` (runs:/<run_id>/model); with `register_as`, register
    it under that name with this run as its source. Returns the model URI; None when tracking is off."""
    if not getattr(run, "active", False):
        return None
    artifacts = {"model": str(folder)}
    if autoencoder is not None:
        artifacts["autoencoder"] = str(autoencoder)
    with tempfile.TemporaryDirectory(prefix=".mlflow-code-") as code:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        paths = [shutil.copytree(CODE_ROOT / pkg, Path(code) / pkg, ignore=ignore) for pkg in CODE_PACKAGES]
        # models from code: the model is this module's class, named in a two-line file (nothing is pickled)
        loader = Path(code) / "model.py"
        cls = "DiffusionModel" if diffusion else "NetworkModel"
        loader.write_text(f"import mlflow\nfrom pipeline.mlflow_models import {cls}\n\n"
                          f"mlflow.models.set_model({cls}())\n")
        with _quiet_mlflow():
            info = mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, python_model=str(loader), artifacts=artifacts,
                                           code_paths=[str(p) for p in paths], pip_requirements=_requirements(),
                                           signature=signature(folder, diffusion, autoencoder),
                                           input_example=input_example(folder, diffusion))
    uri = f"runs:/{run.run_id}/{MODEL_ARTIFACT}"
    if register_as:
        client = mlflow.MlflowClient()
        try:
            client.get_registered_model(register_as)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(register_as, description="Diffusion model of the train_diffusion stage")
        version_ = client.create_model_version(register_as, source=info.model_uri, run_id=run.run_id,
                                               model_id=getattr(info, "model_id", None))
        run.set_tags({"registered_model": register_as, "registered_model_version": version_.version})
    return uri


def tag_registered_version(training_run_id: str | None, figures: dict, evaluate_run_id: str) -> tuple | None:
    """Put evaluate's figures (`evaluate.<metric>` tags) and its run id on the registry version that the training
    run `training_run_id` registered, so the Models page shows how that version samples; returns (name, version),
    None when that run registered nothing."""
    if not training_run_id:
        return None
    client = mlflow.MlflowClient()
    try:
        tags = client.get_run(training_run_id).data.tags
    except mlflow.exceptions.MlflowException:  # a model folder trained against another tracking store
        return None
    name, version = tags.get("registered_model"), tags.get("registered_model_version")
    if not name or not version:
        return None
    for key, value in figures.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.set_model_version_tag(name, version, f"evaluate.{key}", f"{value:.6g}")
    client.set_model_version_tag(name, version, "evaluate_run_id", evaluate_run_id)
    return name, version
