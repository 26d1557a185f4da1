"""The whole pipeline under `dvc repro` on configs/tiny.yaml, in a scratch copy of the repo; then every output is
checked, the MLflow store must hold one run per stage and one nested run per sweep trial, and a second
`dvc repro` must have nothing to do. Slow (minutes): marked `slow`, still run in CI."""

import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from .test_no_secrets import SECRETS, assert_store_holds_no_secret_or_environment

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REPRO_TIMEOUT_S = 1800


def _outputs(stage: dict) -> list[str]:
    paths = []
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key, []):
            paths.append(next(iter(item)) if isinstance(item, dict) else item)
    return paths


def _env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(SECRETS)  # fake: no stage may log them (test_no_secrets_in_the_store_or_the_output)
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(work),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", DVC_NO_ANALYTICS="1")
    return env


def _dvc(work: Path, *args: str, timeout: int = REPRO_TIMEOUT_S) -> str:
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=work, env=_env(work),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _png_ok(path: Path) -> None:
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 8 and im.size[1] > 8, path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipeline", "diffusion_core", "configs"):
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(ROOT / "configs" / "tiny.yaml", work / "params.yaml")
    _dvc(work, "init", "--no-scm", "-q")
    log = _dvc(work, "repro")
    return work, log, yaml.safe_load((work / "dvc.yaml").read_text())["stages"]


def test_every_stage_ran_and_wrote_its_outputs(pipeline):
    work, _, stages = pipeline
    for name, stage in stages.items():
        for rel in _outputs(stage):
            p = work / rel
            assert p.exists(), f"stage {name} did not write {rel}"
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".png":
                _png_ok(p)
            elif p.is_dir():
                assert any(p.iterdir()), f"{rel} is empty"
    meta = json.loads((work / "data/meta.json").read_text())
    assert sorted(meta["shards"]) == ["test", "train"]
    assert any((work / "data/shards").glob("*.tar"))
    for model in ("diffusion", "classifier", "feature_net"):
        assert (work / "models" / model / "config.json").is_file()


def test_reference_stats(pipeline):
    work, _, _ = pipeline
    with np.load(work / "data/reference/reference-domain.npz") as z:
        d = z["mu"].shape[0]
        assert z["sigma"].shape == (d, d) and z["features"].shape[1] == d
    assert not (work / "data/reference/reference-inception.npz").exists()  # no weights offline: skipped


