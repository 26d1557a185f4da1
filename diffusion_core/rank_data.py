"""A rank's randomness and data: every random draw of a training step comes from a generator seeded with (seed, rank,
step), so a resumed run takes exactly the steps an uninterrupted one would; the global RNG states are captured and
restored for any other user; a rank holds its block of the training split in memory.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (sha256), so nearby (seed, rank, step) give unrelated streams."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, rank: int, step: int, stream: int = 0) -> torch.Generator:
    """CPU generator for one (seed, rank, step); stream separates independent uses within a step."""
    return torch.Generator().manual_seed(_mix(seed, rank, step, stream))


def batch_indices(n: int, batch: int, step: int, seed: int, rank: int) -> torch.Tensor:
    """Indices into this rank's n samples for `step`: epochs of fresh permutations, consumed `batch` at a time."""
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, rank, e, 99)))
        m = epochs == e
        out[m] = perm[offsets[m]]
    return out


def capture_rng_state() -> dict[str, Any]:
    """Global torch (CPU and CUDA), numpy and Python RNG states as tensors (loadable with weights_only=True)."""
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
             "numpy_pos": int(np.random.get_state()[2]),
             "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RankData:
    """This rank's block of the training split in memory: x [N, ...] float32, y [N] long, sample keys."""

    x: torch.Tensor
    y: torch.Tensor
    keys: list[str]


def load_rank_data(shard_dir: str | os.PathLike, rank: int, world_size: int, *, verify_checksums: bool = False,
                   on_bad_shard: str = "error", split: str = "train", scale: float = 1.0) -> RankData:
    """Read only this rank's shards (ShardDataset's rank split: disjoint, equal counts) once into memory.

    Latents are multiplied by `scale` (the autoencoder's scale_factor) so the diffusion sees unit variance.
    """
    from .data import ShardDataset

    ds = ShardDataset(shard_dir, split, shuffle_buffer=0, rank=rank, world_size=world_size, uneven="drop",
                      verify_checksums=verify_checksums, on_bad_shard=on_bad_shard, with_keys=True)
    xs, ys, keys = [], [], []
    for x, y, key in ds:
        xs.append(x)
        ys.append(y)
        keys.append(key)
    x = torch.stack(xs).float()
    return RankData(x * scale if scale != 1.0 else x, torch.as_tensor(ys, dtype=torch.long), keys)
