"""Read shards back: a streaming `ShardDataset` for training loops and an in-memory `load_split` for small data.

Rank/worker split: every rank enumerates all samples of the split from `meta.json` (shards in a per-epoch
seeded order, samples in shard order), takes its own contiguous, equal-length block of that enumeration
(`uneven="drop"` drops the N % world_size tail, `"repeat"` wraps around), and each DataLoader worker takes a
contiguous part of its rank's block. Ranks therefore see disjoint samples and the same count per epoch, so
DDP never waits on a rank that ran out, and each worker opens only the shards it needs.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import DataError
from .shards import decode_npy, decode_png, parse_tar, read_location, read_meta, shard_file, shard_location

FIX_HINT = "rerun the stage that wrote it (`dvc repro prepare`, or `dvc checkout` to restore it)"


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): explicit arguments, else torch.distributed if initialized, else RANK/WORLD_SIZE env,
    else (0, 1)."""
    if rank is None or world_size is None:
        r, w = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif "WORLD_SIZE" in os.environ:
            r, w = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def read_shard_bytes(path: Path | str, record: Mapping[str, Any], verify: bool) -> list[dict[str, bytes]]:
    """All raw samples of one shard (a local file or a URL); checks the sample count (and sha256 if `verify`)
    against its meta record."""
    try:
        data = read_location(path)
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; {FIX_HINT}") from None
    except OSError as e:
        raise DataError(f"cannot read shard {path}: {e.strerror or e}") from None
    if verify and record.get("sha256"):
        import hashlib

        got = hashlib.sha256(data).hexdigest()
        if got != record["sha256"]:
            raise DataError(
                f"checksum mismatch for shard {path} (meta.json {record['sha256'][:12]}..., file {got[:12]}...): "
                f"the file changed since it was written; {FIX_HINT}"
            )
    try:
        samples = list(parse_tar(data, str(path)))
    except DataError as e:
        raise DataError(f"{e}; {FIX_HINT}") from None
    if len(samples) != int(record["count"]):
        raise DataError(
            f"shard {path} is corrupt or truncated ({len(samples)} samples, meta.json says {record['count']}); "
            f"{FIX_HINT}"
        )
    return samples


def decode_sample(raw: Mapping[str, bytes], path: Path | str = "<shard>") -> tuple[np.ndarray, int, bool]:
    """(array, label, is_image): png -> uint8 H x W x C, npy -> stored array."""
    try:
        y = int(raw["cls"]) if "cls" in raw else -1
        if "png" in raw:
            return decode_png(raw["png"]), y, True
        if "npy" in raw:
            return decode_npy(raw["npy"]), y, False
    except Exception as e:  # noqa: BLE001 - PIL/numpy raise many types for corrupt bytes
        raise DataError(f"shard {path}: sample {raw.get('__key__')!r} does not decode ({type(e).__name__}: {e}); "
                        f"{FIX_HINT}") from None
    raise DataError(f"shard {path}: sample {raw.get('__key__')!r} has no png or npy field; {FIX_HINT}")


def to_tensor(arr: np.ndarray, is_image: bool) -> torch.Tensor:
    """uint8 H x W x C -> float C x H x W in [-1, 1]; other arrays -> float32 as stored."""
    if is_image:
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().mul_(2.0 / 255.0).sub_(1.0)
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


