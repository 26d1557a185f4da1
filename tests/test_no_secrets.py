"""No secrets and no environment in MLflow (issue 7, safety): a real stage run with fake secrets in its environment
and a credential inside a params URI; afterwards neither appears anywhere in the MLflow store (params, tags, any
byte of the SQLite file, any artifact) nor in the stage's output, and no param or tag is an environment variable."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-7f3a9c",
    "HF_TOKEN": "hf_fakeTokenValue12345",
    "MY_API_KEY": "sk-fake-api-key-5b1e",
    "DATABASE_PASSWORD": "fake-db-pass-0d2c",
    "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pass-91aa",  # MLflow's own basic-auth variable
}
URI_PASSWORD = "hunter2-in-a-uri"


@pytest.mark.slow
def test_prepare_logs_no_secret_and_no_environment_to_mlflow(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"].update(enabled=True, tracking_uri=None)
    raw["prepare"]["data_dir"] = f"s3://bob:{URI_PASSWORD}@bucket/raw"  # digits ignores data_dir; it is still logged
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env.update(SECRETS, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", "p.yaml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr

    secrets = [*SECRETS.values(), URI_PASSWORD]
    for s in secrets:
        assert s not in res.stdout and s not in res.stderr

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        params = dict(con.execute("select key, value from params").fetchall())
        tags = dict(con.execute("select key, value from tags").fetchall())
        assert [r[0] for r in con.execute("select name from runs")] == ["prepare"]
    # the credential in the URI is redacted, the rest of the value kept
    assert params["prepare.data_dir"] == "s3://***@bucket/raw"
    # params are the stage's sections only: no environment variable names, no env values
    assert all(k.split(".")[0] in ("project", "prepare") for k in params), sorted(params)
    env_values = {v for k, v in os.environ.items() if len(v) >= 8} | set(SECRETS.values())
    for k, v in {**params, **tags}.items():
        assert k not in os.environ and k not in SECRETS, k
        assert v not in env_values or v in (os.environ.get("USER"), os.environ.get("LOGNAME")), (k, v)
    # and no secret anywhere in the store: every byte of the SQLite file and every artifact
    blobs = [db.read_bytes()] + [p.read_bytes() for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()]
    for s in secrets:
        assert not any(s.encode() in b for b in blobs), s