def test_sweep_outputs(pipeline):
    work, _, _ = pipeline
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_params
    from pipeline.grid import sampling_trials

    sw = load_params(work / "params.yaml", ["sweep"]).sweep
    T = load_params(work / "params.yaml", ["schedule"]).schedule.num_timesteps
    trials = sampling_trials(sw.sampling, sw.num_samples, T, sw.spacing, sw.seed_sets)
    n_sampling = len(trials)
    n_training = len(sw.training.schedules) * len(sw.training.parameterizations)
    with open(work / "reports/sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_sampling + n_training
    assert sum(r["axis"] == "training" for r in rows) == n_training
    for r in rows:
        assert float(r["fd_domain"]) >= 0 and float(r["nfe"]) > 0 and float(r["wall_seconds"]) > 0
        assert 0 <= float(r["precision_domain"]) <= 1 and 0 <= float(r["recall_domain"]) <= 1
        if r["guidance"] in ("cfg", "classifier"):
            assert 0 <= float(r["class_accuracy"]) <= 1
        if r["axis"] == "training" and r["status"] == "completed":
            # tiny is a class-conditional pixel model trained with label dropout: both bounds, each its own name
            assert float(r["nll_bpd_given_class"]) > 0 and float(r["nll_bpd"]) > 0
    for name in ("fd_vs_nfe", "guidance", "precision_recall", "training"):
        _png_ok(work / "reports/sweep" / f"{name}.png")
    samplers = {r["sampler"] for r in rows if r["axis"] == "sampling"}
    grids = list((work / "reports/sweep").glob("grid_*.png"))
    assert {g.name.split("_")[1] for g in grids} == samplers
    summary = json.loads((work / "metrics/sweep.json").read_text())
    assert set(summary["best"]) == samplers and summary["num_trials"] == len(rows)
    # the per-setting table: each setting's mean over its seed sets, recomputed here from the trial rows
    with open(work / "reports/sweep_summary.csv") as f:
        settings = {r["setting"]: r for r in csv.DictReader(f)}
    sampled = [r for r in rows if r["axis"] == "sampling"]
    assert set(settings) == {r["setting"] for r in sampled} and summary["num_settings"] == len(settings)
    for name, s in settings.items():
        fds = [float(r["fd_domain"]) for r in sampled if r["setting"] == name]
        assert int(s["seed_sets"]) == len(fds) and float(s["fd_domain"]) == pytest.approx(np.mean(fds), rel=1e-5)
    # selected: the lowest mean fd_domain under the rule
    sel, rule = summary["selected"], sw.select
    ok = [s for s in settings.values() if int(s["num_samples"]) == sw.num_samples
          and int(s["seed_sets"]) >= sw.seed_sets and float(s["nfe"]) <= rule.max_nfe + 1e-9]
    assert sel["setting"] == min(ok, key=lambda s: float(s["fd_domain"]))["setting"]
    assert len(sel["trials"]) == sw.seed_sets


def test_evaluate_outputs(pipeline):
    work, _, _ = pipeline
    m = json.loads((work / "reports/metrics.json").read_text())
    for key in ("fd_domain", "kd_domain", "precision_domain", "recall_domain", "class_accuracy", "nll_bpd",
                "nll_bpd_given_class", "nfe", "num_samples"):
        assert isinstance(m[key], (int, float)), key
    assert "fid_inception" not in m and "kid_inception" not in m  # skipped without weights, not faked
    params = yaml.safe_load((work / "params.yaml").read_text())["evaluate"]
    assert m["num_samples"] == params["num_samples"]
    used = json.loads((work / "reports/evaluate_setting.json").read_text())
    sel = json.loads((work / "metrics/sweep.json").read_text())["selected"]
    assert used["source"] == "sweep" and used["sweep_setting"] == sel["setting"]
    assert (used["sampler"], used["steps"]) == (sel["sampler"], sel["steps"]) and used["sweep_trials"] == sel["trials"]
    _png_ok(work / "reports/samples.png")


def test_mlflow_holds_one_run_per_stage_and_one_nested_run_per_trial(pipeline):
    work, _, stages = pipeline
    db = sqlite3.connect(work / "mlflow.db")
    runs = db.execute("SELECT run_uuid, name, status FROM runs").fetchall()
    parents = dict(db.execute("SELECT run_uuid, value FROM tags WHERE key = 'mlflow.parentRunId'").fetchall())
    top = [(uid, name, status) for uid, name, status in runs if uid not in parents]
    assert sorted(name for _, name, _ in top) == sorted(stages), "one MLflow run per stage"
    assert all(status == "FINISHED" for *_, status in top)
    sweep_id = next(uid for uid, name, _ in top if name == "sweep")
    with open(work / "reports/sweep.csv") as f:
        trials = {r["trial"] for r in csv.DictReader(f)}
    nested = [name for uid, name, _ in runs if parents.get(uid) == sweep_id]
    assert sorted(nested) == sorted(f"sweep/{t}" for t in trials)
    assert len(parents) == len(nested), "nested runs only under the sweep"


def test_second_repro_is_a_no_op(pipeline):
    work, _, _ = pipeline
    out = _dvc(work, "repro", timeout=300)
    assert "Running stage" not in out
    assert "up to date" in out.lower()


def test_no_secrets_in_the_store_or_the_output(pipeline):
    """Every stage ran with fake secrets in its environment (Ray workers inherit it): none reached the MLflow store
    (any run's params, tags, any byte of mlflow.db, any artifact) or dvc's output."""
    work, log, _ = pipeline
    for secret in SECRETS.values():
        assert secret not in log
    assert_store_holds_no_secret_or_environment(work, list(SECRETS.values()))


# Ray's own chatter seen in a default `make repro` (issue #15): the Train placement-group cleaner polling a State API
# that a dashboard-less local Ray does not have (546 lines), one INFO line per ray.train.report of every rank, the
# preemption watcher's set-up error; and the rank-0 worker's lines printed twice (Train's print patch)
RAY_NOISE = ("Failed to query Ray Train Controller", "Reporting training result", "has constructor arguments in the")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_console_is_quiet(pipeline):
    """No known Ray noise line, and no line from a Ray process said twice (progress bars aside)."""
    _, log, _ = pipeline
    lines = [ANSI.sub("", ln).strip() for ln in log.replace("\r", "\n").splitlines()]
    noise = [ln for ln in lines if any(n in ln for n in RAY_NOISE)]
    assert not noise, f"{len(noise)} Ray noise lines, e.g. {noise[0]}"
    from_ray = [ln for ln in lines if re.match(r"^\(\w+ pid=\d+", ln) and not re.search(r"\d+%\|", ln)]
    repeated = sorted({ln for ln in from_ray if from_ray.count(ln) > 1})
    at = lines.index(repeated[0]) if repeated else 0
    assert not repeated, f"said more than once: {repeated[:3]}; around the first:\n" + "\n".join(lines[at - 15:at + 5])
    assert not [ln for ln in lines if "Traceback (most recent call last)" in ln], "a traceback on the console"
