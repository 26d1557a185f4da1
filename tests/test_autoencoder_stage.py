"""Stages `train_autoencoder` and `encode_latents`: their outputs in the e2e pipeline's tiny run, a latent
diffusion model trained on those latents, and the library pieces of `diffusion_core.autoencoding` against closed
forms."""

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.autoencoding import (
    autoencoder_loss,
    batch_indices,
    encode_means,
    evaluate_autoencoder,
    latent_scale_factor,
    psnr_db,
    reconstruction_loss,
)
from diffusion_core.checkpoint import load_model_dir
from diffusion_core.data import load_split, read_meta
from diffusion_core.models import AutoencoderKL
from pipeline.config import ConfigError, validate_params

from . import zygote
from .e2e import shared_repro
from .stages import ROOT, TINY, params_raw, stage_env

STAGES = ("prepare", "train_autoencoder", "encode_latents")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The e2e pipeline's checkout (configs/tiny.yaml under `dvc repro`, local MLflow store; tests/e2e.py
    `shared_repro`): prepare -> train_autoencoder -> encode_latents ran there as in any repro. Read only."""
    return shared_repro(tmp_path_factory, TINY)[0]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1,1] image tensors on the [0,1] scale, computed directly."""
    mse = (((a - b) / 2.0) ** 2).mean().item()
    return 10.0 * math.log10(1.0 / mse)


@pytest.mark.slow
def test_autoencoder_outputs_and_mlflow_runs(tiny_run):
    m = json.loads((tiny_run / "metrics" / "train_autoencoder.json").read_text())
    for key in ("test_mse", "test_psnr", "kl", "latent_shape", "compression_factor", "train_seconds"):
        assert key in m, key
    assert m["latent_shape"] == [2, 2, 2]  # tiny: 8x8 digits, 4x downsampling, 2 latent channels
    assert m["compression_factor"] == pytest.approx(64 / 8)
    assert m["test_psnr"] == pytest.approx(psnr_db(m["test_mse"]))
    folder = tiny_run / "models" / "autoencoder"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md", "provenance.json"}
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model"]["kind"] == "autoencoder_kl" and cfg["data"]["dataset"] == "digits"
    assert cfg["train"]["steps"] == 100 and cfg["data"]["image_shape"] == [1, 8, 8]
    # recon grid: originals row above reconstructions row, 10 images of 8x8 enlarged 7x with 1 px padding
    with Image.open(tiny_run / "reports" / "autoencoder_recon.png") as im:
        assert im.size == (10 * 57 + 1, 2 * 57 + 1)
    # one MLflow run per stage, named after it, finished
    with sqlite3.connect(tiny_run / "mlflow.db") as db:
        runs = db.execute("SELECT name, status FROM runs").fetchall()
    assert sorted(r for r in runs if r[0] in STAGES) == sorted((s, "FINISHED") for s in STAGES)
    assert not list((tiny_run / "data").glob(".encode_latents-*")) and not list((tiny_run / "data").glob(".latents*"))


@pytest.mark.slow
def test_psnr_beats_mean_image_baseline_and_model_rebuilds(tiny_run):
    shards = tiny_run / "data" / "shards"
    x_train, _ = load_split(shards, "train")
    x_test, _ = load_split(shards, "test")
    baseline = _psnr(x_train.mean(dim=0, keepdim=True).expand_as(x_test), x_test)  # identity-by-mean predictor
    metrics = json.loads((tiny_run / "metrics" / "train_autoencoder.json").read_text())
    assert metrics["test_psnr"] > baseline + 1.0, (metrics["test_psnr"], baseline)

    model, _ = load_model_dir(tiny_run / "models" / "autoencoder")
    assert isinstance(model, AutoencoderKL) and not model.training
    with torch.no_grad():
        rec = model.decode(model.encode(x_test).mode()).clamp(-1, 1)
    assert _psnr(rec, x_test) == pytest.approx(metrics["test_psnr"], abs=0.01)  # the saved weights are the scored ones


@pytest.mark.slow
def test_latent_shards_round_trip_and_unit_variance(tiny_run):
    latents, shards = tiny_run / "data" / "latents", tiny_run / "data" / "shards"
    meta = read_meta(latents / "meta.json")
    m = json.loads((tiny_run / "metrics" / "encode_latents.json").read_text())
    assert meta["kind"] == "latent" and meta["payload"] == "npy" and meta["sample_shape"] == [2, 2, 2]
    assert meta["scale_factor"] == m["scale_factor"] and "z * scale_factor" in meta["scaling"]
    model, _ = load_model_dir(tiny_run / "models" / "autoencoder")
    for split in ("train", "test"):
        z, y = load_split(latents, split, verify_checksums=True)
        x, y_img = load_split(shards, split)
        assert z.dtype == torch.float32 and z.shape == (len(x), 2, 2, 2)
        assert torch.equal(y, y_img) and m[f"{split}_count"] == len(z)
        torch.testing.assert_close(z, encode_means(model, x), atol=1e-5, rtol=1e-5)  # raw posterior means, unscaled
    z_train, _ = load_split(latents, "train")
    assert (z_train * meta["scale_factor"]).std().item() == pytest.approx(1.0, abs=0.03)
    assert m["scaled_std"] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ library


def test_psnr_and_reconstruction_loss_closed_forms():
    assert psnr_db(0.01) == pytest.approx(20.0) and psnr_db(1.0) == 0.0
    x, x_rec = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    assert reconstruction_loss(x_rec, x, "l1").tolist() == [0.5, 0.5]
    assert reconstruction_loss(x_rec, x, "l2").tolist() == [0.25, 0.25]


