"""`kill -9` in the middle of a stage's writes, through its real command line on configs/tiny.yaml: prepare,
encode_latents, reference_stats, evaluate, sweep (Ray Tune, three sampling trials), and the training stages that
write a model folder without checkpoints (train_feature_net, train_autoencoder, and train_classifier in-process;
train_diffusion's kills are in test_train_diffusion.py).

Each run is a child of the tests' fork server (tests/zygote.py, which runs a `sitecustomize.py` on the
child's PYTHONPATH as Python's start-up would), in a session of its own. The harness is a `sitecustomize.py` put
first on PYTHONPATH. It wraps `os.replace` and `os.rename`, through which
every output file reaches its name (`diffusion_core.io.atomic_path`, files moved out of a stage's temp folder), and
counts the calls whose destination lies in the stage's working folder (outside Ray Tune's scratch `ray_results`).
With `KILL_AT_RENAME=N` the stage SIGKILLs its process group (itself and any local Ray it started) just before the
N-th such rename; with `RENAME_LOG=FILE` it appends each one to FILE. (A whole output folder is swapped in by one
renameat2(RENAME_EXCHANGE) call, which the harness does not see: there is no point between two renames to kill
at. Where the file system cannot exchange, the fallback's renames are seen and killed at.)

For each stage: a run with params A (its outputs recorded; the models it reads are tiny random ones), a full run
with params B that change its outputs (its outputs and renames recorded), then B runs killed at the first rename,
at every rename that moves something out of the stage's temp folder into place, and at the last rename; the first
starts from the A state, each next one from what the previous kill left. After each kill every output file must be
byte-identical to its A or its full-B version (JSON: equal but for timings, and parseable whole), no output that
both runs have may be missing, and anything else must be a hidden temporary (a dot-name ending .tmp/.old, or inside
a dot-folder) outside every output folder dvc.yaml declares (the readers open outputs by name or from meta.json,
never by listing a folder). A normal rerun must then succeed and leave exactly the full-B files: no temporary left.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import yaml

from . import zygote
from .stages import ROOT, TINY, stage_env
from .tiny_models import make_diffusion_dir, make_feature_net_dir

pytestmark = pytest.mark.slow

TIMINGS = {"seconds", "wall_seconds", "sampling_seconds", "train_seconds"}  # the only keys two equal runs may differ in

SITECUSTOMIZE = '''
import os, signal

# armed in the stage's own process only: its Ray workers inherit the variable and see another pid
if "KILL_HARNESS_PID" not in os.environ:
    os.environ["KILL_HARNESS_PID"] = str(os.getpid())
_ARMED = os.environ["KILL_HARNESS_PID"] == str(os.getpid())
_N = int(os.environ.get("KILL_AT_RENAME") or 0)
_LOG = os.environ.get("RENAME_LOG")
_ROOT = os.path.realpath(os.getcwd())
_SCRATCH = os.path.join(_ROOT, "ray_results")  # Ray Tune's own bookkeeping, not a stage output
_count = 0


def _inside(path):
    p = os.path.realpath(os.fsdecode(path))
    return (p == _ROOT or p.startswith(_ROOT + os.sep)) and not p.startswith(_SCRATCH + os.sep)


def _wrap(real):
    def wrapped(src, dst, *args, **kwargs):
        global _count
        if _inside(dst):
            _count += 1
            if _LOG:
                with open(_LOG, "a") as f:
                    f.write(f"{_count}\\t{os.path.relpath(os.path.realpath(os.fsdecode(src)), _ROOT)}\\t"
                            f"{os.path.relpath(os.path.realpath(os.fsdecode(dst)), _ROOT)}\\n")
            if _count == _N:
                os.killpg(os.getpgrp(), signal.SIGKILL)  # the stage and any local Ray it started
        return real(src, dst, *args, **kwargs)
    return wrapped


if _ARMED and (_N or _LOG):
    os.replace, os.rename = _wrap(os.replace), _wrap(os.rename)
'''


def _params(path: Path, **sections) -> Path:
    """tiny.yaml without tracking, Ray, Inception or big counts; `sections` update single keys of a section."""
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["enabled"] = False
    # no Inception-v3 (the slowest part of these runs): the domain statistics and metrics are written the same way
    raw["reference_stats"]["inception"] = False
    raw["sweep"]["inception_samples"] = 0
    raw["evaluate"].update(setting="params", num_workers=1, num_samples=20, batch_size=20, grid_samples=10,
                           nll_samples=4, nll_batch_size=4)
    raw["train_classifier"]["scaling"].update(num_workers=1, use_ray=False)  # in-process: the kill hits the writer
    for name in ("train_feature_net", "train_autoencoder", "train_classifier"):  # what they write, not how well
        raw[name].update(steps=20, log_every=10)
    raw["sweep"].update(num_samples=8, batch_size=8, grid_samples=4, max_concurrent=1, seed_sets=1,  # 3 trials
                        training={**raw["sweep"]["training"], "schedules": []},
                        sampling=[{"samplers": ["ddim", "dpmpp2m"], "steps": [2], "guidance": ["cfg"]},
                                  {"samplers": ["ddim"], "steps": [3], "guidance": ["cfg"]}])
    for name, keys in sections.items():
        raw[name].update(keys)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _run(harness: Path, cwd: Path, stage: str, params: Path, kill_at: int = 0, log: Path | None = None,
         expect: int = 0) -> None:
    env = {**stage_env(), "PYTHONPATH": f"{harness}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["KILL_AT_RENAME"] = str(kill_at)
    if log:
        env["RENAME_LOG"] = str(log)
    res = zygote.run([sys.executable, "-m", f"pipeline.{stage}", "--params", str(params)], cwd=cwd, env=env,
                     timeout=900)
    assert res.returncode == expect, f"{stage} (kill at {kill_at}): rc {res.returncode}\n{res.stderr[-3000:]}"


def _files(cwd: Path) -> dict[str, bytes]:
    """Every file under cwd but Ray Tune's scratch folder (ray_results: trial logs and staging, read by nobody
    after the sweep that wrote them)."""
    return {str(p.relative_to(cwd)): p.read_bytes() for p in sorted(cwd.rglob("*"))
            if p.is_file() and p.relative_to(cwd).parts[0] != "ray_results"}


def _content(rel: str, data: bytes):
    """What must match: the bytes, except the timings in JSON files (which must still parse, whole) and in CSV
    tables (sweep.csv: its rows compared as a set, as trials may finish in any order)."""
    if rel.endswith(".csv"):
        rows = list(csv.reader(io.StringIO(data.decode())))
        keep = [i for i, name in enumerate(rows[0] if rows else []) if name not in TIMINGS]
        picked = [tuple(row[i] if i < len(row) else None for i in keep) for row in rows]
        return (picked[:1], sorted(picked[1:], key=repr))
    if not rel.endswith(".json"):
        return data
    try:
        obj = json.loads(data)
    except ValueError:
        return b"not whole JSON: " + data  # a partial file: equal to no complete version
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in TIMINGS}
    return json.dumps(obj, sort_keys=True)


def _is_temp(rel: str) -> bool:
    """A hidden temporary: a dot-name ending .tmp/.old, or anything inside a dot-folder."""
    parts = Path(rel).parts
    return any(p.startswith(".") for p in parts[:-1]) or (parts[-1].startswith(".") and
                                                           parts[-1].endswith((".tmp", ".old")))


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("harness")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


@pytest.fixture(scope="module")
def a_states(prepared, harness, tmp_path_factory) -> dict[str, Path]:
    """The tiny pipeline built once with params A; a copy of the folder after each stage's A run, by stage.

    prepare's A run is the session's `prepared` folder (tiny.yaml, tracking off, as A is). The trained models the
    later stages read are tiny random ones (tests/tiny_models.py): these stages only need them to be loadable, and
    training them would cost minutes."""
    import torch

    from diffusion_core.checkpoint import save_model_dir
    from diffusion_core.models import AutoencoderKL

    base = tmp_path_factory.mktemp("a_states")
    work, params, states = base / "work", _params(base / "a.yaml"), {"prepare": prepared}
    shutil.copytree(prepared, work)
    torch.manual_seed(0)
    save_model_dir(work / "models" / "autoencoder", AutoencoderKL(in_channels=1, image_size=8, latent_channels=2,
                                                                 base_channels=8, channel_mult=(1, 2), num_groups=4))
    make_feature_net_dir(work / "models" / "feature_net", num_classes=10, seed=2)
    make_diffusion_dir(work / "models" / "diffusion", num_classes=10, seed=0)
    for stage in ("encode_latents", "reference_stats", "evaluate", "sweep"):
        _run(harness, work, stage, params)
        states[stage] = base / f"after-{stage}"
        shutil.copytree(work, states[stage], symlinks=True)
    for stage in TRAINED:  # trained for real (20 steps), each on a copy of the prepared data
        states[stage] = base / f"after-{stage}"
        shutil.copytree(prepared, states[stage], symlinks=True)
        _run(harness, states[stage], stage, params)
    return states


def _b_prepare(work: Path, tmp: Path) -> Path:
    return _params(tmp / "b.yaml", prepare={"seed": 1})  # another split: other shards, meta.json and preview


def _b_encode_latents(work: Path, tmp: Path) -> Path:
    return _params(tmp / "b.yaml", encode_latents={"samples_per_shard": 200})  # other shards and meta.json


def _b_reference_stats(work: Path, tmp: Path) -> Path:
    shutil.rmtree(work / "models" / "feature_net")  # its input changes: another feature net, other statistics
    make_feature_net_dir(work / "models" / "feature_net", num_classes=10, seed=5)
    return _params(tmp / "b.yaml")


def _b_evaluate(work: Path, tmp: Path) -> Path:
    return _params(tmp / "b.yaml", evaluate={"seed": 7})  # other samples: other metrics and samples.png


def _b_sweep(work: Path, tmp: Path) -> Path:
    return _params(tmp / "b.yaml", sweep={"seed": 3})  # other samples: other table, metrics, plots and grids


def _b_train_feature_net(work: Path, tmp: Path) -> Path:
    return _params(tmp / "b.yaml", train_feature_net={"seed": 1})  # other weights, metrics


def _b_train_autoencoder(work: Path, tmp: Path) -> Path:
    return _params(tmp / "b.yaml", train_autoencoder={"seed": 1})  # other weights, metrics, reconstruction grid


def _b_train_classifier(work: Path, tmp: Path) -> Path:
    return _params(tmp / "b.yaml", train_classifier={"seed": 1})  # other weights and metrics


TRAINED = ("train_feature_net", "train_autoencoder", "train_classifier")


def _dvc_folders() -> list[str]:
    """Output folders as dvc.yaml declares them (DVC hashes every file inside, hidden or not)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    paths = [next(iter(o)) if isinstance(o, dict) else o
             for st in stages.values() for key in ("outs", "plots", "metrics") for o in st.get(key, [])]
    return [p for p in paths if not Path(p).suffix]


