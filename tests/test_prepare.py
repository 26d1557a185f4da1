"""Stage `prepare` end to end on tiny params, in a temp working directory; one-line errors; atomic output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffusion_core.data import DataError, ShardDataset, load_split, prepare_dataset, read_meta
from diffusion_core.options import PrepareOptions
from pipeline import prepare

from . import zygote
from .stages import ROOT, TINY, stage_env


def run_stage(cwd: Path, *args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = stage_env(**(env_extra or {}))
    return zygote.run([sys.executable, "-m", "pipeline.prepare", *args], cwd=cwd, env=env, timeout=900)


@pytest.mark.slow
def test_prepare_tiny_end_to_end(tmp_path):
    res = run_stage(tmp_path, "--params", str(TINY))
    assert res.returncode == 0, res.stderr
    meta = read_meta(tmp_path / "data" / "meta.json")
    metrics = json.loads((tmp_path / "metrics" / "prepare.json").read_text())
    assert meta["dataset"] == "digits" and meta["sample_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    assert metrics["train_count"] == meta["counts"]["train"] == sum(meta["class_counts"]["train"])
    assert metrics["train_count"] + metrics["test_count"] == 1797
    assert (tmp_path / "reports" / "prepare_samples.png").stat().st_size > 0
    x, y = load_split(tmp_path / "data" / "shards", "test", verify_checksums=True)
    assert x.shape == (metrics["test_count"], 1, 8, 8) and y.bincount().tolist() == meta["class_counts"]["test"]
    assert len(ShardDataset(tmp_path / "data" / "shards", "train", rank=1, world_size=2)) == metrics["train_count"] // 2
    assert (tmp_path / "mlflow.db").exists() and not list((tmp_path / "data").glob(".prepare-*"))
    assert not (ROOT / "data" / ".prepare-tmp").exists()


def _swissroll(n: int, **kw) -> PrepareOptions:
    """The library's 2-D points (the pipeline's PrepareConfig refuses them), as the library's typed options."""
    return PrepareOptions(**{"dataset": "swissroll", "swissroll_samples": n, "swissroll_classes": 4,
                             "swissroll_noise": 0.5, **kw})


def test_prepare_in_process_is_deterministic_and_swaps_atomically(tmp_path, monkeypatch):
    cfg = _swissroll(300, samples_per_shard=100)
    meta1, _, _ = prepare_dataset(cfg, tmp_path / "data")
    meta2, _, _ = prepare_dataset(cfg, tmp_path / "data")
    assert meta1 == meta2  # same params, same shard bytes (sha256): DVC sees no change
    assert meta1["kind"] == "points" and meta1["sample_shape"] == [2]

    # a failure in the middle of writing leaves the previous shards and meta.json untouched
    import diffusion_core.data.prepare as prep

    calls = {"n": 0}
    real = prep.write_array_split

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if killed while writing the test split
        return real(*a, **k)

    monkeypatch.setattr(prep, "write_array_split", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(_swissroll(500), tmp_path / "data")
    assert read_meta(tmp_path / "data" / "meta.json") == meta1
    assert len(load_split(tmp_path / "data" / "shards", "train", verify_checksums=True)[0]) == meta1["counts"]["train"]
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []


def _params(tmp_path, **prepare_overrides) -> Path:
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["enabled"] = False
    raw["prepare"].update(prepare_overrides)
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"datset": "digits"}, "unknown key 'prepare.datset' (did you mean 'dataset'?"),
        ({"test_fraction": 1.5}, "prepare.test_fraction must be a number in (0, 1), got 1.5"),
        ({"dataset": "imagefolder", "data_dir": "missing_folder"}, "missing_folder does not exist"),
        ({"dataset": "cifar"}, "prepare.dataset must be one of"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, overrides, needle):
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["--params", str(_params(tmp_path, **overrides))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "data").exists() or not (tmp_path / "data" / "meta.json").exists()


