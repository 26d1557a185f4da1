"""Sources, stratified split, shard round trip, rank/worker splitting, corrupt shards, folder swaps."""

import errno
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffusion_core.data import (
    DataError,
    ShardDataset,
    build_meta,
    load_source,
    load_split,
    read_meta,
    stratified_split,
    write_array_split,
    write_meta,
)
from diffusion_core.data.sources import load_torchvision
from diffusion_core.io import OutputError
from diffusion_core.options import PrepareOptions


def make_shards(root: Path, n=50, per_shard=7, shape=(6, 5, 1), seed=0, payload=None):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 256, (n, *shape), dtype=np.uint8) if payload != "npy"
         else rng.standard_normal((n, *shape)).astype(np.float32))
    y = rng.integers(0, 3, n)
    shard_dir = root / "shards"
    recs = {"train": write_array_split(shard_dir, "train", x, y, per_shard)}
    sample_shape = (shape[2], shape[0], shape[1]) if payload != "npy" else shape
    meta = build_meta(dataset="synthetic", kind="image" if payload != "npy" else "latent", payload=payload or "png",
                      sample_shape=sample_shape, class_names=["a", "b", "c"], labels={"train": y}, shards=recs)
    write_meta(root / "meta.json", meta)
    return shard_dir, x, y


def test_round_trip_every_sample_back(tmp_path):
    shard_dir, x, y = make_shards(tmp_path, shape=(6, 5, 3))
    meta = read_meta(tmp_path / "meta.json")
    assert [r["count"] for r in meta["shards"]["train"]] == [7] * 7 + [1]
    xb, yb = load_split(shard_dir, "train", as_uint8=True, verify_checksums=True)
    assert torch.equal(xb, torch.from_numpy(x).permute(0, 3, 1, 2)) and torch.equal(yb, torch.from_numpy(y))
    xf, _ = load_split(shard_dir, "train")
    assert xf.dtype == torch.float32 and xf.min() >= -1 and xf.max() <= 1
    torch.testing.assert_close(xf, xb.float() / 127.5 - 1)
    items = list(ShardDataset(shard_dir, "train", with_keys=True))
    assert len(items) == 50 and [it[1] for it in items] == y.tolist()
    torch.testing.assert_close(torch.stack([it[0] for it in items]), xf)


def test_latent_npy_round_trip_and_webdataset_compat(tmp_path):
    shard_dir, x, y = make_shards(tmp_path, n=20, shape=(4, 3, 3), payload="npy")
    xb, yb = load_split(shard_dir, "train")
    assert torch.equal(xb, torch.from_numpy(x)) and torch.equal(yb, torch.from_numpy(y))
    import webdataset as wds

    urls = sorted(str(p) for p in shard_dir.glob("train-*.tar"))
    got = list(wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("npy", "cls"))
    assert len(got) == 20 and np.array_equal(got[3][0], x[3]) and got[3][1] == y[3]


def _collect(shard_dir, rank, world, workers, epoch=0, **kw):
    ds = ShardDataset(shard_dir, "train", rank=rank, world_size=world, shuffle_buffer=8, seed=1, with_keys=True, **kw)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [key for _, _, key in loader], len(ds)