def _kill_points(renames: list[list[str]]) -> list[int]:
    """The first and the last rename, and each one that moves something out of a stage's hidden temp folder into
    place (prepare's meta.json after its shards; a folder where the file system cannot swap two names at once)."""
    out_of_temp = {int(n) for n, src, dst in renames
                   if any(p.startswith(".") for p in Path(src).parts[:-1]) and not _is_temp(dst)}
    return sorted({1, len(renames)} | out_of_temp)


def _check_old_or_new(where: str, got: dict, a_files: dict, b_files: dict, folders: list[str]) -> None:
    for rel in sorted(set(a_files) | set(b_files)):
        if rel in got:
            ok = any(rel in v and _content(rel, v[rel]) == _content(rel, got[rel]) for v in (a_files, b_files))
            assert ok, f"{where}: {rel} is neither its old nor its new version"
        else:
            assert rel not in a_files or rel not in b_files, f"{where}: {rel} is missing"
    for rel in sorted(set(got) - set(a_files) - set(b_files)):
        assert _is_temp(rel), f"{where}: {rel} is neither an output nor a hidden temporary"
        inside = [f for f in folders if rel.startswith(f + "/")]
        assert not inside, f"{where}: temporary {rel} lies inside the output folder {inside[0]}"
    for folder in folders:  # an output folder is A's or B's as a whole, never some files of each
        def part(files: dict) -> dict:
            return {rel: _content(rel, data) for rel, data in files.items() if rel.startswith(folder + "/")}

        assert part(got) in (part(a_files), part(b_files)), f"{where}: {folder}/ mixes old and new files"


