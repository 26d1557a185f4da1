"""Colour end to end: configs/tiny_rgb.yaml (cmnist5k, RGB) under `dvc repro` in a scratch checkout, in latent
space (train_diffusion and train_classifier on the autoencoder's latents, so every network of the pipeline runs on
colour data). Then pixel space on the same checkout: `dvc repro --dry --force-downstream` must name exactly the
stages the space feeds, and those that train or evaluate (all but the sweep, whose trials run the same code in
either space) run again by their command lines on the repro's data. After each: every network takes colour, the
grids in reports/ are colour, `diffusion sample` writes 3-channel samples, evaluate's metrics (fid_inception among
them) are finite; MLflow holds the latent repro's colour models. Slow (minutes): marked `slow`, still run in CI."""

import json
import math
import re
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffusion_core.checkpoint import load_model_dir
from pipeline.cli import main as diffusion_cli

from . import zygote
from .e2e import dvc, scratch_checkout
from .stages import ROOT, stage_env

pytestmark = pytest.mark.slow

TINY_RGB = ROOT / "configs" / "tiny_rgb.yaml"
SPACES = ("latent", "pixel")
SPACE_KEYS = ("train_diffusion", "train_classifier")  # the sections whose `space` says pixel or latent
SPACE_FED = ["train_classifier", "train_diffusion", "distill", "sweep", "evaluate"]  # what a change of space reruns
PIXEL_RUNS = [stage for stage in SPACE_FED if stage != "sweep"]
UNTRACKED = ["encode_latents", "reference_stats"]  # the repro's first part, with their inputs: tracking off
NETWORKS = ("autoencoder", "diffusion", "classifier", "feature_net")


def _set(params: Path, space: str, tracking: bool, **evaluate) -> None:
    raw = yaml.safe_load(params.read_text())
    for section in SPACE_KEYS:
        raw[section]["space"] = space
    raw["tracking"]["enabled"] = tracking
    raw["evaluate"].update(evaluate)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def _snapshot(work: Path, snap: Path, space: str) -> Path:
    """A copy of `work`'s models/, reports/, metrics/ and params.yaml (and MLflow's store and MLmodel files where
    it logged), plus what `diffusion sample` draws from its diffusion model and its distilled student."""
    for name in ("models", "reports", "metrics"):
        shutil.copytree(work / name, snap / name)
    shutil.copy(work / "params.yaml", snap / "params.yaml")
    if space == "latent":
        shutil.copy(work / "mlflow.db", snap / "mlflow.db")
        (snap / "mlmodels").mkdir()
        for i, path in enumerate(work.glob("mlartifacts/models/*/artifacts/MLmodel")):
            shutil.copy(path, snap / "mlmodels" / f"{i}.yaml")
    else:  # the sweep's grids are the latent repro's: the pixel run does not rerun the sweep
        shutil.rmtree(snap / "reports" / "sweep")
    # a latent model decodes through the autoencoder its config.json names, found beside it in the copy
    argv = ["sample", "--model", str(snap / "models" / "diffusion"), "--num", "4", "--steps", "2",
            "--guidance", "cfg", "--scale", "1.5", "--no-progress", "--out", str(snap / "samples")]
    assert diffusion_cli(argv) == 0
    student = ["sample", "--model", str(snap / "models" / "student"), "--num", "4", "--steps", "1",
               "--guidance", "cfg", "--scale", "2", "--no-progress", "--out", str(snap / "student_samples")]
    assert diffusion_cli(student) == 0  # distill's students, one call per step, decoded like their teacher
    return snap


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """{space: (its snapshot, the stages dvc ran or would run)}: latent, the repro and its output; pixel, the runs
    of PIXEL_RUNS on the repro's checkout and what `dvc repro --dry --force-downstream` printed for the switch.
    MLflow logs the stages the space feeds (tiny's e2e checks what every stage logs; the latent models are the
    colour-specific ones here: their MLflow models decode through the 3-channel autoencoder). `tracking` is no
    DVC param: the repro in two parts runs each stage once."""
    work = scratch_checkout(tmp_path_factory.mktemp("rgb"), TINY_RGB)
    _set(work / "params.yaml", "latent", tracking=False)
    log = dvc(work, "repro", *UNTRACKED)  # and what they need; MLflow for the rest only
    _set(work / "params.yaml", "latent", tracking=True)
    log += dvc(work, "repro")
    out = {"latent": (_snapshot(work, tmp_path_factory.mktemp("latent"), "latent"), log)}
    _set(work / "params.yaml", "pixel", tracking=False)
    dry = dvc(work, "repro", "--dry", "--force-downstream")  # what the changed stages' outputs feed, too
    _set(work / "params.yaml", "pixel", tracking=False, setting="params")  # the sweep's table is latent's
    for stage in PIXEL_RUNS:
        res = zygote.run([sys.executable, "-m", f"pipeline.{stage}", "--params", "params.yaml"], cwd=work,
                         env=stage_env(), timeout=900)
        assert res.returncode == 0, f"{stage} in pixel space: {res.stderr[-3000:]}"
    out["pixel"] = (_snapshot(work, tmp_path_factory.mktemp("pixel"), "pixel"), dry)
    return out


def _colour(path: Path) -> None:
    """`path` is an RGB image whose channels differ (a grey image saved as RGB would have them equal)."""
    with Image.open(path) as im:
        assert im.mode == "RGB", f"{path.name} is {im.mode}"
        a = np.asarray(im).astype(int)
    spread = a.max(-1) - a.min(-1)  # per pixel: 0 for grey
    assert (spread > 32).mean() > 0.05, f"{path.name}: channels nearly equal"


