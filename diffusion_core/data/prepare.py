"""The prepare step as a library function: source -> stratified split -> shards + meta.json, swapped in atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io import OutputError, staging_dir
from ..options import PrepareOptions
from .shards import META_NAME, build_meta, replace_dir, write_array_split, write_meta
from .sources import SourceData, load_source, stratified_split


def prepare_dataset(cfg: PrepareOptions, out_dir: str | os.PathLike = "data",
                    shard_subdir: str = "shards") -> tuple[dict[str, Any], SourceData, dict[str, np.ndarray]]:
    """Write `out_dir/shards/{train,test}-%06d.tar` and `out_dir/meta.json` for the dataset `cfg` names.

    Everything is written into a temporary folder first; the old shards and meta stay intact until the new
    ones are complete. Returns (meta, source data, split indices).
    """
    data = load_source(cfg)
    train_idx, test_idx = stratified_split(data.y, cfg.test_fraction, cfg.seed)
    splits = {"train": train_idx, "test": test_idx}
    out_dir = Path(out_dir)
    with staging_dir(out_dir, ".prepare-") as tmp:
        try:
            meta = _write_dataset(tmp, out_dir, shard_subdir, data, splits, cfg)
        except OSError as e:
            raise OutputError(f"cannot write dataset into {out_dir}: {e.strerror or e} "
                              "(disk full or folder not writable?)") from e
    return meta, data, splits


def _write_dataset(tmp: Path, out_dir: Path, shard_subdir: str, data: SourceData, splits: dict,
                   cfg: PrepareOptions) -> dict:
    """Shards and meta.json built in `tmp`, then swapped into `out_dir`; returns the meta."""
    shards = {
        s: write_array_split(tmp / shard_subdir, s, data.x[idx], data.y[idx], cfg.samples_per_shard)
        for s, idx in splits.items()
    }
    sample_shape = (data.x.shape[3], data.x.shape[1], data.x.shape[2]) if data.kind == "image" else data.x.shape[1:]
    meta = build_meta(
        dataset=data.name,
        kind=data.kind,
        payload="png" if data.kind == "image" else "npy",
        sample_shape=sample_shape,
        class_names=data.class_names,
        labels={s: data.y[idx] for s, idx in splits.items()},
        shards=shards,
        shard_dir=shard_subdir,
        seed=cfg.seed,
        test_fraction=cfg.test_fraction,
    )
    write_meta(tmp / META_NAME, meta)
    # The readers' copy travels inside the shards folder, so shards and the meta.json they read swap in together
    # (find_meta prefers it); out_dir/meta.json follows as a second swap, for people and dvc.
    write_meta(tmp / shard_subdir / META_NAME, meta)
    replace_dir(tmp / shard_subdir, out_dir / shard_subdir)
    os.replace(tmp / META_NAME, out_dir / META_NAME)
    return meta
