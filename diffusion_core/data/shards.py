"""WebDataset shard I/O: deterministic tars of `__key__` + payload fields, written atomically, plus `meta.json`.

A sample is a mapping `{"__key__": str, ext: value, ...}`; values are encoded by extension:
`png` (uint8 array H x W [x C] or PIL image), `npy` (array, stored as float32 unless already another dtype),
`cls` (int), `json` (object), anything else `bytes`/`str`. The same functions write image shards
(`prepare`) and latent shards (`encode_latents`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..io import OutputError, atomic_path, atomic_write_json, exchange_paths
from .errors import DataError

SPLITS = ("train", "test")
SHARD_PATTERN = "{split}-{index:06d}.tar"
META_NAME = "meta.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- encoding


def encode_png(img: Any) -> bytes:
    """uint8 H x W, H x W x 1 (mode L) or H x W x 3 (RGB) array, or a PIL image -> PNG bytes."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise ValueError(f"png payload must be uint8, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
            raise ValueError(f"png payload must be H x W (x 1|3), got shape {arr.shape}")
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_npy(arr: Any) -> bytes:
    a = np.asarray(arr)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def encode_field(ext: str, value: Any) -> bytes:
    """Encode one sample field by its extension (see module docstring)."""
    if isinstance(value, bytes):
        return value
    if ext == "png":
        return encode_png(value)
    if ext == "npy":
        return encode_npy(value)
    if ext == "cls":
        return str(int(value)).encode()
    if ext == "json":
        return json.dumps(value, sort_keys=True).encode()
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"cannot encode field .{ext} of type {type(value).__name__}; pass bytes")


def decode_npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def decode_png(b: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array H x W x C."""
    from PIL import Image

    with Image.open(io.BytesIO(b)) as im:
        a = np.array(im)  # writable (torch.from_numpy warns on read-only arrays)
    return a[..., None] if a.ndim == 2 else a


# ----------------------------------------------------------------------------------------------- writing


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    return SHARD_PATTERN.format(split=split, index=index)


def _write_tar(path: Path, samples: Sequence[Mapping[str, Any]]) -> None:
    # fixed mtime/owner so the same samples give the same bytes (and sha256): DVC sees no spurious change
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            key = str(s["__key__"])
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            for ext in sorted(k for k in s if not k.startswith("__")):
                data = encode_field(ext, s[ext])
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o644, "", ""
                tf.addfile(ti, io.BytesIO(data))


def write_shards(
    shard_dir: str | os.PathLike, split: str, samples: Iterable[Mapping[str, Any]], samples_per_shard: int
) -> list[dict[str, Any]]:
    """Write `samples` into `shard_dir/{split}-%06d.tar`, each tar atomically.

    Returns one record per shard: `{"name", "count", "sha256"}` (for `meta.json`).
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    shard_dir = Path(shard_dir)
    records: list[dict[str, Any]] = []
    batch: list[Mapping[str, Any]] = []

    def flush() -> None:
        path = shard_dir / shard_name(split, len(records))
        with atomic_path(path) as tmp:
            _write_tar(tmp, batch)
            digest = sha256_file(tmp)
        records.append({"name": path.name, "count": len(batch), "sha256": digest})
        batch.clear()

    for s in samples:
        batch.append(s)
        if len(batch) == samples_per_shard:
            flush()
    if batch:
        flush()
    return records


def array_samples(x: np.ndarray, y: np.ndarray, prefix: str, payload: str | None = None) -> Iterator[dict[str, Any]]:
    """Samples from arrays: uint8 images N x H x W x C -> `png`; float arrays (points, latents C x h x w) -> `npy`."""
    if payload is None:
        payload = "png" if x.dtype == np.uint8 else "npy"
    width = max(6, len(str(len(x))))
    for i in range(len(x)):
        yield {"__key__": f"{prefix}_{i:0{width}d}", payload: x[i], "cls": int(y[i])}


def write_array_split(
    shard_dir: str | os.PathLike, split: str, x: np.ndarray, y: np.ndarray, samples_per_shard: int,
    payload: str | None = None
) -> list[dict[str, Any]]:
    """`write_shards` over `array_samples(x, y)`; keys are `{split}_{i}`."""
    return write_shards(shard_dir, split, array_samples(x, y, split, payload), samples_per_shard)


def build_meta(
    *,
    dataset: str,
    kind: str,
    sample_shape: Sequence[int],
    class_names: Sequence[str],
    labels: Mapping[str, np.ndarray],
    shards: Mapping[str, list[dict[str, Any]]],
    payload: str,
    **extra: Any,
) -> dict[str, Any]:
    """The `meta.json` record. `sample_shape` is C x H x W for images and latents, (2,) for points."""
    num_classes = len(class_names)
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "kind": kind,  # image | points | latent
        "payload": payload,  # png | npy
        "sample_shape": [int(s) for s in sample_shape],
        "num_classes": num_classes,
        "class_names": list(class_names),
        "counts": {s: int(len(v)) for s, v in labels.items()},
        "class_counts": {s: np.bincount(np.asarray(v, dtype=np.int64), minlength=num_classes).tolist()
                         for s, v in labels.items()},
        "shards": {s: list(v) for s, v in shards.items()},
    }
    if kind == "image":
        meta["channels"] = int(sample_shape[0])
        meta["image_size"] = [int(sample_shape[1]), int(sample_shape[2])]
    meta.update(extra)
    return meta