@pytest.mark.parametrize("n", [50, 51])
def test_two_ranks_two_workers_disjoint_equal(tmp_path, n):
    shard_dir, _, _ = make_shards(tmp_path, n=n)
    k0, len0 = _collect(shard_dir, 0, 2, 2)
    k1, len1 = _collect(shard_dir, 1, 2, 2)
    assert len(k0) == len(k1) == len0 == len1 == n // 2
    assert len(set(k0)) == len(k0) and not set(k0) & set(k1)
    # repeat mode keeps every sample and still gives equal counts
    r0, _ = _collect(shard_dir, 0, 2, 2, uneven="repeat")
    r1, _ = _collect(shard_dir, 1, 2, 2, uneven="repeat")
    assert len(r0) == len(r1) == -(-n // 2) and len(set(r0) | set(r1)) == n


def test_epochs_reshuffle_deterministically(tmp_path):
    shard_dir, _, _ = make_shards(tmp_path)
    e0, _ = _collect(shard_dir, 0, 1, 0, epoch=0)
    e0b, _ = _collect(shard_dir, 0, 1, 0, epoch=0)
    e1, _ = _collect(shard_dir, 0, 1, 0, epoch=1)
    assert e0 == e0b and e0 != e1 and sorted(e0) == sorted(e1)


def test_rank_from_env(tmp_path, monkeypatch):
    shard_dir, _, _ = make_shards(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = ShardDataset(shard_dir, "train")
    assert (ds.rank, ds.world_size, len(ds)) == (1, 2, 25)


def _truncate(path: Path, keep: int):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize("keep", [700, 512 * 9])  # inside a member; exactly at a member boundary
def test_truncated_shard_names_the_file(tmp_path, keep):
    shard_dir, _, _ = make_shards(tmp_path)
    bad = shard_dir / "train-000002.tar"
    _truncate(bad, keep)
    with pytest.raises(DataError, match="train-000002.tar.*(corrupt|truncated)"):
        list(ShardDataset(shard_dir, "train"))
    with pytest.raises(DataError, match="train-000002.tar"):
        load_split(shard_dir, "train")


def test_bad_shard_skip_keeps_counts(tmp_path):
    shard_dir, _, _ = make_shards(tmp_path)
    _truncate(shard_dir / "train-000001.tar", 700)
    ds = ShardDataset(shard_dir, "train", on_bad_shard="skip", with_keys=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items = list(ds)
    assert any("train-000001.tar" in str(x.message) for x in w)
    assert len(items) == len(ds) == 50
    assert not any(k.startswith("train_0000") and 7 <= int(k.split("_")[1]) < 14 for _, _, k in items)


def test_checksum_mismatch_detected(tmp_path):
    shard_dir, _, _ = make_shards(tmp_path)
    p = shard_dir / "train-000003.tar"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # end-of-archive padding: still a valid tar, different bytes
    p.write_bytes(bytes(data))
    assert len(load_split(shard_dir, "train")[0]) == 50  # without verification nothing notices
    with pytest.raises(DataError, match="checksum mismatch for shard .*train-000003.tar"):
        load_split(shard_dir, "train", verify_checksums=True)
    with pytest.raises(DataError, match="checksum mismatch"):
        list(ShardDataset(shard_dir, "train", verify_checksums=True))


def test_missing_meta_and_shard(tmp_path):
    with pytest.raises(DataError, match="meta.json"):
        ShardDataset(tmp_path, "train")
    shard_dir, _, _ = make_shards(tmp_path)
    (shard_dir / "train-000000.tar").unlink()
    with pytest.raises(DataError, match="train-000000.tar is missing"):
        load_split(shard_dir, "train")


def test_stratified_split_counts():
    y = np.repeat(np.arange(4), [100, 50, 7, 1])
    tr, te = stratified_split(y, 0.2, seed=3)
    assert np.bincount(y[te], minlength=4).tolist() == [20, 10, 1, 0]
    assert len(set(tr) | set(te)) == len(y) and not set(tr) & set(te)
    tr2, te2 = stratified_split(y, 0.2, seed=3)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert not np.array_equal(np.sort(stratified_split(y, 0.2, seed=4)[1]), np.sort(te))


def test_embedded_sources():
    d = load_source(PrepareOptions(dataset="digits"))
    assert d.x.shape == (1797, 8, 8, 1) and d.x.dtype == np.uint8 and d.x.max() == 255
    d16 = load_source(PrepareOptions(dataset="digits", image_size=16))
    assert d16.x.shape == (1797, 16, 16, 1)
    s = load_source(PrepareOptions(dataset="swissroll", swissroll_samples=1000, swissroll_classes=5,
                                   swissroll_noise=0.5, seed=0))
    assert s.x.shape == (1000, 2) and s.x.dtype == np.float32 and np.abs(s.x).max() <= 1.0
    assert set(s.y.tolist()) == set(range(5))
    m = load_source(PrepareOptions(dataset="mnist5k"))
    assert m.x.shape == (5000, 28, 28, 1) and np.bincount(m.y).tolist() == [500] * 10


def test_cmnist5k_colours_mnist5k_reproducibly_and_keeps_the_digits():
    """cmnist5k: mnist5k's digits and labels, padded to 32x32 RGB; the same bytes on every load; a foreground and
    a background colour per image that vary over the whole cube; and from the colour image alone (its corner is the
    background, its pixel farthest from that the stroke) the digit's mask comes back."""
    c = load_source(PrepareOptions(dataset="cmnist5k"))
    gray = load_source(PrepareOptions(dataset="mnist5k"))
    assert c.x.shape == (5000, 32, 32, 3) and c.x.dtype == np.uint8 and c.name == "cmnist5k"
    assert np.array_equal(c.y, gray.y) and c.class_names == gray.class_names
    assert np.array_equal(c.x, load_source(PrepareOptions(dataset="cmnist5k", seed=7)).x)  # prepare.seed: the split's

    x = c.x.astype(np.float64)
    bg = x[:, 0, 0]  # the padding
    assert (x[:, :2] == bg[:, None, None]).all() and (x[:, :, -2:] == bg[:, None, None]).all()
    dist = np.linalg.norm(x - bg[:, None, None], axis=-1)
    far = dist.reshape(len(x), -1).argmax(1)
    fg = x.reshape(len(x), -1, 3)[np.arange(len(x)), far]
    assert np.linalg.norm(fg - bg, axis=1).min() >= 140  # 150 apart, less the strokes' grey level and rounding
    # colour varies: across images, each channel of both colours covers the range, roughly uniformly
    for colour in (fg, bg):
        assert colour.min(0).max() < 10 and colour.max(0).min() > 245 and np.all(np.abs(colour.mean(0) - 127.5) < 15)
        assert len(np.unique(colour, axis=0)) > 4900
    assert np.corrcoef(fg[:, 0], c.y)[0, 1] ** 2 < 0.01  # colour says nothing of the digit
    # the digit: each pixel's position on the segment bg -> fg, thresholded, is the grey digit's mask
    d = fg - bg
    m = np.einsum("nhwc,nc->nhw", x - bg[:, None, None], d) / np.einsum("nc,nc->n", d, d)[:, None, None]
    digit = np.pad(gray.x[..., 0], ((0, 0), (2, 2), (2, 2))).astype(np.float64) / 255.0
    assert np.abs(m * digit.max((1, 2))[:, None, None] - digit).max() < 0.02
    assert ((m > 0.5) == (digit > 0.5 * digit.max((1, 2))[:, None, None])).mean() > 0.999


def _img(path: Path, size, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)


def test_imagefolder(tmp_path):
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        for i in range(3):
            _img(root / c / f"{i}.png", (5, 4), "RGB")
    d = load_source(PrepareOptions(dataset="imagefolder", data_dir=str(root)))
    assert d.x.shape == (6, 4, 5, 3) and d.class_names == ("cat", "dog") and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    _img(root / "dog" / "9.png", (6, 4), "RGB")
    with pytest.raises(DataError, match=r"dog/9.png is 6x4 RGB"):
        load_source(PrepareOptions(dataset="imagefolder", data_dir=str(root)))
    (root / "dog" / "9.png").unlink()
    _img(root / "dog" / "8.png", (5, 4), "L")
    with pytest.raises(DataError, match=r"dog/8.png is 5x4 L"):
        load_source(PrepareOptions(dataset="imagefolder", data_dir=str(root)))
    with pytest.raises(DataError, match="does not exist"):
        load_source(PrepareOptions(dataset="imagefolder", data_dir=str(tmp_path / "none")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_source(PrepareOptions(dataset="imagefolder", data_dir=str(tmp_path / "empty")))


def test_torchvision_offline_names_folder(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Dataset not found") if not download else OSError("no network")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    with pytest.raises(DataError, match=rf"place .*idx.* in {tmp_path.resolve()}/MNIST/raw"):
        load_torchvision("mnist", tmp_path)


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_replace_dir_swaps_in_one_step_and_recovers_a_fallback_swap_cut_in_two(tmp_path, monkeypatch):
    """replace_dir: with RENAME_EXCHANGE the old folder never leaves its name (no rename moves it aside); where the
    file system cannot exchange, a swap killed between its two renames (old folder at .<name>.old, no <name>) is
    undone by the next call before it swaps, and nothing is left behind either way."""
    import os

    import diffusion_core.data.shards as shards

    def folder(name: str, content: bytes) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.bin").write_bytes(content)
        return tmp_path / name

    dst = folder("out", b"old")
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((Path(a).name, Path(b).name)), real_replace(a, b)))
    shards.replace_dir(folder(".new1", b"new"), dst)
    assert _tree(tmp_path) == {"out/f.bin": b"new"} and renames == []  # one exchange, no rename at all

    monkeypatch.setattr(shards, "exchange_paths", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    real_replace(dst, tmp_path / ".out.old")  # as a kill after the first of the fallback's two renames leaves it
    assert not dst.exists()

    def failing_swap(a, b):  # the next run fails at its own swap: the previous folder must be back in place
        renames.append((Path(a).name, Path(b).name))
        if Path(a).name == ".new2":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing_swap)
    with pytest.raises(OutputError, match="No space left"):
        shards.replace_dir(folder(".new2", b"newer"), dst)
    assert _tree(tmp_path) == {"out/f.bin": b"new", ".new2/f.bin": b"newer"}  # .new2 is the caller's to remove
    assert renames == [(".out.old", "out"), ("out", ".out.old"), (".new2", "out"), (".out.old", "out")]

    monkeypatch.setattr(os, "replace", real_replace)
    shards.replace_dir(tmp_path / ".new2", dst)
    assert _tree(tmp_path) == {"out/f.bin": b"newer"}