def test_missing_params_and_debug_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["--params", "nope.yaml"]) == 2
    assert "params file not found: nope.yaml" in capsys.readouterr().err
    assert prepare.main(["--params", "nope.yaml", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unwritable_output(tmp_path, monkeypatch, capsys):
    if os.geteuid() == 0:
        # root ignores permissions; a file where the folder should be works for everyone
        (tmp_path / "data").write_text("not a folder")
    else:
        (tmp_path / "data").mkdir(mode=0o500)
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["--params", str(_params(tmp_path))]) == 2
    assert "data" in capsys.readouterr().err


def test_help():
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0


def test_the_pipeline_refuses_the_swiss_roll_before_any_work(tmp_path, monkeypatch, capsys):
    """2-D points would pass prepare and fail a stage later; the stage says so up front, writing nothing."""
    raw = yaml.safe_load(TINY.read_text())
    raw["prepare"]["dataset"] = "swissroll"
    raw["tracking"]["enabled"] = False
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["--params", "p.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prepare.dataset 'swissroll' is 2-D points" in err
    assert "choose an image dataset" in err and "README 'The Swiss roll'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_BATCHES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


def _cifar10_folder(root: Path, per_batch: int = 20) -> dict[bytes, int]:
    """A small CIFAR-10 in the layout of the official python archive, which torchvision reads:
    `root/cifar-10-batches-py/` with `data_batch_1..5` and `test_batch`, each a pickled dict whose `data` is uint8
    [n, 3072] (a row: the red plane, then green, then blue, each 32x32 row-major) and `labels` a list of ints, and
    `batches.meta` with `label_names`. Returns {HWC image bytes: label} of every image written."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(10)
    images = {}
    for name in CIFAR10_BATCHES:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.permutation(np.arange(per_batch) % 10).tolist()
        batch = {"batch_label": f"{name} of 1", "labels": labels, "data": rows,
                 "filenames": [f"img_{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        for row, label in zip(rows, labels):
            images[row.reshape(3, 32, 32).transpose(1, 2, 0).tobytes()] = label
    meta = {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return images


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _trust_these_files(monkeypatch, folder: Path, archive: Path | None = None) -> None:
    """torchvision checks every file against the md5 of the official release, which no synthetic file can match:
    put these files' own md5s in its CIFAR10 table, so the same integrity check runs and passes on them."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "train_list", [[n, _md5(folder / n)] for n in CIFAR10_BATCHES[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    if archive is not None:
        monkeypatch.setattr(CIFAR10, "tgz_md5", _md5(archive))


def _no_network(monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise OSError("the test is offline")

    monkeypatch.setattr(tvu, "_urlretrieve", offline)


@pytest.mark.parametrize("as_downloaded", ["extracted", "archive"])
def test_cifar10_in_torchvisions_layout_goes_through_prepare(tmp_path, monkeypatch, as_downloaded):
    """The prepare stage on a CIFAR-10 laid out as the official download: its extracted `cifar-10-batches-py/`, or
    only `cifar-10-python.tar.gz` (extracted in place, no network) in prepare.data_dir. The shards hold every image
    as 32x32x3 with its own label (images of random bytes: a wrong plane order or a label shifted by one image
    would not match), the class names are CIFAR-10's, and the split is prepare's stratified one over both
    official splits."""
    import tarfile

    raw = tmp_path / "raw"
    images = _cifar10_folder(raw)
    archive = None
    if as_downloaded == "archive":
        archive = raw / "cifar-10-python.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(raw / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    _trust_these_files(monkeypatch, raw / "cifar-10-batches-py", archive)
    if archive is not None:
        import shutil

        shutil.rmtree(raw / "cifar-10-batches-py")
    _no_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["--params", str(_params(tmp_path, dataset="cifar10", data_dir="raw",
                                                  samples_per_shard=32))]) == 0
    meta = read_meta(tmp_path / "data" / "meta.json")
    assert meta["dataset"] == "cifar10" and meta["sample_shape"] == [3, 32, 32]
    assert meta["class_names"] == CIFAR10_CLASSES
    # 12 images a class over the six batches: round(12 * 0.2) = 2 of each to test
    assert meta["counts"] == {"train": 100, "test": 20} and meta["class_counts"]["test"] == [2] * 10
    seen = {}
    for split in ("train", "test"):
        x, y = load_split(tmp_path / "data" / "shards", split, as_uint8=True, verify_checksums=True)
        assert x.shape == (meta["counts"][split], 3, 32, 32)
        for img, label in zip(x.permute(0, 2, 3, 1).numpy(), y.tolist()):
            seen[img.tobytes()] = label
    assert seen == images


def test_cifar10_files_that_fail_torchvisions_md5_check_are_refused_naming_the_folder(tmp_path, monkeypatch):
    """Unpatched, torchvision's check refuses the synthetic files (they are not the official release): offline, the
    loader says where the files go and that they must match, and no download is tried more than once."""
    from diffusion_core.data.sources import load_torchvision

    _cifar10_folder(tmp_path)
    _no_network(monkeypatch)
    with pytest.raises(DataError, match=rf"cifar10: files not found or failing torchvision's md5 check in "
                                        rf"{tmp_path.resolve()} and download failed"):
        load_torchvision("cifar10", tmp_path)