class ShardDataset(IterableDataset):
    """Stream `(x, y)` (or `(x, y, key)` with `with_keys`) from `shard_dir/{split}-*.tar`; `shard_dir` is a local
    folder or an fsspec URL (`s3://bucket/data/shards-<hash>`: `diffusion_core.storage.upload_shards`).

    x: float C x H x W in [-1, 1] for images, the stored float array for latents/points; y: int label.
    `len()` is this rank's sample count per epoch. Call `set_epoch(e)` each epoch (as with DistributedSampler).
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        split: str,
        *,
        meta: str | os.PathLike | Mapping[str, Any] | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        uneven: Literal["drop", "repeat"] = "drop",
        verify_checksums: bool = False,
        on_bad_shard: Literal["error", "skip"] = "error",
        with_keys: bool = False,
    ):
        super().__init__()
        self.shard_dir = shard_location(shard_dir)
        self.meta = dict(meta) if isinstance(meta, Mapping) else read_meta(meta if meta is not None else self.shard_dir)
        if split not in self.meta["shards"]:
            raise DataError(f"split {split!r} not in {self.shard_dir} (has {', '.join(self.meta['shards'])})")
        if uneven not in ("drop", "repeat") or on_bad_shard not in ("error", "skip"):
            raise ValueError("uneven must be drop|repeat and on_bad_shard error|skip, "
                             f"got {uneven!r}, {on_bad_shard!r}")
        self.split = split
        self.records: list[dict[str, Any]] = list(self.meta["shards"][split])
        self.total = sum(int(r["count"]) for r in self.records)
        self.rank, self.world_size = dist_info(rank, world_size)
        self.shuffle_buffer, self.seed, self.uneven = int(shuffle_buffer), int(seed), uneven
        self.verify_checksums, self.on_bad_shard, self.with_keys = verify_checksums, on_bad_shard, with_keys
        self.epoch = 0
        if self.per_rank == 0:
            raise DataError(f"split {split!r} of {self.shard_dir} has {self.total} samples, "
                            f"fewer than {self.world_size} ranks")

    @property
    def per_rank(self) -> int:
        if self.uneven == "drop":
            return self.total // self.world_size
        return -(-self.total // self.world_size)

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self, worker: int = 0, num_workers: int = 1) -> list[tuple[int, int, int]]:
        """This rank/worker's reads for the current epoch: `(shard index, start, stop)` sample ranges."""
        order = np.arange(len(self.records))
        if self.shuffle_buffer > 0:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.records))
        counts = np.array([int(self.records[i]["count"]) for i in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        lo = self.rank * self.per_rank
        bounds = np.linspace(0, self.per_rank, num_workers + 1).astype(np.int64)  # contiguous worker parts
        w_lo, w_hi = lo + bounds[worker], lo + bounds[worker + 1]
        segs: list[tuple[int, int, int]] = []
        pos = w_lo
        while pos < w_hi:  # positions past `total` wrap around (uneven="repeat")
            p = pos % self.total
            j = int(np.searchsorted(starts, p, side="right") - 1)
            take = min(w_hi - pos, starts[j + 1] - p)
            segs.append((int(order[j]), int(p - starts[j]), int(p - starts[j] + take)))
            pos += take
        return segs

    def _samples(self, segs: list[tuple[int, int, int]]) -> Iterator[tuple]:
        cache: dict[int, list[dict[str, bytes]]] = {}
        pad_pool: deque = deque(maxlen=256)
        deficit = 0
        bad: set[int] = set()
        for shard, start, stop in segs:
            path = shard_file(self.shard_dir, self.records[shard]["name"])
            if shard in bad:
                deficit += stop - start
                continue
            try:
                if shard not in cache:
                    cache.clear()  # keep at most one shard in memory
                    cache[shard] = read_shard_bytes(path, self.records[shard], self.verify_checksums)
                raws = cache[shard][start:stop]
                decoded = [(decode_sample(r, path), r["__key__"]) for r in raws]
            except DataError as e:
                if self.on_bad_shard == "error":
                    raise DataError(f"{e} (or set data.on_bad_shard: skip)") from None
                warnings.warn(f"skipping bad shard {path}: {e}", RuntimeWarning, stacklevel=2)
                bad.add(shard)
                deficit += stop - start
                continue
            for (arr, y, is_img), key in decoded:
                item = (to_tensor(arr, is_img), y, key) if self.with_keys else (to_tensor(arr, is_img), y)
                pad_pool.append(item)
                yield item
        if deficit:
            # a skipped shard must not shorten this rank's epoch (DDP would wait forever): repeat recent samples
            if not pad_pool:
                raise DataError(f"every shard this reader was given in {self.shard_dir} is bad; {FIX_HINT}")
            for i in range(deficit):
                yield pad_pool[i % len(pad_pool)]

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        it = self._samples(self.plan(worker, num_workers))
        if self.shuffle_buffer <= 1:
            yield from it
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        buf: list = []
        for item in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf


def load_split(
    shard_dir: str | os.PathLike,
    split: str,
    *,
    meta: str | os.PathLike | Mapping[str, Any] | None = None,
    verify_checksums: bool = False,
    as_uint8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a whole split into memory once: (x [N, ...], y long [N]) in shard order.

    Images: float [N, C, H, W] in [-1, 1] (uint8 with `as_uint8`); latents/points: float32 as stored.
    """
    shard_dir = shard_location(shard_dir)
    meta = dict(meta) if isinstance(meta, Mapping) else read_meta(meta if meta is not None else shard_dir)
    if split not in meta["shards"]:
        raise DataError(f"split {split!r} not in {shard_dir} (has {', '.join(meta['shards'])})")
    arrays, labels, is_img = [], [], False
    for rec in meta["shards"][split]:
        path = shard_file(shard_dir, rec["name"])
        for raw in read_shard_bytes(path, rec, verify_checksums):
            arr, y, is_img = decode_sample(raw, path)
            arrays.append(arr)
            labels.append(y)
    if not arrays:
        raise DataError(f"split {split!r} in {shard_dir} is empty")
    x = np.stack(arrays)
    y_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if is_img:
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        return (xt if as_uint8 else xt.float().mul_(2.0 / 255.0).sub_(1.0)), y_t
    return torch.from_numpy(x.astype(np.float32, copy=False)), y_t
