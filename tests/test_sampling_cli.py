"""`diffusion sample` and diffusion_core.generation on tiny random model folders: outputs, seeds, classes, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.generation import SamplingError, SamplingSpec, generate, save_samples
from diffusion_core.model_folders import load_classifier_dir, load_diffusion_dir
from pipeline.cli import main
from tests.tiny_models import CHANNELS, DIFFUSION, SIZE, make_classifier_dir, make_diffusion_dir, make_latent_dir

from .stages import ROOT, stage_env


def cli() -> list[str]:
    """The installed `diffusion` entry point when present, else the module."""
    exe = Path(sys.executable).parent / "diffusion"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = stage_env(OMP_NUM_THREADS="1")  # 1 thread: tiny models, busy 2-core box
    return subprocess.run([*cli(), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"cond": make_diffusion_dir(root / "cond", num_classes=3), "uncond": make_diffusion_dir(root / "uncond"),
            "classifier": make_classifier_dir(root / "classifier", num_classes=3),
            "classifier_linear": make_classifier_dir(root / "classifier_linear", num_classes=3,
                                                     diffusion={**DIFFUSION, "schedule": "linear"}),
            "latent": make_latent_dir(root / "latent")}


def test_help_lists_every_option():
    out = run_cli("sample", "--help")
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for opt in ("--model", "--sampler", "--steps", "--eta", "--guidance", "--scale", "--classifier", "--class ",
                "--classes", "--num", "--seed", "--batch-size", "--spacing", "--device", "--out", "--debug",
                "--autoencoder", "--no-ema", "--no-progress", "--bf16", "--channels-last", "--option"):
        assert opt in text, opt
    for default in ("default: ddim, or a distilled student's own", "(default: 50)", "(default: none)", "(default: 1.0)",
                    "(default: 16)", "(default: 0)", "(default: 64)", "(default: trailing)", "(default: cpu)"):
        assert default in text, default
    from diffusion_core.samplers import SAMPLERS, SPACINGS

    lines = out.stdout.splitlines()
    for name, spec in SAMPLERS.items():  # the help's sampler list is the registry
        line = next(ln for ln in lines if ln.startswith(f"{name}: "))
        assert all(f"{o.name}=" in line for o in spec.options), line
    assert all(sp in text for sp in SPACINGS) and "cfg" in text


def test_sample_folder_outputs_classes_and_batch_size_invariance(folders, tmp_path):
    args = ["sample", "--model", str(folders["cond"]), "--sampler", "ddim", "--eta", "0.5", "--steps", "4",
            "--guidance", "cfg", "--scale", "2", "--classes", "0,2", "--num", "5", "--seed", "10", "--no-progress"]
    out = run_cli(*args, "--batch-size", "2", "--out", str(tmp_path / "a"))
    assert out.returncode == 0, out.stderr
    d = tmp_path / "a"
    assert sorted(p.name for p in d.iterdir()) == ["grid.png", "samples.npz"] + [f"seed-{s:06d}.png"
                                                                               for s in range(10, 15)]
    z = np.load(d / "samples.npz")
    assert z["images"].dtype == np.uint8 and z["images"].shape == (5, 8, 8, 1)
    assert z["labels"].tolist() == [0, 2, 0, 2, 0]  # classes[i % len(classes)]
    assert z["seeds"].tolist() == [10, 11, 12, 13, 14]
    assert np.array_equal(np.asarray(Image.open(d / "seed-000012.png")), z["images"][2, ..., 0])
    grid = np.asarray(Image.open(d / "grid.png"))
    assert grid.ndim == 2 and grid.shape[0] > 8 and grid.shape[1] > 8
    assert z["images"].std() > 0

    # a grid-only output (in-process: the entry point itself is exercised above)
    assert main([*args, "--batch-size", "5", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").is_file() and not (tmp_path / "b.png.npz").exists()
    # sample i depends only on seed i: a set started at seed 12 repeats samples 2.. of the first
    bundle = load_diffusion_dir(folders["cond"])
    again = generate(bundle, 3, SamplingSpec("ddim", 4, options={"eta": 0.5}, guidance="cfg", scale=2.0),
                     classes=[0, 2], seed=12, batch_size=3)
    assert again["labels"].tolist() == z["labels"][2:].tolist()  # [0, 2, 0] here as well
    assert np.abs(again["images"].astype(int) - z["images"][2:]).max() <= 1


def test_generate_is_batch_size_invariant_and_counts_nfe(folders):
    bundle = load_diffusion_dir(folders["cond"])
    kw = dict(spec=SamplingSpec("ddpm", 5, guidance="cfg", scale=3.0), classes=[1, 2, 0], seed=3)
    a = generate(bundle, 4, batch_size=4, **kw)
    b = generate(bundle, 4, batch_size=1, **kw)
    assert np.abs(a["images"].astype(int) - b["images"]).max() <= 1
    assert a["nfe"] == 10  # CFG: conditional + unconditional pass per step
    assert a["labels"].tolist() == [1, 2, 0, 1] and a["seeds"].tolist() == [3, 4, 5, 6]
    part = generate(bundle, 2, batch_size=2, start=2, **kw)  # a worker's slice of the same set
    assert part["seeds"].tolist() == [5, 6] and part["labels"].tolist() == [0, 1]
    assert np.abs(part["images"].astype(int) - a["images"][2:]).max() <= 1
    c = generate(bundle, 2, SamplingSpec("dpmpp2m", 4), seed=3, batch_size=2)
    assert c["nfe"] == 4 and c["labels"].tolist() == [-1, -1]  # no guidance, no classes: unconditional


def test_bf16_channels_last_sampling_is_close_batch_invariant_and_restores_the_model(folders):
    bundle = load_diffusion_dir(folders["cond"])
    kw = dict(spec=SamplingSpec("ddim", 5, options={"eta": 1.0}, guidance="cfg", scale=2.0), classes=[1, 2, 0], seed=3)
    exact = generate(bundle, 6, batch_size=6, **kw)["images"].astype(int)
    a = generate(bundle, 6, batch_size=6, bf16=True, channels_last=True, **kw)["images"].astype(int)
    b = generate(bundle, 6, batch_size=4, bf16=True, channels_last=True, **kw)["images"].astype(int)
    assert np.abs(a - b).max() <= 1  # whatever the batch size, as in fp32
    diff = np.abs(a - exact)
    assert diff.max() > 0  # the network really ran in bf16
    assert diff.mean() < 2.0, diff.mean()  # bf16 keeps 8 mantissa bits: ~0.4% per op, far below 2 of 255 levels
    first = next(p for p in bundle.model.parameters() if p.ndim == 4 and p.shape[1] > 1)
    assert first.is_contiguous()  # channels_last was undone after sampling


def test_fast_denoiser_returns_float32_and_autocasts(folders):
    from diffusion_core.generation import FastDenoiser

    model = load_diffusion_dir(folders["cond"]).model.eval()
    x, t = torch.randn(3, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 20, 45])
    with torch.no_grad():
        ref = model(x, t)
        fast = FastDenoiser(model, bf16=True, channels_last=True)
        out = fast(x, t)
        fast.restore()
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert not torch.equal(out, ref)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel  # bf16 rounding (2^-8 relative per op) over a few layers, not a wrong computation
    conv = next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1)  # layouts differ
    assert conv.is_contiguous()  # restored
    model.to(memory_format=torch.channels_last)  # a model already in channels_last (trained so) stays so
    FastDenoiser(model, channels_last=True).restore()
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_classifier_guidance_and_latent_decoding(folders, tmp_path):
    bundle = load_diffusion_dir(folders["uncond"])
    clf = load_classifier_dir(folders["classifier"])
    r0 = generate(bundle, 3, SamplingSpec(steps=4), seed=0)
    r = generate(bundle, 3, SamplingSpec(steps=4, guidance="classifier", scale=50.0), classifier_bundle=clf, seed=0)
    assert r["labels"].tolist() == [0, 1, 2]  # guided without classes: cycle through all classes
    assert r["images"].shape == (3, 8, 8, 1) and not np.array_equal(r["images"], r0["images"])

    latent = load_diffusion_dir(folders["latent"])
    assert latent.is_latent and latent.shape == (2, 4, 4)
    res = generate(latent, 2, SamplingSpec(steps=3), seed=0)
    assert res["images"].shape == (2, 8, 8, 1) and res["images"].dtype == np.uint8  # decoded to the image size
    paths = save_samples(tmp_path / "lat", res)
    assert [p.name for p in paths] == ["seed-000000.png", "seed-000001.png", "samples.npz", "grid.png"]


def test_folder_output_removes_stale_seed_files(folders, tmp_path):
    bundle = load_diffusion_dir(folders["uncond"])
    save_samples(tmp_path, generate(bundle, 3, SamplingSpec(steps=2), seed=0))
    save_samples(tmp_path, generate(bundle, 2, SamplingSpec(steps=2), seed=0))
    assert sorted(p.name for p in tmp_path.glob("seed-*.png")) == ["seed-000000.png", "seed-000001.png"]
    assert not list(tmp_path.glob("*.tmp"))


def bad_cases(f):
    m, u = str(f["cond"]), str(f["uncond"])
    return {
        "classifier guidance without classifier": (["--model", u, "--guidance", "classifier"], "--classifier"),
        "steps > T": (["--model", m, "--steps", "51"], "1..50"),
        "unknown class": (["--model", m, "--class", "3"], "class 3 is not known"),
        "unknown class in list": (["--model", m, "--guidance", "cfg", "--classes", "0,7"], "class 7"),
        "cfg on unconditional": (["--model", u, "--guidance", "cfg"], "unconditional"),
        "classes on unconditional without classifier": (["--model", u, "--class", "1"], "classifier"),
        "eta > 1": (["--model", m, "--eta", "1.5"], "option eta must be in [0.0, 1.0]"),
        "negative scale": (["--model", m, "--guidance", "cfg", "--scale", "-1"], "scale must be >= 0"),
        "classifier for another schedule": (["--model", u, "--guidance", "classifier", "--classifier",
                                             str(f["classifier_linear"])], "schedule"),
        "missing model folder": (["--model", str(Path(m).parent / "nope")], "does not exist"),
        "class and classes": (["--model", m, "--class", "1", "--classes", "0,1"], "not allowed with"),
        "bad class list": (["--model", m, "--classes", "a,b"], "comma-separated"),
        "bad sampler": (["--model", m, "--sampler", "lms"], "invalid choice"),
    }


@pytest.mark.parametrize("case", list(bad_cases({k: "x" for k in ("cond", "uncond", "classifier_linear")})))
def test_bad_combination_is_a_one_line_error(folders, tmp_path, capsys, case):
    args, needle = bad_cases(folders)[case]
    try:
        rc = main(["sample", *args, "--num", "2", "--no-progress", "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse-level errors exit from parse_args
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "o").exists()


def test_error_through_the_entry_point_is_one_line_and_debug_adds_traceback(folders, tmp_path):
    args = ["sample", "--model", str(folders["uncond"]), "--guidance", "classifier", "--out", str(tmp_path / "o")]
    out = run_cli(*args)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ") and "--classifier" in out.stderr


def test_debug_adds_the_traceback(folders, tmp_path, capsys):
    args = ["sample", "--model", str(folders["uncond"]), "--guidance", "classifier", "--out", str(tmp_path / "o")]
    assert main([*args, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_generate_validates_directly(folders):
    bundle = load_diffusion_dir(folders["cond"])
    for kw, spec in ((dict(num=0), {}), (dict(batch_size=0), {}), ({}, dict(sampler="lms")), ({}, dict(spacing="odd")),
                     ({}, dict(guidance="x")), (dict(classes=[]), {}), ({}, dict(options={"eta": 2.0})),
                     ({}, dict(sampler="dpmpp2m", options={"eta": 0.5})), ({}, dict(scale=-1.0))):
        with pytest.raises(SamplingError):
            generate(bundle, **{"num": 1, "spec": SamplingSpec(**{"steps": 1, **spec}), **kw})
    assert issubclass(SamplingError, ValueError)
