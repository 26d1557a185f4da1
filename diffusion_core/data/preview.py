"""Preview images of data: a uint8 image grid and a 2-D scatter, written atomically."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ..io import atomic_path


def image_grid(images: np.ndarray, nrow: int = 10, pad: int = 1, scale: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 grid image [rows*(H+pad)+pad, nrow*(W+pad)+pad, C]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"image_grid wants uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, min(n, nrow) * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    return grid


def save_image_grid(images: np.ndarray, path: str | os.PathLike, nrow: int = 10, scale: int = 1) -> np.ndarray:
    """Write `image_grid(images)` as PNG to `path`; returns the grid."""
    from PIL import Image

    grid = image_grid(images, nrow=nrow, scale=scale)
    with atomic_path(path) as tmp:
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")
    return grid


def save_scatter(points: np.ndarray, labels: np.ndarray, path: str | os.PathLike,
                 class_names: Sequence[str] | None = None, title: str = "") -> None:
    """Scatter plot of 2-D points coloured by label, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for c in np.unique(labels):
        m = labels == c
        ax.scatter(points[m, 0], points[m, 1], s=2, label=class_names[c] if class_names else str(c))
    ax.set_aspect("equal")
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    if title:
        ax.set_title(title)
    ax.legend(markerscale=4, fontsize=7, loc="upper right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


def save_preview(x: np.ndarray, y: np.ndarray, kind: str, path: str | os.PathLike, class_names: Sequence[str],
                 per_class: int = 10) -> None:
    """Dataset preview: a grid with one row per class (images) or a scatter (points)."""
    if kind == "points":
        save_scatter(x, y, path, class_names, title="samples by class")
        return
    classes = np.unique(y)[:20]
    picks = []
    for c in classes:
        idx = np.flatnonzero(y == c)[:per_class]
        picks.append(np.concatenate([x[idx], np.zeros((per_class - len(idx),) + x.shape[1:], np.uint8)]))
    h = x.shape[1]
    save_image_grid(np.concatenate(picks), path, nrow=per_class, scale=max(1, 56 // h))
