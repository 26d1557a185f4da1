"""MLflow tracking: runs in a temp SQLite store, a real server over HTTP, unreachable servers fail fast."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import TrackingConfig
from pipeline.tracking import NullRun, TrackingError, flatten_params, start_run

from .stages import ROOT, group_pids, listening_ips, params_raw, stage_env

TRACKING = params_raw()["tracking"]  # enabled, the local store, no fallback
PARAMS = {"project": {"name": "t", "experiment": "exp-test", "seed": 0},
          "prepare": {"dataset": "digits", "test_fraction": 0.2}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(request, tmp_path_factory):
    """Start the real server at module start (it needs ~20 s to become healthy) so it boots while other tests run."""
    if not any(item.name == "test_prepare_against_real_mlflow_server" for item in request.session.items):
        yield None
        return
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    assigned, argv = readme_mlflow_command(port)
    env = stage_env(**assigned)
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    yield {"url": f"http://127.0.0.1:{port}", "tmp": tmp, "env": env, "pid": proc.pid}
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def readme_mlflow_command(port: int) -> tuple[dict[str, str], list[str]]:
    """The README's `mlflow ui ...` line as (its VAR=value assignments, argv), on another port (its store,
    sqlite:///mlflow.db, is relative)."""
    words = next(shlex.split(ln) for ln in (ROOT / "README.md").read_text().splitlines()
                 if "mlflow ui " in ln and not ln.lstrip().startswith(("#", "`")))
    at = words.index("mlflow")
    assigned = dict(w.split("=", 1) for w in words[:at])
    argv = words[at:]
    argv[argv.index("--port") + 1] = str(port)
    return assigned, argv


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlflow")  # one SQLite store: creating its schema takes seconds


