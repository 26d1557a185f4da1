"""Bad input, table-driven, through the real command lines: every case runs `pipeline.<stage>` or
`pipeline.cli sample` as `__main__` of a process of its own, in its own temp folder, and must give

- a non-zero exit code,
- stderr of exactly one line, starting with `error:`, naming the offending key/file/value (the case's needles),
- no traceback (only `--debug` adds one: `test_debug_adds_a_traceback`),
- nothing half-written: every file under the working folder is byte-identical before and after (outputs absent or
  unchanged, no temp files left).

The cases run two at a time, started together by a module fixture for the cases pytest selected. Each is a child
of the tests' fork server (tests/zygote.py: the command line run as `__main__` in a fresh process that forked
from one which had already imported torch and the pipeline, so a case costs a fraction of a second of CPU, not
two); `test_debug_adds_a_traceback` runs its stage through a real `python -m`. Fixtures (a prepared `digits` data
folder, tiny random model folders) are built once per module, in-process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import merged
from tests import zygote
from tests.stages import TINY, stage_env

PARALLEL = 2


# ----------------------------------------------------------------------------------------------- helpers


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_params(cwd: Path, over: dict | None = None, *, tracking: bool = False, drop: tuple[str, ...] = ()) -> None:
    """cwd/p.yaml: configs/tiny.yaml (tracking off unless asked) with `over` merged in and `drop`ped dotted keys."""
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["enabled"] = tracking
    raw = merged(raw, over or {})
    for dotted in drop:
        *parents, last = dotted.split(".")
        d = raw
        for p in parents:
            d = d[p]
        d.pop(last)
    (cwd / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (folders alone do not count)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def base_env(extra: dict | None = None) -> dict:
    return stage_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(extra or {}))


def flip_byte(path: Path, offset_frac: float = 0.5) -> None:
    b = bytearray(path.read_bytes())
    i = int(len(b) * offset_frac)
    b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def truncate(path: Path, keep_frac: float = 0.5) -> None:
    b = path.read_bytes()
    path.write_bytes(b[: int(len(b) * keep_frac)])


def save_png(path: Path, size: int, mode: str = "L", seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


# ----------------------------------------------------------------------------------------------- the table


@dataclass
class Case:
    """One bad input. `args` may use {A} for the module's fixture folder;
    `setup(cwd, A)` prepares the working folder."""

    stage: str  # pipeline module ("prepare", ...), "cli" (diffusion sample) or "python" (args are python's)
    args: list[str]
    needles: tuple[str, ...]  # substrings the one error line must contain (offending key/file/value, accepted)
    setup: Callable[[Path, Path], None] = lambda cwd, A: write_params(cwd)
    env: dict = field(default_factory=dict)
    max_seconds: float | None = None  # e.g. an unreachable server must fail fast, not hang
    exit_code: int = 2


P = ["--params", "p.yaml"]
SAMPLE = ["sample", "--num", "2", "--steps", "2", "--no-progress"]


def params_case(stage: str, over: dict, *needles: str, **kw) -> Case:
    return Case(stage, P, needles, setup=lambda cwd, A: write_params(cwd, over), **kw)


def with_data(over: dict | None = None, then: Callable[[Path], None] | None = None):
    """setup: the prepared digits data copied in, params written, then `then(cwd)` damages something."""

    def setup(cwd: Path, A: Path) -> None:
        shutil.copytree(A / "data", cwd / "data")
        write_params(cwd, over)
        if then is not None:
            then(cwd)

    return setup


def with_model(name: str, then: Callable[[Path], None] | None = None):
    """setup: fixture model folder `name` copied to cwd/m, then `then(cwd/m)` damages it."""

    def setup(cwd: Path, A: Path) -> None:
        shutil.copytree(A / name, cwd / "m")
        if then is not None:
            then(cwd / "m")

    return setup


def imagefolder(build: Callable[[Path], None]):
    def setup(cwd: Path, A: Path) -> None:
        (cwd / "imgs").mkdir()
        build(cwd / "imgs")
        write_params(cwd, {"prepare": {"dataset": "imagefolder", "data_dir": "imgs"}})

    return setup


def _mixed_sizes(root: Path) -> None:
    save_png(root / "a" / "0.png", 8)
    save_png(root / "b" / "1.png", 10)


def _class_without_images(root: Path) -> None:
    save_png(root / "a" / "0.png", 8)
    (root / "b").mkdir()
    (root / "b" / "notes.txt").write_text("no images here")


def _corrupt_image(root: Path) -> None:
    save_png(root / "a" / "0.png", 8)
    (root / "b").mkdir()
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def _edit_config(fn: Callable[[dict], None]):
    def then(m: Path) -> None:
        cfg = json.loads((m / "config.json").read_text())
        fn(cfg)
        (m / "config.json").write_text(json.dumps(cfg))

    return then


def _truncate_and_rehash(m: Path) -> None:
    """A truncated model.safetensors whose config.json checksum was (wrongly) updated to match:
    the parser must refuse."""
    from diffusion_core.checkpoint import sha256_file

    truncate(m / "model.safetensors", 0.3)
    _edit_config(lambda c: c["checksums"].__setitem__("model.safetensors", sha256_file(m / "model.safetensors")))(m)


def _widen(cfg: dict) -> None:
    cfg["model"]["base_channels"] = 16  # weights are for 8: an incompatible architecture


def _drop_autoencoder(m: Path) -> None:
    """The latent model folder as train_diffusion writes it (autoencoder recorded as models/autoencoder), without it."""
    shutil.rmtree(m / "autoencoder")
    _edit_config(lambda c: c["latent"].__setitem__("autoencoder", "models/autoencoder"))(m / "diffusion")


def _unwritable_out(cwd: Path, A: Path) -> None:
    (cwd / "somefile").write_text("a regular file where a folder should be")  # root ignores chmod; this works


def _prepared_then_full_disk(cwd: Path, A: Path) -> None:
    """An earlier prepare's outputs are in place; the rerun hits a full disk and must leave them byte-identical."""
    shutil.copytree(A / "data", cwd / "data")
    (cwd / "metrics").mkdir()
    (cwd / "metrics" / "prepare.json").write_text('{"train_count": 1}\n')
    write_params(cwd, {"prepare": {"seed": 1}})