def _readers_get_shards_that_match_their_meta(where: str, work: Path) -> None:
    """prepare swaps data/shards and then data/meta.json; a kill between the two must not give a reader new shards
    with the old meta: the readers' meta.json lives inside the shards folder and swaps in with it."""
    from diffusion_core.data import load_split, read_meta

    shards = work / "data" / "shards"
    meta = read_meta(shards)
    for split in ("train", "test"):
        x, y = load_split(shards, split, meta=meta, verify_checksums=True)
        assert len(y) == meta["counts"][split], where


@pytest.mark.parametrize("stage, make_b", [("prepare", _b_prepare), ("encode_latents", _b_encode_latents),
                                           ("reference_stats", _b_reference_stats), ("evaluate", _b_evaluate),
                                           ("sweep", _b_sweep),
                                           ("train_feature_net", _b_train_feature_net),
                                           ("train_autoencoder", _b_train_autoencoder),
                                           ("train_classifier", _b_train_classifier)])
def test_kill_9_at_a_rename_leaves_old_or_new_files_and_the_rerun_succeeds(stage, make_b, harness, a_states,
                                                                          tmp_path):
    a_dir = a_states[stage]
    a_files = _files(a_dir)

    full = tmp_path / "full-b"
    shutil.copytree(a_dir, full, symlinks=True)
    b_params = make_b(full, tmp_path)
    log = tmp_path / "renames.log"
    _run(harness, full, stage, b_params, log=log)
    renames = [line.split("\t") for line in log.read_text().splitlines()]
    b_files = _files(full)
    changed = {rel for rel in set(a_files) | set(b_files) if a_files.get(rel) != b_files.get(rel)}
    assert any(not rel.startswith("models/") for rel in changed), "params B must change the stage's outputs"
    assert renames and not any(_is_temp(rel) for rel in b_files), (renames, sorted(b_files))

    # one folder, killed again and again: each kill starts from the state the previous one left (the first from A)
    work, folders = tmp_path / "killed", _dvc_folders()
    shutil.copytree(a_dir, work, symlinks=True)
    make_b(work, tmp_path)
    for kill_at in _kill_points(renames):
        killed_log = tmp_path / f"renames-{kill_at}.log"
        _run(harness, work, stage, b_params, kill_at=kill_at, log=killed_log, expect=-signal.SIGKILL)
        last = killed_log.read_text().splitlines()[-1].split("\t")
        where = f"{stage} killed before rename {kill_at}/{len(renames)} ({last[1]} -> {last[2]})"
        assert int(last[0]) == kill_at and Path(last[2]).name == Path(renames[kill_at - 1][2]).name, where
        _check_old_or_new(where, _files(work), a_files, b_files, folders)
        if stage == "prepare":
            _readers_get_shards_that_match_their_meta(where, work)

    _run(harness, work, stage, b_params)  # the normal rerun
    after = _files(work)
    assert sorted(after) == sorted(b_files), f"{stage} rerun after the kills: files differ from a clean run's"
    for rel, data in after.items():
        assert _content(rel, data) == _content(rel, b_files[rel]), f"{stage} rerun after the kills: {rel} differs"