@pytest.fixture
def store(shared_dir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(shared_dir)
    return shared_dir


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_run_logged_to_sqlite_and_read_back(store):
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with start_run("prepare", PARAMS, TrackingConfig(**TRACKING)) as run:
        assert run.active and run.tracking_uri == uri
        run.log_metrics({"loss": 0.5}, step=1)
        run.log_metrics({"loss": 0.25}, step=2)
        run.log_image(np.zeros((8, 8, 1), np.uint8), "grid.png")
        (store / "f.json").write_text("{}")
        run.log_artifact(store / "f.json")
    r = _client(uri).get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == "prepare"
    assert r.data.tags["stage"] == "prepare" and len(r.data.tags["params_hash"]) == 16 and "git_commit" in r.data.tags
    assert r.data.params["prepare.dataset"] == "digits" and r.data.params["project.seed"] == "0"
    assert [m.value for m in _client(uri).get_metric_history(run.run_id, "loss")] == [0.5, 0.25]
    assert {a.path for a in _client(uri).list_artifacts(run.run_id)} == {"grid.png", "f.json"}
    assert _client(uri).get_experiment(r.info.experiment_id).name == "exp-test"
    assert not any(k.upper() in os.environ for k in r.data.params)  # no environment in params


def test_exception_marks_run_failed(store):
    with pytest.raises(ValueError):
        with start_run("train", PARAMS, TrackingConfig(**TRACKING)) as run:
            raise ValueError("boom")
    assert _client(f"sqlite:///{store / 'mlflow.db'}").get_run(run.run_id).info.status == "FAILED"


def test_runs_in_one_process_follow_their_own_folder(store, tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a second stage run from another folder in the same
    process (a notebook, a test session) must still log to its own folder's store, not the first one's."""
    with start_run("prepare", PARAMS, TrackingConfig(**TRACKING)):
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    with start_run("prepare", PARAMS, TrackingConfig(**TRACKING)) as run:
        assert run.tracking_uri == f"sqlite:///{other / 'mlflow.db'}"
    assert _client(run.tracking_uri).get_run(run.run_id).info.status == "FINISHED"


def test_disabled_and_nonzero_rank_are_noops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cfg, rank in ((TrackingConfig(**{**TRACKING, "enabled": False}), 0), (TrackingConfig(**TRACKING), 1)):
        with start_run("prepare", PARAMS, cfg, rank=rank) as run:
            assert isinstance(run, NullRun) and not run.active
            run.log_metrics({"x": 1.0}, step=0)
            run.log_image(np.zeros((4, 4), np.uint8), "a.png")
    assert not (tmp_path / "mlflow.db").exists()


def test_secrets_redacted():
    flat = flatten_params({"a": {"api_token": "s3cr3t", "uri": "http://bob:pw@host:5000", "n": None}})
    assert flat == {"a.api_token": "***", "a.uri": "http://***@host:5000", "a.n": "null"}


@pytest.mark.slow  # a fresh interpreter that creates an MLflow store: make test, not the inner loop
def test_a_token_in_the_git_remote_does_not_reach_the_store(tmp_path):
    """A clone whose origin URL carries a token (as CI checkouts often do), a stage entry point inside it: MLflow's
    own repoURL tag keeps the host and path (MLflow drops the credentials itself; this pins that), and the token is
    in no byte of the store. A fresh process: MLflow caches the git context of the first run in a process."""
    token = "ghp_fakeToken0123456789"
    repo = tmp_path / "clone"
    repo.mkdir()
    (repo / "main.py").write_text(
        "from pipeline.config import TrackingConfig\nfrom pipeline.tracking import start_run\n"
        f"with start_run('prepare', {PARAMS!r}, TrackingConfig(**{TRACKING!r})) as run:\n    print(run.run_id)\n")
    for cmd in (["init", "-q"], ["remote", "add", "origin", f"https://x-access-token:{token}@github.com/o/r.git"],
                ["add", "main.py"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)
    res = subprocess.run([sys.executable, "main.py"], cwd=repo, env=stage_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    tags = _client(f"sqlite:///{repo / 'mlflow.db'}").get_run(res.stdout.split()[-1]).data.tags
    url = tags["mlflow.source.git.repoURL"]
    assert url.endswith("github.com/o/r.git") and token not in url, url
    assert token.encode() not in (repo / "mlflow.db").read_bytes()


def test_unreachable_server_fails_fast_or_falls_back(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as e:
        with start_run("prepare", PARAMS, TrackingConfig(**TRACKING)):
            pass
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)
    with start_run("prepare", PARAMS, TrackingConfig(**{**TRACKING, "fallback_local": True})) as run:
        run.log_metrics({"x": 1.0})
    assert run.tracking_uri.startswith("sqlite:///") and (store / "mlflow.db").exists()


@pytest.mark.slow
def test_prepare_against_real_mlflow_server(tmp_path, mlflow_server):
    base, env = mlflow_server["url"], mlflow_server["env"]
    for _ in range(240):
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail("mlflow server did not become healthy in 120 s")
    # the README's own command, running: it listens on the loopback address only
    assert listening_ips(group_pids(mlflow_server["pid"])) == {"127.0.0.1"}
    work = tmp_path / "work"
    work.mkdir()
    env_stage = {**env, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": base}
    res = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(ROOT / "configs/tiny.yaml")],
                         cwd=work, env=env_stage, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert not (work / "mlflow.db").exists()

    def post(path, body):
        req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    exp = json.load(urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name"
                                           "?experiment_name=diffusion-tiny", timeout=30))
    runs = post("/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment"]["experiment_id"]]})["runs"]
    assert len(runs) == 1
    info, data = runs[0]["info"], runs[0]["data"]
    assert info["run_name"] == "prepare" and info["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in data["tags"]}
    params = {p["key"]: p["value"] for p in data["params"]}
    metrics = {m["key"]: m["value"] for m in data["metrics"]}
    assert tags["stage"] == "prepare" and params["prepare.dataset"] == "digits"
    assert metrics["train_count"] + metrics["test_count"] == 1797


_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from pipeline.config import TrackingConfig
from pipeline.tracking import start_run
from pipeline._stage import run_stage

def body(_args=None):
    with start_run("killable", {{"project": {{"experiment": "exp-test"}}}}, TrackingConfig(**{tracking!r})) as run:
        print("run", run.run_id, flush=True)
        if {how!r} == "kill -9":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)

sys.exit(run_stage("killable", body, []) if {how!r} == "stage" else body())
"""


def _child_run(store: Path, how: str) -> tuple[subprocess.Popen, str]:
    """A process holding an open run of stage 'killable' in `store` (how: 'kill -9' kills itself inside the run,
    'alive' sleeps in it, 'stage' sleeps in it under run_stage); returns it and its run id."""
    code = _CHILD.format(root=str(ROOT), how=how, tracking=TRACKING)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=store, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:  # after a line of start_run's own when it closed a dead run
        if line.startswith("run "):
            return proc, line.split()[1]
    raise AssertionError(proc.stderr.read()[-2000:])


def test_a_run_whose_process_died_is_marked_killed_by_the_next_run_of_its_stage(store):
    """kill -9 inside a run leaves it RUNNING in the store; the next run of that stage marks it KILLED (with the
    reason) and, when it resumes that work, names it; a run whose process is alive is left RUNNING."""
    alive, alive_id = _child_run(store, "alive")
    try:
        dead, dead_id = _child_run(store, "kill -9")
        assert dead.wait(timeout=60) == -signal.SIGKILL
        client = _client(f"sqlite:///{store / 'mlflow.db'}")
        assert client.get_run(dead_id).info.status == "RUNNING"  # what kill -9 leaves behind
        with start_run("killable", PARAMS, TrackingConfig(**TRACKING), continues=dead_id) as run:
            pass
        killed = client.get_run(dead_id)
        assert killed.info.status == "KILLED" and "ended without closing" in killed.data.tags["killed_reason"]
        assert killed.info.end_time is not None
        assert client.get_run(alive_id).info.status == "RUNNING"
        new = client.get_run(run.run_id)
        assert new.info.status == "FINISHED" and new.data.tags["continues_run"] == dead_id
        assert new.data.tags["owner"].startswith(f"{socket.gethostname()}:{os.getpid()}@")
    finally:
        alive.kill()
        alive.wait()


def test_sigterm_to_a_stage_closes_its_run_as_killed(store):
    proc, run_id = _child_run(store, "stage")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert "error: killable interrupted by SIGTERM" in proc.stderr.read()
    assert _client(f"sqlite:///{store / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