@pytest.mark.parametrize("space", SPACES)
def test_every_network_is_built_for_colour(runs, space):
    """The autoencoder maps 3 channels to 3; the U-Net and the noisy classifier take 3 channels in pixel space and
    the autoencoder's latent channels in latent space, of cmnist5k's images; the feature net (clean images, pixel
    space always) takes 3. Loading checks the weights fit those configs."""
    snap, _ = runs[space]
    params = yaml.safe_load((snap / "params.yaml").read_text())
    side, latent_c = params["prepare"]["image_size"], params["train_autoencoder"]["autoencoder"]["latent_channels"]
    cfg = {name: load_model_dir(snap / "models" / name)[1] for name in NETWORKS}
    assert cfg["autoencoder"]["model"]["in_channels"] == 3 and cfg["autoencoder"]["model"]["image_size"] == side
    assert cfg["feature_net"]["model"]["in_channels"] == 3 and cfg["feature_net"]["data"]["shape"] == [3, side, side]
    net_shape = [3, side, side] if space == "pixel" else [latent_c, side // 4, side // 4]
    for name in ("diffusion", "classifier"):
        model, data = cfg[name]["model"], cfg[name]["data"]
        assert [model["in_channels"], model["image_size"], model["image_size"]] == net_shape, name
        assert data["space"] == space and data["shape"] == net_shape and data["dataset"] == "cmnist5k", name
    assert cfg["diffusion"]["model"]["out_channels"] == net_shape[0]


@pytest.mark.parametrize("space", SPACES)
def test_image_grids_and_samples_are_colour(runs, space):
    """Every image grid in reports/ (the data preview, the autoencoder's reconstructions, evaluate's samples, the
    sweep's grids in latent space) is RGB with distinct channels, and so are `diffusion sample`'s images in
    samples.npz; the distilled student samples colour images of the same size in one network call."""
    snap, _ = runs[space]
    grids = [*(snap / "reports").glob("*.png"), *(snap / "reports" / "sweep").glob("grid_*.png")]
    names = {p.name for p in grids}
    assert {"prepare_samples.png", "autoencoder_recon.png", "samples.png"} <= names
    assert (len(names) > 3) == (space == "latent")  # the sweep's grids: the repro's sweep ran in latent space
    for path in grids:
        _colour(path)
    with np.load(snap / "samples" / "samples.npz") as z:
        images = z["images"]
    side = yaml.safe_load((snap / "params.yaml").read_text())["prepare"]["image_size"]
    assert images.shape == (4, side, side, 3) and images.dtype == np.uint8
    assert (images.max(-1).astype(int) - images.min(-1) > 32).mean() > 0.05
    _colour(snap / "samples" / "grid.png")
    with np.load(snap / "student_samples" / "samples.npz") as z:
        assert z["images"].shape == (4, side, side, 3) and float(z["nfe"]) == 1.0


@pytest.mark.parametrize("space", SPACES)
def test_evaluate_metrics_are_finite(runs, space):
    """Every figure evaluate wrote is a finite number: the domain ones, FID on the colour samples, and bits/dim where
    the model is a pixel model."""
    snap, _ = runs[space]
    m = json.loads((snap / "reports" / "metrics.json").read_text())
    numbers = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"fd_domain", "kd_domain", "fid_inception", "kid_inception", "class_accuracy", "num_samples"} <= set(numbers)
    assert ("nll_bpd" in numbers) == (space == "pixel")  # bits/dim of the pixels: pixel models only
    assert all(math.isfinite(v) for v in numbers.values()), numbers


def test_the_repro_ran_every_stage_and_a_switch_of_space_reruns_what_it_feeds(runs):
    (_, latent), (_, dry) = runs["latent"], runs["pixel"]
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(re.findall(r"Running stage '(\w+)'", latent)) == sorted(stages)
    assert sorted(re.findall(r"Running stage '(\w+)'", dry)) == sorted(SPACE_FED)


def test_mlflow_holds_the_latent_repros_runs_and_colour_models(runs):
    """One finished MLflow run per stage the space feeds; the latent diffusion model MLflow holds returns RGB
    images of the data's size (decoded by the autoencoder), and the latent classifier takes the latents."""
    snap, _ = runs["latent"]
    with sqlite3.connect(snap / "mlflow.db") as db:
        all_runs = db.execute("SELECT run_uuid, name, status FROM runs").fetchall()
        nested = {uid for (uid,) in db.execute("SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId'")}
    assert sorted(name for uid, name, _ in all_runs if uid not in nested) == sorted(SPACE_FED)
    assert {status for *_, status in all_runs} == {"FINISHED"}
    params = yaml.safe_load((snap / "params.yaml").read_text())
    side, latent_c = params["prepare"]["image_size"], params["train_autoencoder"]["autoencoder"]["latent_channels"]
    signatures = {}
    for path in (snap / "mlmodels").iterdir():
        mlmodel = yaml.safe_load(path.read_text())
        name = Path(mlmodel["flavors"]["python_function"]["artifacts"]["model"]["uri"]).name
        signatures[name] = {k: json.loads(mlmodel["signature"][k]) for k in ("inputs", "outputs")}
    assert sorted(signatures) == ["classifier", "diffusion", "student"]
    for name in ("diffusion", "student"):  # distill's students decode through the same autoencoder
        assert signatures[name]["outputs"][0]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, side, side, 3]}
    assert signatures["classifier"]["inputs"][0]["tensor-spec"]["shape"] == [-1, latent_c, side // 4, side // 4]