def test_batch_indices_are_seeded_permutations():
    it = batch_indices(10, 4, torch.Generator().manual_seed(0))
    first = torch.cat([next(it) for _ in range(5)])  # 20 indices = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    again = batch_indices(10, 4, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([next(again) for _ in range(5)]), first)


def test_loss_kl_term_and_evaluation():
    torch.manual_seed(0)
    model = AutoencoderKL(image_size=8, base_channels=8, num_groups=4)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    loss0, s0 = autoencoder_loss(model, x, 0.0, "l1", g())
    loss1, s1 = autoencoder_loss(model, x, 1.0, "l1", g())
    assert loss0.item() == pytest.approx(s0["recon"], rel=1e-6)
    assert loss1.item() - loss0.item() == pytest.approx(s1["kl"] / 64, rel=1e-4)  # KL per image / pixel count
    ev = evaluate_autoencoder(model, x, batch_size=3)
    with torch.no_grad():
        rec = model.decode(model.encode(x).mode()).clamp(-1, 1)
    assert ev["psnr"] == pytest.approx(_psnr(rec, x), abs=1e-4) and ev["kl"] > 0


def test_latent_scale_factor_gives_unit_std():
    z = torch.randn(100, 4, 2, 2) * 5.0 + 1.0
    assert (z * latent_scale_factor(z)).std().item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="std"):
        latent_scale_factor(torch.zeros(3, 1, 2, 2))


def test_config_downsample_must_match_channel_mult():
    with pytest.raises(ConfigError, match=r"train_autoencoder.autoencoder: downsample 4 needs 3 channel_mult entries"):
        validate_params(params_raw({"train_autoencoder": {"autoencoder": {"channel_mult": [1, 2]}}}))
    p = validate_params(params_raw({"train_autoencoder": {"autoencoder": {"channel_mult": [1, 2, 2, 4],
                                                                          "downsample": 8}}}))
    assert p.train_autoencoder.autoencoder.downsample == 8


# ------------------------------------------------------------------------------------------------ latent diffusion


@pytest.fixture(scope="module")
def latent_model(tiny_run, tmp_path_factory) -> Path:
    """train_diffusion in latent space on the tiny latents (in-process, 1 worker): the default run's path, in a
    folder of its own holding a copy of tiny_run's data and autoencoder."""
    import shutil

    import yaml

    cwd = tmp_path_factory.mktemp("latent")
    shutil.copytree(tiny_run / "data", cwd / "data")
    shutil.copytree(tiny_run / "models" / "autoencoder", cwd / "models" / "autoencoder")
    params = yaml.safe_load(TINY.read_text())
    for stage in ("train_diffusion", "train_classifier"):
        params[stage]["space"] = "latent"
    params["train_diffusion"]["scaling"].update(num_workers=1, use_ray=False)
    params["tracking"]["enabled"] = False
    (cwd / "latent.yaml").write_text(yaml.safe_dump(params))
    env = stage_env()
    res = zygote.run([sys.executable, "-m", "pipeline.train_diffusion", "--params", "latent.yaml"], cwd=cwd,
                     env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd / "models" / "diffusion"


@pytest.mark.slow
def test_latent_diffusion_samples_decode_through_the_autoencoder(latent_model):
    """The CLI's images = the autoencoder's decoder applied, by hand, to the library's latent samples / (1/std z)."""
    from diffusion_core.generation import to_uint8
    from diffusion_core.model_folders import build_diffusion
    from diffusion_core.samplers import SamplingSpec, sample

    cfg = json.loads((latent_model / "config.json").read_text())
    assert cfg["data"]["space"] == "latent" and cfg["data"]["shape"] == [2, 2, 2]
    assert not Path(cfg["latent"]["autoencoder"]).is_absolute()  # the folder moves with the workspace
    work = latent_model.parents[1]  # its folder: the copied data and autoencoder
    z_train, _ = load_split(work / "data" / "latents", "train")
    scale = 1.0 / z_train.std().item()  # encode_latents' definition, recomputed from the shards
    assert cfg["latent"]["scale_factor"] == pytest.approx(scale, rel=1e-4)

    out = work / "latent_samples"
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "sample", "--model", str(latent_model), "--num", "4",
                          "--sampler", "dpmpp2m", "--steps", "5", "--spacing", "logsnr", "--seed", "7",
                          "--class", "3", "--guidance", "cfg", "--scale", "1.5", "--no-progress", "--out", str(out)],
                         cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (4, 8, 8, 1) and npz["images"].dtype == np.uint8
    assert float(npz["nfe"]) == 10  # counted: 5 DPM-Solver++(2M) steps x 2 calls (CFG)

    from diffusion_core.guidance import ClassifierFreeGuidance

    net, _ = load_model_dir(latent_model)
    ae, _ = load_model_dir(work / "models" / "autoencoder")
    with torch.no_grad():
        z = sample(build_diffusion(cfg["diffusion"]), net.eval(), (4, 2, 2, 2),
                   SamplingSpec("dpmpp2m", steps=5, spacing="logsnr"), seeds=[7, 8, 9, 10], y=torch.full((4,), 3),
                   clip_denoised=False, guidance=ClassifierFreeGuidance(1.5, null_class=cfg["data"]["num_classes"]))
        images = ae.eval().decode(z / scale).clamp(-1, 1)
    diff = np.abs(to_uint8(images).astype(int) - npz["images"].astype(int))
    assert diff.max() <= 1, diff.max()  # 1 = rounding of a float32 scale factor recomputed here
