"""Model folders describe themselves (provenance.json + README.md, written inside the atomic save), every trained
network is an MLflow model, the diffusion model is in the registry with the run that produced it, and evaluate's run
links to the training runs. One chain of tiny in-process stage runs (no Ray) with tracking on serves the slow tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion_core.checkpoint import load_model_dir, save_model_dir, verify_checkpoint_dir
from diffusion_core.models import FeatureNet

from .stages import ROOT, TINY

MODELS = {"train_autoencoder": "models/autoencoder", "train_feature_net": "models/feature_net",
          "train_classifier": "models/classifier", "train_diffusion": "models/diffusion", "distill": "models/student"}
REGISTERED = "diffusion-tiny-diffusion"  # tiny.yaml's project.experiment + "-diffusion"
STUDENT = "diffusion-tiny-student"  # distill's


# ----------------------------------------------------------------------------------------------- save_model_dir


def test_extra_files_are_written_inside_the_atomic_save_and_ignored_by_the_loader(tmp_path):
    net = FeatureNet(1, 8, 10, width=8, feature_dim=16)
    save_model_dir(tmp_path / "m", net, {"data": {}}, extra_files={"README.md": "# card\n", "blob.bin": b"\x00\x01"})
    assert (tmp_path / "m" / "README.md").read_text() == "# card\n"
    assert (tmp_path / "m" / "blob.bin").read_bytes() == b"\x00\x01"
    config = verify_checkpoint_dir(tmp_path / "m")
    assert set(config["checksums"]) == {"model.safetensors"}  # a card's timing must not change config.json
    model, _ = load_model_dir(tmp_path / "m")
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), net.eval()(x))

    good = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    class Exploding(str):
        def encode(self, *a, **k):  # the card's write dies after the weights were written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_model_dir(tmp_path / "m", FeatureNet(1, 8, 10, width=8, feature_dim=16), {"data": {}},
                       extra_files={"README.md": Exploding("# new card\n")})
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == good  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folder left
    for bad in ("config.json", "model.safetensors", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="reserved or not a plain file name"):
            save_model_dir(tmp_path / "n", net, extra_files={bad: "x"})
    assert not (tmp_path / "n").exists()


# ----------------------------------------------------------------------------------------------- stage runs


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> Path:
    """prepared data -> train_autoencoder, train_feature_net, train_classifier, train_diffusion, distill (in-process,
    one worker, few steps), reference_stats, evaluate (setting: params), all tracked in one local MLflow store."""
    from pipeline import (
        distill,
        evaluate,
        reference_stats,
        train_autoencoder,
        train_classifier,
        train_diffusion,
        train_feature_net,
    )

    cwd = tmp_path_factory.mktemp("provenance")
    shutil.copytree(prepared / "data", cwd / "data")
    raw = yaml.safe_load(TINY.read_text())
    raw["train_autoencoder"].update(steps=20, log_every=20)
    raw["train_feature_net"].update(steps=20)
    for stage in ("train_classifier", "train_diffusion", "distill"):
        raw[stage].update(steps=10)
        raw[stage]["scaling"].update(num_workers=1, use_ray=False)
    raw["train_diffusion"].update(checkpoint_every=10, sample_every=0)
    raw["evaluate"].update(setting="params", num_workers=1, num_samples=10, batch_size=10, steps=5, nll_samples=0,
                           grid_samples=10)
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    old_cwd, old_threads, old_omp = Path.cwd(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    os.chdir(cwd)
    try:
        for module in (train_autoencoder, train_feature_net, train_classifier, train_diffusion, distill,
                       reference_stats, evaluate):
            assert module.main(["--params", "params.yaml"]) == 0, module.STAGE
    finally:
        os.chdir(old_cwd)
        torch.set_num_threads(old_threads)
        if old_omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old_omp
    return cwd


def _runs(cwd: Path) -> dict[str, str]:
    """{stage: run id} of the FINISHED runs (one per stage here)."""
    with sqlite3.connect(cwd / "mlflow.db") as db:
        rows = db.execute("SELECT name, run_uuid FROM runs WHERE status = 'FINISHED'").fetchall()
    assert len(rows) == len({name for name, _ in rows})
    return dict(rows)


def _tags(cwd: Path, run_id: str) -> dict[str, str]:
    with sqlite3.connect(cwd / "mlflow.db") as db:
        return dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall())


def _head() -> tuple[str, bool]:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True,
                           check=True)
    return head.stdout.strip(), bool(dirty.stdout.strip())


@pytest.fixture
def store(trained, monkeypatch):
    """MLflow pointed at the chain's local store for one test (no progress bars); reset afterwards."""
    import mlflow

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(f"sqlite:///{trained / 'mlflow.db'}")
    yield mlflow
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(MODELS))
def test_model_folder_holds_its_card_and_provenance(trained, stage):
    folder = trained / MODELS[stage]
    assert {"README.md", "provenance.json", "config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    verify_checkpoint_dir(folder)
    load_model_dir(folder)  # the loader still reads the folder
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["stage"] == stage and prov["model_dir"] == MODELS[stage]

    head, dirty = _head()
    assert prov["git_commit"] == head + ("-dirty" if dirty else "")

    params = yaml.safe_load((trained / "params.yaml").read_text())
    assert prov["params"][stage] == params[stage] and prov["params"]["project"] == params["project"]
    assert "tracking" not in prov["params"]

    # the checksums are those of the shard files the stage read, hashed here independently
    shard_dir = trained / "data" / "shards"
    splits = ("train",) if stage in ("train_diffusion", "distill") else ("train", "test")
    files = sorted(p for split in splits for p in shard_dir.glob(f"{split}-*.tar"))
    assert files and prov["data"]["shards"] == {
        p.relative_to(trained).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert prov["data"]["meta_sha256"] == hashlib.sha256((trained / prov["data"]["meta"]).read_bytes()).hexdigest()

    metrics = json.loads((trained / "metrics" / f"{stage}.json").read_text())
    timings = {"wall_seconds", "train_seconds", "samples_per_second"}  # top-level: the keys two equal runs differ in
    assert prov["metrics"] == {k: v for k, v in metrics.items() if k not in timings}
    assert all(prov[k] == metrics[k] for k in timings & set(metrics) if k != "wall_seconds")
    assert prov["wall_seconds"] == pytest.approx(metrics.get("wall_seconds", metrics.get("train_seconds")), abs=0.01)
    run_id = _runs(trained)[stage]
    assert prov["mlflow"]["run_id"] == run_id and prov["mlflow"]["model_uri"] == f"runs:/{run_id}/model"

    card = (folder / "README.md").read_text()
    assert card.startswith("# ") and f"python -m pipeline.{stage}" in card and run_id in card and head in card
    rows = [line for line in card.splitlines() if line.startswith("| ") and line != "| metric | value |"]
    assert len(rows) == len(prov["metrics"]) > 0  # the stage's own figures, none invented
    for key, value in prov["metrics"].items():
        if isinstance(value, float):
            assert f"| {key} | {value:.4g} |" in card
    assert "| nll" not in card and "bits" not in card
    for text in (card, (folder / "provenance.json").read_text()):  # no path of this machine
        assert str(trained) not in text and str(ROOT) not in text and "/tmp/" not in text and "/home/" not in text
    if stage in ("train_diffusion", "distill"):  # the card's Python lines run as written, from the repo folder
        code = textwrap.dedent(card.split("In Python", 1)[1].split("\n\n")[1])
        namespace: dict = {}
        with contextlib.chdir(trained):
            exec(code, namespace)  # noqa: S102 - our own card
        assert namespace["images"].dtype == np.uint8 and namespace["images"].shape == (16, 8, 8, 1)


@pytest.mark.slow
def test_diffusion_model_loads_from_registry_and_run_and_samples_like_the_folder(trained, store):
    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.model_folders import load_diffusion_dir

    run_id = _runs(trained)["train_diffusion"]
    version = store.MlflowClient().get_model_version(REGISTERED, "1")
    assert version.run_id == run_id  # registered with the run that produced it
    assert _tags(trained, run_id)["registered_model"] == REGISTERED
    request = {"num_samples": 3, "seed": 7, "steps": 5, "guidance": "cfg", "scale": 2.0, "class_label": 4}
    direct = generate(load_diffusion_dir(trained / "models" / "diffusion"), 3,
                      SamplingSpec("ddim", 5, guidance="cfg", scale=2.0), seed=7, classes=[4])["images"]
    for uri in (f"models:/{REGISTERED}/1", f"runs:/{run_id}/model"):
        images = store.pyfunc.load_model(uri).predict(request)
        assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)
        assert np.array_equal(images, direct)  # same seed, same images as the folder sampled directly
    other = store.pyfunc.load_model(f"runs:/{run_id}/model").predict({**request, "seed": 8})
    assert not np.array_equal(other, direct)


@pytest.mark.slow
def test_student_loads_from_registry_and_samples_like_the_folder(trained, store):
    """distill registers its student family; the MLflow model samples it like the folder, one call per step."""
    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.model_folders import load_diffusion_dir

    run_id = _runs(trained)["distill"]
    assert store.MlflowClient().get_model_version(STUDENT, "1").run_id == run_id
    prov = json.loads((trained / "models/student/provenance.json").read_text())
    assert prov["inputs"]["models/diffusion"]["mlflow_run_id"] == _runs(trained)["train_diffusion"]
    request = {"num_samples": 3, "seed": 7, "steps": 1, "guidance": "cfg", "scale": 2.0, "class_label": 4}
    direct = generate(load_diffusion_dir(trained / "models" / "student"), 3,
                      SamplingSpec("ddim", 1, guidance="cfg", scale=2.0), seed=7, classes=[4])
    assert direct["nfe"] == 1
    images = store.pyfunc.load_model(f"models:/{STUDENT}/1").predict(request)
    assert np.array_equal(images, direct["images"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train_autoencoder", "train_classifier", "train_feature_net"])
def test_other_networks_load_from_their_runs_and_compute_as_the_folder(trained, stage, store):
    loaded = store.pyfunc.load_model(f"runs:/{_runs(trained)[stage]}/model")
    net, _ = load_model_dir(trained / MODELS[stage])
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        if stage == "train_classifier":
            t = torch.tensor([0, 10, 50, 99])
            got, want = loaded.predict({"x_t": x.numpy(), "t": t.numpy()}), net(x, t)
        elif stage == "train_autoencoder":
            got, want = loaded.predict(x.numpy()), net.decode(net.encode(x).mode()).clamp(-1, 1)
        else:
            got, want = loaded.predict(x.numpy()), net(x)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert type(loaded.unwrap_python_model().network) is type(net)


@pytest.mark.slow
def test_evaluate_run_links_to_the_training_runs(trained):
    runs = _runs(trained)
    tags = _tags(trained, runs["evaluate"])
    assert tags["training_run_id"] == runs["train_diffusion"]
    assert tags["classifier_run_id"] == runs["train_classifier"]
    assert tags["feature_net_run_id"] == runs["train_feature_net"]


@pytest.mark.slow
def test_evaluate_puts_its_figures_on_the_registered_version(trained):
    """The Models page shows how the registered version samples: evaluate's metrics as `evaluate.<metric>` tags,
    equal to reports/metrics.json, and the evaluate run's id."""
    import mlflow

    metrics = json.loads((trained / "reports" / "metrics.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained / 'mlflow.db'}")
    tags = client.get_model_version(REGISTERED, "1").tags
    assert tags["evaluate_run_id"] == _runs(trained)["evaluate"]
    for key in ("fd_domain", "kd_domain", "class_accuracy"):
        assert float(tags[f"evaluate.{key}"]) == pytest.approx(metrics[key], rel=1e-5)
