"""Data: decoded images/s of the shard reader on one core (ShardDataset streaming and load_split), on PNG shards
of 28x28x1 uint8 images written to a temp dir with write_array_split."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from diffusion_core.data.reader import ShardDataset, load_split
from diffusion_core.data.shards import build_meta, write_array_split, write_meta

from .common import interleaved, load, num_threads


def write_split(root: Path, n: int, per_shard: int = 1000) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, size=n)
    shard_dir = root / "shards"
    recs = write_array_split(shard_dir, "train", x, y, per_shard)
    write_meta(root / "meta.json", build_meta(dataset="bench", kind="image", sample_shape=(1, 28, 28),
                                              class_names=[str(i) for i in range(10)], labels={"train": y},
                                              shards={"train": recs}, payload="png"))
    return shard_dir


def run(quick: bool = False) -> dict:
    n = 5000 if quick else 10000
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp, num_threads(1):
        shard_dir = write_split(Path(tmp), n)

        def stream(buffer):
            def f():
                ds = ShardDataset(shard_dir, "train", shuffle_buffer=buffer, seed=0, rank=0, world_size=1)
                count = sum(1 for _ in ds)
                assert count == n
            return f

        t = interleaved({"stream_noshuffle": stream(0), "stream_shuffle1000": stream(1000),
                         "load_split": lambda: load_split(shard_dir, "train")},
                        repeats=3 if quick else 5, warmup=1)
    out = {"images": n, "threads": 1, "load_after": load()}
    for k, v in t.items():
        out[f"{k}_images_per_s"] = round(n / v["median_s"], 1)
        out[k] = v
    out["images_per_s"] = out["stream_shuffle1000_images_per_s"]  # what a training loop consumes through
    return out
