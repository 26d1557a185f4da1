"""The end of a training stage once its model folder is written: the metrics file, the folder published under the
storage root (a new version on shared storage), and the folder logged as an MLflow model."""

from __future__ import annotations

import os
from pathlib import Path

from ._stage import storage_root


def publish_model(folder: str | os.PathLike, project) -> str | None:
    """Publish a finished model folder as <storage root>/<folder> (a new version, its LATEST pointer written last:
    diffusion_core.storage) and say where; None without a storage root. `diffusion sample --model URL` reads it."""
    root = storage_root(project)
    if not root:
        return None
    from diffusion_core.storage import join, publish_dir

    url = join(root, Path(folder).as_posix())
    version = publish_dir(folder, url)
    print(f"published {folder}/ to {url} (version {version})", flush=True)
    return url


def finish_model(run, folder: str | os.PathLike, metrics_path: str | os.PathLike, metrics: dict, project,
                 **log_model: object) -> None:
    """Write the metrics file, publish the folder (storage root) and log it as an MLflow model (`log_model`: that
    call's options, e.g. register_as)."""
    from diffusion_core.io import atomic_write_json

    atomic_write_json(metrics_path, metrics)
    publish_model(folder, project)
    if run.active:
        from pipeline.mlflow_models import log_model_folder

        log_model_folder(run, folder, **log_model)