# prepare.main with every fsync failing as on a full disk (ENOSPC): the real CLI, the disk simulated in-process
FULL_DISK_DRIVER = (
    "import errno, os, sys\n"
    "def _full(fd): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
    "os.fsync = _full\n"
    "from pipeline.prepare import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)

CASES: dict[str, Case] = {
    # ---- params file: keys, types, ranges, names, cross-field rules (fail at config load)
    "missing params file": Case("prepare", ["--params", "nope.yaml"], ("params file not found: nope.yaml",
                                                                       "--params PATH"), setup=lambda cwd, A: None),
    "params file is not YAML": Case("prepare", P, ("p.yaml: invalid YAML at line 3", "expected ',' or ']'"),
                                    setup=lambda cwd, A: (cwd / "p.yaml").write_text("prepare:\n  dataset: [digits\n")),
    "params top level is a list": Case("prepare", P, ("top level must be a mapping of sections", "got a list"),
                                       setup=lambda cwd, A: (cwd / "p.yaml").write_text("- prepare\n- data\n")),
    "misspelled key (suggestion)": params_case("prepare", {"prepare": {"datset": "digits"}},
                                               "unknown key 'prepare.datset'", "did you mean 'dataset'?",
                                               "accepted: dataset, data_dir"),
    "misspelled section": params_case("train_autoencoder", {"trian_autoencoder": {"steps": 5}},
                                      "unknown section 'trian_autoencoder'", "did you mean 'train_autoencoder'?"),
    "misspelled nested key": params_case("train_classifier", {"train_classifier": {"classifier": {"base_channel": 8}}},
                                         "unknown key 'train_classifier.classifier.base_channel'",
                                         "did you mean 'base_channels'?"),
    "wrong type: string for int": params_case("train_autoencoder", {"train_autoencoder": {"batch_size": "64"}},
                                              "train_autoencoder.batch_size must be an integer > 0", "got '64'"),
    "wrong type: string for bool": params_case("train_feature_net", {"data": {"verify_checksums": "yes"}},
                                               "data.verify_checksums must be true or false", "got 'yes'"),
    "wrong type: scalar for list": params_case("train_autoencoder",
                                               {"train_autoencoder": {"autoencoder": {"channel_mult": 2}}},
                                               "train_autoencoder.autoencoder.channel_mult must be a list of integers"),
    "non-finite number": params_case("train_feature_net", {"train_feature_net": {"lr": float("inf")}},
                                     "train_feature_net.lr must be a number > 0", "inf"),
    "negative eta (params)": params_case("evaluate", {"evaluate": {"eta": -0.1}},
                                         "evaluate.eta must be a number in [0, 1]", "got -0.1"),
    "guidance scale < 0 (params)": params_case("evaluate", {"evaluate": {"scale": -2.0}},
                                               "evaluate.scale must be a number >= 0", "got -2.0"),
    "unknown sampler (params)": params_case("evaluate", {"evaluate": {"sampler": "ddimm"}},
                                            "evaluate.sampler must be one of consistency, ddim, ddpm, dpmpp2m, "
                                            "dpmpp2m_sde, dpmpp3m, euler, heun", "did you mean 'ddim'?"),
    "test_fraction = 1": params_case("prepare", {"prepare": {"test_fraction": 1.0}},
                                     "prepare.test_fraction must be a number in (0, 1)", "got 1.0"),
    "test_fraction = 0": params_case("prepare", {"prepare": {"test_fraction": 0.0}},
                                     "prepare.test_fraction must be a number in (0, 1)", "got 0.0"),
    "unknown dataset": params_case("prepare", {"prepare": {"dataset": "cifar"}},
                                   "prepare.dataset must be one of mnist5k", "did you mean 'cifar10'?"),
    "unknown schedule": params_case("train_classifier", {"schedule": {"name": "cosin"}},
                                    "schedule.name must be one of linear, cosine, sigmoid", "did you mean 'cosine'?"),
    "batch size not divisible by workers": params_case("train_classifier", {"train_classifier": {"batch_size": 33}},
                                                       "batch_size 33 must be divisible by scaling.num_workers 2"),
    "in-process run with 2 workers": params_case("train_classifier",
                                                 {"train_classifier": {"scaling": {"use_ray": False}}},
                                                 "scaling.use_ray: false", "needs scaling.num_workers: 1"),
    "learned_range with the simple loss": params_case("train_classifier",  # tiny.yaml learns its variances
                                                      {"diffusion": {"variance": "learned_range", "loss": "simple"}},
                                                      "variance 'learned_range' needs loss 'hybrid' or 'vlb'",
                                                      "(got 'simple')"),
    "downsample vs channel_mult": params_case("train_autoencoder",
                                              {"train_autoencoder": {"autoencoder": {"downsample": 8}}},
                                              "downsample 8 needs 4 channel_mult entries"),
    "classifier space != diffusion space": params_case("train_classifier", {"train_classifier": {"space": "latent"}},
                                                       "train_classifier.space is 'latent'",
                                                       "train_diffusion.space is 'pixel'"),
    # ---- data folders and shards
    "imagefolder: folder missing": params_case("prepare", {"prepare": {"dataset": "imagefolder", "data_dir": "nope"}},
                                               "data folder nope does not exist", "prepare.data_dir"),
    "imagefolder: folder empty": Case("prepare", P, ("imgs has no class subfolders", "imgs/<class_name>/"),
                                      setup=imagefolder(lambda root: None)),
    "imagefolder: class without images": Case("prepare", P, ("class folder imgs/b holds no images", ".png"),
                                              setup=imagefolder(_class_without_images)),
    "imagefolder: mixed image sizes": Case("prepare", P, ("imgs/b/1.png is 10x10 L", "imgs/a/0.png is 8x8 L",
                                                          "one size and mode"), setup=imagefolder(_mixed_sizes)),
    "imagefolder: corrupt image": Case("prepare", P, ("cannot read image imgs/b/broken.png",),
                                       setup=imagefolder(_corrupt_image)),
    "stage run before prepare": params_case("train_autoencoder", {}, "data/shards not found",
                                            "dvc repro prepare"),
    "autoencoder diverges (lr 1e30): NaN/inf loss": Case(
        "train_autoencoder", P, ("autoencoder loss is", "at step", "lower train_autoencoder.lr"),
        setup=with_data({"train_autoencoder": {"lr": 1.0e30}})),
    "feature net diverges (lr 1e30): NaN/inf loss": Case(
        "train_feature_net", P, ("feature net loss is", "at step", "train_feature_net.lr"),
        setup=with_data({"train_feature_net": {"lr": 1.0e30}})),
    "truncated shard": Case("train_autoencoder", P, ("shard data/shards/train-000000.tar", "truncated"),
                            setup=with_data(then=lambda cwd: truncate(cwd / "data/shards/train-000000.tar", 0.4))),
    "shard checksum mismatch": Case("train_feature_net", P,
                                    ("checksum mismatch for shard data/shards/test-000000.tar",),
                                    setup=with_data({"data": {"verify_checksums": True}},
                                                    then=lambda cwd: flip_byte(cwd / "data/shards/test-000000.tar"))),
    "shard missing": Case("train_feature_net", P, ("shard data/shards/train-000001.tar is missing",),
                          setup=with_data(then=lambda cwd: (cwd / "data/shards/train-000001.tar").unlink())),
    "latent space without latents": Case("train_classifier", P, ("data/latents not found",),
                                         setup=with_data({"train_classifier": {"space": "latent"},
                                                          "train_diffusion": {"space": "latent"}})),
    "autoencoder checksum mismatch": Case("encode_latents", P,
                                          ("checksum mismatch for models/autoencoder/model.safetensors",),
                                          setup=lambda cwd, A: (with_data()(cwd, A), shutil.copytree(
                                              A / "latent" / "autoencoder", cwd / "models" / "autoencoder"),
                                              flip_byte(cwd / "models/autoencoder/model.safetensors", 0.9))),
    # ---- model folders (diffusion sample)
    "missing model folder": Case("cli", [*SAMPLE, "--model", "nope", "--out", "o.png"],
                                 ("checkpoint folder nope does not exist",)),
    "truncated model.safetensors": Case("cli", [*SAMPLE, "--model", "m", "--out", "o.png"],
                                        ("checksum mismatch for m/model.safetensors",),
                                        setup=with_model("cond", lambda m: truncate(m / "model.safetensors"))),
    "truncated weights, checksum forged": Case("cli", [*SAMPLE, "--model", "m", "--out", "o.png"],
                                               ("m/model.safetensors is not a readable safetensors file", "truncated"),
                                               setup=with_model("cond", _truncate_and_rehash)),
    "config.json missing": Case("cli", [*SAMPLE, "--model", "m", "--out", "o.png"],
                                ("m/config.json is missing (incomplete checkpoint)",),
                                setup=with_model("cond", lambda m: (m / "config.json").unlink())),
    "config.json of an incompatible model": Case("cli", [*SAMPLE, "--model", "m", "--out", "o.png"],
                                                 ("m/model.safetensors does not fit its config", "expected shape"),
                                                 setup=with_model("cond", _edit_config(_widen))),
    "config.json names an unknown model kind": Case(
        "cli", [*SAMPLE, "--model", "m", "--out", "o.png"], ("'kind' = 'transformer' is not one of", "unet"),
        setup=with_model("cond", _edit_config(lambda c: c["model"].__setitem__("kind", "transformer")))),
    "classifier folder given as --model": Case("cli", [*SAMPLE, "--model", "{A}/classifier", "--out", "o.png"],
                                               ("not a diffusion model folder", "models/diffusion")),
    "latent model without its autoencoder": Case("cli", [*SAMPLE, "--model", "m/diffusion", "--out", "o.png"],
                                                 ("latent model m/diffusion needs its autoencoder",
                                                  "run train_autoencoder or pass its folder"),
                                                 setup=with_model("latent", _drop_autoencoder)),
    # ---- sampling options (diffusion sample)
    "negative eta (cli)": Case("cli", [*SAMPLE, "--model", "{A}/cond", "--eta", "-0.5", "--out", "o.png"],
                               ("eta must be in [0.0, 1.0], got -0.5",)),
    "steps > T (cli)": Case("cli", [*SAMPLE[:-3], "--no-progress", "--steps", "51", "--model", "{A}/cond", "--out",
                                    "o.png"], ("steps must be in 1..50", "got 51")),
    "guidance scale < 0 (cli)": Case("cli", [*SAMPLE, "--model", "{A}/cond", "--guidance", "cfg", "--scale", "-1",
                                             "--out", "o.png"], ("guidance scale must be >= 0, got -1.0",)),
    "unknown sampler (cli)": Case("cli", [*SAMPLE, "--model", "{A}/cond", "--sampler", "lms", "--out", "o.png"],
                                  ("invalid choice: 'lms'", "ddim")),
    "class the model does not know": Case("cli", [*SAMPLE, "--model", "{A}/cond", "--class", "7", "--out", "o.png"],
                                          ("class 7 is not known to the model", "0..2")),
    "num = 0": Case("cli", [*SAMPLE, "--model", "{A}/cond", "--num", "0", "--out", "o.png"],
                    ("num must be >= 1, got 0",)),
    "unknown device": Case("cli", [*SAMPLE, "--model", "{A}/cond", "--device", "tpu", "--out", "o.png"],
                           ("device 'tpu' is not a torch device", "use cpu, cuda")),
    # ---- environment: unwritable output, full disk, unreachable services
    "unwritable output folder (cli)": Case("cli", [*SAMPLE, "--model", "{A}/cond", "--out", "somefile/x.png"],
                                           ("cannot write somefile/x.png",), setup=_unwritable_out),
    "unwritable output folder (stage)": Case("prepare", P, ("cannot write into data", "writable folder"),
                                             setup=lambda cwd, A: (write_params(cwd), (cwd / "data").write_text(
                                                 "a file where the data folder should be"))),
    "full disk while writing shards": Case("python", ["-c", FULL_DISK_DRIVER, *P], ("No space left on device", "data"),
                                           setup=_prepared_then_full_disk),
    "unreachable MLflow server": Case("prepare", P, ("MLflow server http://127.0.0.1:", "is unreachable",
                                                     "tracking.fallback_local"), max_seconds=30,
                                      setup=lambda cwd, A: write_params(
                                          cwd, {"tracking": {"tracking_uri": f"http://127.0.0.1:{closed_port()}"}},
                                          tracking=True)),
    "RAY_ADDRESS pointing at nothing": Case("train_classifier", P, ("RAY_ADDRESS=127.0.0.1:", "is unreachable",
                                                                    "unset RAY_ADDRESS"), max_seconds=40,
                                            setup=with_data(), env={"RAY_ADDRESS": f"127.0.0.1:{closed_port()}"}),
}
SLOW = {"RAY_ADDRESS pointing at nothing"}  # imports Ray: ~10 s on a busy box


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Prepared digits shards (tiny.yaml's prepare section) and tiny random model folders, built in-process once."""
    import torch

    from diffusion_core.data import prepare_dataset
    from pipeline.config import validate_params
    from tests.tiny_models import make_classifier_dir, make_diffusion_dir, make_latent_dir

    A = tmp_path_factory.mktemp("bad_input_assets")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = validate_params(yaml.safe_load(TINY.read_text()), ["prepare"]).prepare
        prepare_dataset(cfg.to_options(), A / "data")
        make_diffusion_dir(A / "cond", num_classes=3)
        make_classifier_dir(A / "classifier", num_classes=3)
        make_latent_dir(A / "latent")
    finally:
        torch.set_num_threads(threads)
    return A


def _run_case(case: Case, cwd: Path, A: Path, before: dict[str, str], args: list[str]) -> dict:
    if case.stage == "cli":
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
    elif case.stage == "python":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", f"pipeline.{case.stage}", *args]
    t0 = time.monotonic()
    res = zygote.run(cmd, cwd=cwd, env=base_env(case.env), timeout=600)
    return {"rc": res.returncode, "stderr": res.stderr, "stdout": res.stdout, "seconds": time.monotonic() - t0,
            "before": before, "after": snapshot(cwd), "cmd": cmd}


@pytest.fixture(scope="module")
def results(request, assets, tmp_path_factory):
    """Start every selected case at once (PARALLEL at a time); tests wait on their own future."""
    wanted = []
    for item in request.session.items:
        cs = getattr(item, "callspec", None)
        if item.module is not None and item.module.__name__ == __name__ and cs is not None and "name" in cs.params:
            if item.originalname == "test_bad_input_is_one_line_and_writes_nothing":
                wanted.append(cs.params["name"])
    futures: dict[str, Future] = {}
    pool = ThreadPoolExecutor(max_workers=PARALLEL)
    for name in sorted(set(wanted), key=lambda n: n not in SLOW):  # slow ones first: they finish in the shadow
        case = CASES[name]
        cwd = tmp_path_factory.mktemp("case")
        case.setup(cwd, assets)
        args = [a.replace("{A}", str(assets)) for a in case.args]
        futures[name] = pool.submit(_run_case, case, cwd, assets, snapshot(cwd), args)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------- tests


PROGRESS_BAR = re.compile(r"^[\w ]+: +\d+%\|")


def test_at_least_25_distinct_cases():
    assert len(CASES) >= 25


# every case is a stage's command line in a subprocess (about 3 s of CPU each): the full suite's, not make test-fast's
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(results, name):
    case = CASES[name]
    r = results[name].result()
    err = r["stderr"]
    # a stage that failed mid-training has drawn its progress bar (tqdm) first: that is not part of the error
    lines = [ln for ln in err.splitlines() if ln and not PROGRESS_BAR.match(ln)]  # tqdm ends lines with \r
    assert r["rc"] == case.exit_code, f"{r['cmd']}\nrc={r['rc']}\n{err}\n{r['stdout']}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one `error:` line:\n{err}"
    for needle in case.needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    assert r["after"] == r["before"], (
        f"files changed: added {sorted(set(r['after']) - set(r['before']))}, "
        f"removed {sorted(set(r['before']) - set(r['after']))}, changed "
        f"{sorted(k for k in r['before'] if r['after'].get(k, r['before'][k]) != r['before'][k])}")
    if case.max_seconds is not None:
        assert r["seconds"] < case.max_seconds, f"took {r['seconds']:.1f} s"


@pytest.mark.slow
def test_debug_adds_a_traceback(assets, tmp_path):
    """--debug: the same one `error:` line last, with the traceback above it."""
    with_data(then=lambda cwd: truncate(cwd / "data/shards/train-000000.tar", 0.4))(tmp_path, assets)
    res = subprocess.run([sys.executable, "-m", "pipeline.train_autoencoder", *P, "--debug"], cwd=tmp_path,
                         env=base_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 2
    assert "Traceback (most recent call last)" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: shard data/shards/train-000000.tar")


def test_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    """The atomic writer under ENOSPC: OutputError naming the file, previous content intact, no temp file left."""
    from diffusion_core.io import OutputError, atomic_write_json, atomic_write_with

    target = tmp_path / "metrics" / "m.json"
    atomic_write_json(target, {"old": 1})
    old = target.read_bytes()

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(b'{"new": ')  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError, match=r"cannot write .*m\.json: No space left on device"):
        atomic_write_with(target, writer)
    assert target.read_bytes() == old
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.json"]


def test_full_disk_while_saving_a_model_keeps_the_previous_model(tmp_path, monkeypatch):
    """A model folder re-saved over a full disk: the previous weights and config still load, no temp folder left."""
    import torch

    from diffusion_core import checkpoint
    from diffusion_core.checkpoint import load_model_dir, save_model_dir
    from diffusion_core.io import OutputError
    from tests.tiny_models import make_feature_net

    out = tmp_path / "models" / "feature_net"
    first = make_feature_net(seed=2)
    save_model_dir(out, first, {"num_classes": 3})
    before = snapshot(out)

    real = checkpoint.save_file

    def full_after_a_few_bytes(tensors, filename, *a, **k):
        real(tensors, filename, *a, **k)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save_file", full_after_a_few_bytes)
    with pytest.raises(OutputError, match="No space left on device"):
        save_model_dir(out, make_feature_net(seed=3), {"num_classes": 3})
    monkeypatch.undo()
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["feature_net"]
    model, cfg = load_model_dir(out)
    for a, b in zip(model.state_dict().values(), first.state_dict().values()):
        assert torch.equal(a, b)
