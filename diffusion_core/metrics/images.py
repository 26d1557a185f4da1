"""uint8 image sets at the metrics' edge: one layout (N, C, H, W) and a torch Dataset over it."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import MetricsError


def as_uint8_nchw(images) -> torch.Tensor:
    """uint8 [N, C, H, W] tensor from a numpy array [N, H, W, C] (samples.npz layout), a tensor [N, C, H, W] (torch
    layout) or a Dataset of uint8 [C, H, W] tensors."""
    if isinstance(images, Dataset) and not isinstance(images, UInt8Images):
        images = torch.stack([images[i] for i in range(len(images))])
    elif isinstance(images, UInt8Images):
        return images.images
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise MetricsError(f"numpy images must be uint8 [N, H, W, C], got shape {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4:
        desc = f"{images.dtype} {tuple(images.shape)}" if hasattr(images, "shape") else type(images).__name__
        raise MetricsError(f"images must be uint8 [N, C, H, W] (tensor) or [N, H, W, C] (numpy), got {desc}")
    if images.shape[0] == 0:
        raise MetricsError("image set is empty")
    return images.contiguous()


class UInt8Images(Dataset):
    """Dataset of uint8 [C, H, W] tensors (torch-fidelity's input format); `channels=3` repeats grey to RGB."""

    def __init__(self, images, channels: int | None = None):
        x = as_uint8_nchw(images)
        if channels is not None and x.shape[1] != channels:
            if x.shape[1] != 1:
                raise MetricsError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
            x = x.expand(-1, channels, -1, -1).contiguous()
        self.images = x

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]