def write_meta(path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    atomic_write_json(path, dict(meta))


def shard_location(shard_dir: str | os.PathLike) -> Path | str:
    """A shard folder as the readers keep it: a local Path, or an fsspec URL (`s3://bucket/data/shards-...`) kept as
    text, since Path would fold its '//'."""
    from ..storage import is_url

    return os.fspath(shard_dir).rstrip("/") if is_url(shard_dir) else Path(shard_dir)


def shard_file(shard_dir: Path | str, name: str) -> Path | str:
    """`name` inside a folder from `shard_location`."""
    return shard_dir / name if isinstance(shard_dir, Path) else f"{shard_dir}/{name}"


def read_location(path: Path | str) -> bytes:
    """The bytes of a local file or of a URL's object; FileNotFoundError where there is none, DataError where the
    store cannot be read."""
    if isinstance(path, Path):
        return path.read_bytes()
    from ..storage import StorageError, read_bytes

    try:
        return read_bytes(path)
    except StorageError as e:
        raise DataError(str(e)) from None


def find_meta(shard_dir: str | os.PathLike) -> Path:
    """`meta.json` inside `shard_dir` (written with the shards and swapped in with them), else beside it (shards
    from before prepare wrote the inside copy: `data/shards` -> `data/meta.json`)."""
    shard_dir = Path(shard_dir)
    for cand in (shard_dir / META_NAME, shard_dir.parent / META_NAME):
        if cand.is_file():
            return cand
    raise DataError(f"no {META_NAME} in {shard_dir} or {shard_dir.parent}; "
                    "run the stage that writes these shards (e.g. `dvc repro prepare`)")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The meta.json of a shard folder (or the file itself), local or at a URL."""
    path = shard_location(path)
    if isinstance(path, Path) and path.is_dir():
        path = find_meta(path)
    elif isinstance(path, str) and not path.endswith(".json"):
        path = shard_file(path, META_NAME)
    try:
        meta = json.loads(read_location(path).decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found; run the stage that writes it (e.g. `dvc repro prepare`)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable or not JSON ({e}); rerun the stage that writes it") from None
    if not isinstance(meta, dict) or "shards" not in meta or "counts" not in meta:
        raise DataError(f"{path} is not a shard meta.json (no 'shards'/'counts'); rerun the stage that writes it")
    return meta


# ----------------------------------------------------------------------------------------------- reading


def parse_tar(data: bytes, name: str = "<shard>") -> Iterator[dict[str, bytes]]:
    """Raw samples `{"__key__": key, ext: bytes}` of a tar held in memory, grouped by key (WebDataset rules)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            cur: dict[str, Any] | None = None
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                dot = base.find(".")
                if dot <= 0:
                    continue
                key = m.name[: len(m.name) - len(base) + dot]
                ext = base[dot + 1 :]
                f = tf.extractfile(m)
                payload = f.read() if f is not None else b""
                if len(payload) != m.size:
                    raise DataError(f"shard {name} is truncated inside {m.name}")
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        yield cur
                    cur = {"__key__": key}
                cur[ext] = payload
            if cur is not None:
                yield cur
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"shard {name} is corrupt or truncated ({e})") from None


# ----------------------------------------------------------------------------------------------- folders


def replace_dir(new: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move folder `new` onto `dst`: `dst` names the old or the new folder at every instant, even across a kill.

    Where the file system can swap two names in one step (Linux RENAME_EXCHANGE) that is used, and `new` then holds
    the old folder and is deleted. Elsewhere the old `dst` is moved aside first (a kill between the two renames
    leaves it as `.<dst>.old`, which the next call puts back before it starts).
    """
    new, dst = Path(new), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    try:
        if old.exists():
            if dst.exists():
                shutil.rmtree(old)
            else:  # a swap killed between its two renames: the previous folder goes back first
                os.replace(old, dst)
        if dst.exists() and exchange_paths(new, dst):
            shutil.rmtree(new, ignore_errors=True)  # now the previous folder
            return
        if dst.exists():
            os.replace(dst, old)
        os.replace(new, dst)
    except OSError as e:
        if old.exists() and not dst.exists():
            os.replace(old, dst)
        raise OutputError(f"cannot move {new} to {dst}: {e.strerror or e}") from e
    shutil.rmtree(old, ignore_errors=True)


def label_counts(labels: Iterable[int]) -> dict[int, int]:
    return dict(sorted(Counter(int(v) for v in labels).items()))
