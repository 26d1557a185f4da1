"""Stage `prepare` end to end on tiny params, in a temp working directory; one-line errors; atomic output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffusion_core.data import ShardDataset, load_split, prepare_dataset, read_meta
from diffusion_core.options import PrepareOptions
from pipeline import prepare

from . import zygote
from .stages import stage_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def run_stage(cwd: Path, *args: str, env_extra=None) -> subprocess.CompletedProcess:
    env = stage_env(**(env_extra or {}))
    return zygote.run([sys.executable, "-m", "pipeline.prepare", *args], cwd=cwd, env=env, timeout=300)


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
