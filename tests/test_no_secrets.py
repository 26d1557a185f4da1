"""No secrets and no environment in MLflow (safety): real stage runs with fake secrets in their environment
(and, for prepare, a credential inside a params URI); afterwards none appears anywhere in the MLflow store (params,
tags, any byte of the SQLite file, any artifact) nor in the stage's output, and no param or tag is an environment
variable. `prepare` and `train_diffusion` (in-process, its artifacts include sample grids) are run here; every
other stage (train_classifier and the sweep in Ray workers, evaluate, ...) is checked the same way on the whole
tiny pipeline in tests/test_pipeline_e2e.py, whose `dvc repro` runs with these secrets in its environment."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from . import zygote
from .stages import TINY, stage_env

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-7f3a9c",
    "HF_TOKEN": "hf_fakeTokenValue12345",
    "MY_API_KEY": "sk-fake-api-key-5b1e",
    "DATABASE_PASSWORD": "fake-db-pass-0d2c",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pass-91aa",  # MLflow's own basic-auth variable
}
URI_PASSWORD = "hunter2-in-a-uri"


def _run(tmp_path: Path, stage: str, raw: dict) -> subprocess.CompletedProcess:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    env = stage_env(**SECRETS, OMP_NUM_THREADS="1")
    res = zygote.run([sys.executable, "-m", f"pipeline.{stage}", "--params", "p.yaml"], cwd=tmp_path, env=env,
                     timeout=900)
    assert res.returncode == 0, res.stderr
    return res


def assert_store_holds_no_secret_or_environment(folder: Path, secrets: list[str]) -> None:
    """Over every run in `folder`'s MLflow store (mlflow.db, mlartifacts/): no param or tag is an environment
    variable or holds an environment value, and no secret is in any byte of the SQLite file or any artifact."""
    db = folder / "mlflow.db"
    with sqlite3.connect(db) as con:
        pairs = con.execute("select key, value from params union all select key, value from tags").fetchall()
    assert pairs
    # PWD/OLDPWD are the shell's last folders: a path a run may name for its own reasons (the git remote of a local
    # clone is one), not an environment dump
    env_values = {v for k, v in os.environ.items() if len(v) >= 8 and k not in ("PWD", "OLDPWD")}
    env_values |= set(SECRETS.values())
    for k, v in pairs:
        assert k not in os.environ and k not in SECRETS, k
        assert v not in env_values or v in (os.environ.get("USER"), os.environ.get("LOGNAME")), (k, v)
    artifacts = [p for p in (folder / "mlartifacts").rglob("*") if p.is_file()]
    blobs = [db.read_bytes()] + [p.read_bytes() for p in artifacts]
    for s in secrets:
        assert not any(s.encode() in b for b in blobs), s


def _assert_no_secret_and_no_environment(tmp_path: Path, res: subprocess.CompletedProcess, stage: str,
                                         sections: set[str], secrets: list[str]) -> dict[str, str]:
    """The checks on one stage's run; returns its params as MLflow stored them."""
    for s in secrets:
        assert s not in res.stdout and s not in res.stderr
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        params = dict(con.execute("select key, value from params").fetchall())
        assert [r[0] for r in con.execute("select name from runs")] == [stage]
    # params are the stage's sections only
    assert params and all(k.split(".")[0] in sections for k in params), sorted(params)
    assert_store_holds_no_secret_or_environment(tmp_path, secrets)
    return params


@pytest.mark.slow
def test_prepare_logs_no_secret_and_no_environment_to_mlflow(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"].update(enabled=True, tracking_uri=None)
    raw["prepare"]["data_dir"] = f"s3://bob:{URI_PASSWORD}@bucket/raw"  # digits ignores data_dir; it is still logged
    res = _run(tmp_path, "prepare", raw)
    params = _assert_no_secret_and_no_environment(tmp_path, res, "prepare", {"project", "prepare"},
                                                  [*SECRETS.values(), URI_PASSWORD])
    # the credential in the URI is redacted, the rest of the value kept
    assert params["prepare.data_dir"] == "s3://***@bucket/raw"


@pytest.mark.slow
def test_train_diffusion_logs_no_secret_and_no_environment_to_mlflow(prepared, tmp_path):
    """The stage Ray trains (here in-process, one worker: the same start_run/flatten_params path), 10 steps with a
    sample grid logged at step 5 and at the end, so the store holds metrics, params and image artifacts."""
    shutil.copytree(prepared / "data", tmp_path / "data")
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"].update(enabled=True, tracking_uri=None)
    raw["train_diffusion"].update(steps=10, checkpoint_every=5, log_every=5, sample_every=5)
    raw["train_diffusion"]["scaling"].update(num_workers=1, use_ray=False)
    res = _run(tmp_path, "train_diffusion", raw)
    params = _assert_no_secret_and_no_environment(
        tmp_path, res, "train_diffusion", {"project", "data", "schedule", "diffusion", "train_diffusion"},
        list(SECRETS.values()))
    assert params["train_diffusion.steps"] == "10"  # the stage's own params did reach the store
    pngs = sorted(p.name for p in (tmp_path / "mlartifacts").rglob("*.png"))
    assert pngs == ["step-00000005.png", "step-00000010.png"], pngs  # the artifacts checked above exist
