"""Beyond one disk: train_diffusion with its storage root on an S3 server (moto's, on 127.0.0.1).

Ray Train persists its checkpoints under <root>/ray_results, so a worker group restarted after a lost worker
resumes from the store, not from a disk only the dead worker's node could read; the finished model is published
as <root>/models/diffusion and is bitwise the model of the same run without the kill. Two versions: one Ray
node losing a worker and then the whole job, run again on another machine (a fresh workspace: only the store has
the checkpoints); and a 2-node cluster (tests/ray_cluster.py, Ray's own test cluster, token authentication on)
losing its second node, with the stage submitted by `ray job submit`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_core.checkpoint import load_model_dir

from . import zygote
from .stages import ROOT, dashboard_answers, ray_token_env, stage_env
from .test_train_diffusion import _cmd, _steps, _wait_for, _workdir

pytestmark = pytest.mark.slow


def _stage(cwd, env) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pipeline.train_diffusion", "--params", "tiny.yaml"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


# a look at the store lists it on the S3 server, which runs in this test's process: a costly poll
STORE_POLL_S = 0.5
JOB_POLL_S = 2.0  # `ray job status` is a new Python process each time, importing Ray


def _ray_checkpoints(bucket_path: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    try:
        return [p for p in fs.find(bucket_path) if p.endswith("/config.json") and "/step-" in p]
    except FileNotFoundError:
        return []


def _complete_steps(bucket_path: str) -> list[int]:
    """Steps of the checkpoints on the store whose every file listed in config.json's checksums is there with that
    sha256: an upload the kill cut short (config.json written, a weights file missing or partial) is not one."""
    import hashlib
    import json

    import s3fs

    fs, steps = s3fs.S3FileSystem(skip_instance_cache=True), []
    for config_path in _ray_checkpoints(bucket_path):
        folder = config_path.rsplit("/", 1)[0]
        try:
            checksums = json.loads(fs.cat(config_path))["checksums"]
            complete = all(hashlib.sha256(fs.cat(f"{folder}/{name}")).hexdigest() == digest
                           for name, digest in checksums.items())
        except (FileNotFoundError, ValueError, KeyError):
            complete = False
        if complete:
            steps.append(int(folder.split("/step-")[1][:8]))
    return steps


RESTART_LINE = "workers restarted by Ray; resuming from its checkpoint at step"
TRAIN_80 = {"steps": 80, "checkpoint_every": 10, "log_every": 5, "sample_every": 0}


def _unkilled(prepared, dest: Path, train: dict) -> Path:
    """models/diffusion of the same training on one node without a kill (and without a storage root: where the
    files go changes no weight)."""
    clean = _workdir(prepared, dest, **train)
    proc, lines = _stage(clean, stage_env())
    assert proc.wait(timeout=900) == 0, "".join(lines)[-3000:]
    return clean / "models/diffusion"


@pytest.fixture(scope="module")
def unkilled_80(prepared, tmp_path_factory) -> Path:
    return _unkilled(prepared, tmp_path_factory.mktemp("clean80"), TRAIN_80)


def _assert_same_model(url: str, unkilled: Path, tmp_path: Path, sample: bool = False) -> None:
    """The model pulled back by URL is the unkilled run's, bit for bit."""
    killed, _ = load_model_dir(url)
    clean, _ = load_model_dir(unkilled)
    a, b = killed.state_dict(), clean.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if sample:  # ... so the user's `diffusion sample --model <url>` draws the same images from both
        images = []
        for model in (url, str(unkilled)):
            out = tmp_path / f"samples-{len(images)}"
            res = zygote.run([sys.executable, "-m", "pipeline.cli", "sample", "--model", model, "--num", "4",
                              "--steps", "5", "--seed", "3", "--out", str(out), "--no-progress"], cwd=ROOT,
                             env=stage_env(), timeout=900)
            assert res.returncode == 0, res.stderr[-2000:]
            with np.load(out / "samples.npz") as z:
                images.append(z["images"])
        assert np.array_equal(*images)


def _kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 of every process of a run at once, Ray's own included (they are not all in the stage's group)."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=60)
    proc.wait()


def test_a_lost_worker_then_a_lost_job_resume_from_the_store_and_end_bitwise_as_unkilled(s3, prepared, tmp_path,
                                                                                       unkilled_80):
    """One Ray node, the storage root on S3, two DDP workers, MLflow on a store both runs share.

    1. A worker is killed once Ray has checkpoints on the store, and the disk rank 0 wrote its checkpoints to is
       wiped (a node gone): Ray restarts the group inside the same run, which resumes from the store.
    2. Once the restarted group has put a checkpoint of its own on the store, kill -9 of the whole stage (driver,
       its Ray and workers: a job lost with its cluster).
    3. The same stage run again in a fresh workspace (another machine: no local checkpoints) resumes from the
       newest complete checkpoint on the store and finishes: one gap-free loss curve, the two workers read disjoint
       equal halves of the data and end with identical weights, the model published to the store is bitwise the
       unkilled run's, the lost run's checkpoints are gone from the store, nothing is left in the workspace, and
       MLflow holds no run left RUNNING, the finished one naming the run it continues."""
    import psutil

    env = {**stage_env(), "DIFFUSION_STORAGE_ROOT": f"{s3}/killed",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    store = f"{s3.removeprefix('s3://')}/killed/ray_results"
    cwd = _workdir(prepared, tmp_path / "lost", tracking=True, **TRAIN_80)
    proc, lines = _stage(cwd, env)
    first_pid = proc.pid
    try:
        # Ray commits a checkpoint once every rank has reported it: a second one on the store means the first is
        _wait_for(lambda: len(_ray_checkpoints(store)) >= 2, proc, "two Ray checkpoints on the store",
                  every=STORE_POLL_S)
        on_store = min(int(p.split("/step-")[1][:8]) for p in _ray_checkpoints(store))
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in _cmd(p)]
        assert len(workers) == 2
        # with a storage root the workers work in a scratch folder of their node, not in the driver's folder
        scratch = Path(workers[0].cwd())
        assert scratch.parent.name == "diffusion-pipeline" and (scratch / "checkpoints").is_dir(), scratch
        workers[-1].kill()  # a lost worker: Ray restarts the group inside the same run
        # ... and with it the disk rank 0 wrote its checkpoints to (a node gone): once the surviving worker is
        # down too (it could still write one), only the store has them when the new group looks
        psutil.wait_procs(workers[:1], timeout=120)
        shutil.rmtree(scratch / "checkpoints")

        def restarted_at() -> int | None:
            line = next((ln for ln in list(lines) if RESTART_LINE in ln), None)
            return None if line is None else int(line.split("at step ")[1].split()[0])

        _wait_for(lambda: restarted_at() is not None, proc, "the restarted group's resume line")
        resumed_at = restarted_at()
        assert resumed_at >= on_store
        _wait_for(lambda: max(_complete_steps(store), default=0) > resumed_at, proc,
                  "a checkpoint of the restarted group on the store", every=STORE_POLL_S)
    finally:
        _kill_tree(proc)
    first = "".join(lines)
    restarts = [ln for ln in lines if RESTART_LINE in ln]
    assert len(restarts) == 1 and f"({s3}/killed/ray_results)" in restarts[0], \
        "".join(ln for ln in lines if "TrainController" not in ln)[-4000:]
    assert f"uploaded data/shards/ to {s3}/killed/data/shards-" in first
    newest = max(_complete_steps(store))  # a checkpoint the kill cut short mid-upload is rightly skipped
    assert newest < 80

    cwd = _workdir(prepared, tmp_path / "again", tracking=True, **TRAIN_80)
    proc, lines = _stage(cwd, env)
    assert proc.wait(timeout=900) == 0, "".join(lines)[-3000:]
    out = "".join(lines)
    resumed = re.search(rf"train_diffusion: resuming from {s3}/killed/ray_results/train_diffusion-\S+/step-(\d+) "
                        rf"\(step (\d+) of 80\)", out)
    assert resumed and int(resumed[2]) == newest, out[-3000:]
    assert _steps(cwd) == list(range(5, 81, 5))  # one loss curve over three worker groups: nothing repeated or lost
    assert f"published models/diffusion/ to {s3}/killed/models/diffusion" in out
    # the outputs came back into the driver's workspace through the store, and nothing else is left behind
    assert (cwd / "models/diffusion/config.json").is_file() and (cwd / "metrics/train_diffusion.json").is_file()
    assert not (cwd / "checkpoints").exists()
    # the scratch folders are named for their run (the lost run's is left: its node is gone in earnest)
    assert scratch.name.endswith(f"-{first_pid}") and scratch.exists()
    assert not list(scratch.parents[2].glob(f"session_*/diffusion-pipeline/*-{proc.pid}")), "a scratch folder is left"
    assert not _ray_checkpoints(store), "the lost run's checkpoints are left on the store"

    workers = json.loads((cwd / "reports" / "train_diffusion_workers.json").read_text())
    assert [w["rank"] for w in workers] == [0, 1]
    keys0, keys1 = set(workers[0]["keys"]), set(workers[1]["keys"])
    assert len(keys0) == len(keys1) == 1438 // 2 and not keys0 & keys1  # DDP: disjoint halves of the data
    assert workers[0]["weights_sha256"] == workers[1]["weights_sha256"]  # ... and identical replicas

    # MLflow's history stays honest: no run left RUNNING by the kills; the finished run names the run it continues
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs = dict(db.execute("SELECT run_uuid, status FROM runs"))
        continues = dict(db.execute("SELECT run_uuid, value FROM tags WHERE key = 'continues_run'"))
    finished = [r for r, status in runs.items() if status == "FINISHED"]
    assert len(finished) == 1 and continues.get(finished[0]) in runs
    # the lost job's run: KILLED by the next run, or FAILED when the lost peer raised in rank 0 first (both
    # honest; RUNNING is not)
    assert {runs[r] for r in runs if r not in finished} <= {"KILLED", "FAILED"} and len(runs) >= 2

    _assert_same_model(f"{s3}/killed/models/diffusion", unkilled_80, tmp_path)


def test_two_node_cluster_under_ray_job_submit_a_node_lost_mid_run_resumes_on_a_new_node(s3, prepared, tmp_path,
                                                                                          unkilled_80):
    """Two Ray nodes on this machine (tests/ray_cluster.py: a head with its dashboard and a second raylet, 1 CPU
    each, so the two Train workers land one per node; token authentication on), the stage submitted with
    `ray job submit` as README's cluster walkthrough does. The second node is killed mid-run (its raylet and
    workers, no graceful stop) and a third joins, as an autoscaler would bring one: the job goes on from the
    checkpoint on the store, ends at its step count with one loss curve, and the model the user pulls back by URL
    is bitwise the model of the same run on one node without the kill."""
    import secrets

    from .test_train_diffusion import _free_port

    ray_env = ray_token_env()
    token = ray_env["RAY_AUTH_TOKEN"]
    train = TRAIN_80  # killed at its second checkpoint on the store (step 20): six more are to come
    dash = _free_port()
    cluster = subprocess.Popen([sys.executable, "-m", "tests.ray_cluster", "--dashboard-port", str(dash),
                                "--agent-port", str(_free_port())], cwd=ROOT, env=ray_env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    api = f"http://127.0.0.1:{dash}"

    def tell(cmd: str) -> None:
        cluster.stdin.write(cmd + "\n")
        cluster.stdin.flush()
        assert cluster.stdout.readline().strip() == "ok", f"the test cluster failed at {cmd!r}"

    def ray_job(command: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["ray", "job", command, "--address", api, *args], cwd=job_dir, env=ray_env,
                              capture_output=True, text=True, timeout=timeout)

    job_dir = _workdir(prepared, tmp_path / "two", **train)
    for pkg in ("diffusion_core", "pipeline"):  # the working dir ray uploads holds the code, as the repo root does
        shutil.copytree(ROOT / pkg, job_dir / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    job_id = f"two-node-{secrets.token_hex(4)}"
    try:
        started = cluster.stdout.readline().split()
        assert started, "the test cluster did not start"
        head_dir = Path(started[1])
        _wait_for_dashboard(api, token)
        env_vars = json.dumps({"env_vars": {"DIFFUSION_STORAGE_ROOT": f"{s3}/two"}})
        # the stage, then its loss curve onto the job's log: the job's outputs stay in its working dir on the head
        entry = ("python -m pipeline.train_diffusion --params tiny.yaml --debug && "
                 "python -c \"import json; print('CURVE', json.dumps(json.load(open("
                 "'reports/train_diffusion_loss.json'))))\"")
        deadline = time.time() + 300  # the dashboard answers before its job agent is up ("No available agent")
        while True:
            res = ray_job("submit", "--no-wait", "--submission-id", job_id, "--working-dir", ".",
                          "--runtime-env-json", env_vars, "--", "bash", "-c", entry)
            if res.returncode == 0 or "No available agent" not in res.stderr or time.time() > deadline:
                break
            time.sleep(2)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        store = f"{s3.removeprefix('s3://')}/two/ray_results"
        _wait_until(lambda: len(_ray_checkpoints(store)) >= 2, lambda: _job_status(ray_job, job_id),
                    "two Ray checkpoints on the store", logs=lambda: ray_job("logs", job_id).stdout, every=STORE_POLL_S)
        on_store = min(int(p.split("/step-")[1][:8]) for p in _ray_checkpoints(store))
        tell("kill")  # the node is gone: its raylet and the worker on it
        # ... and so are the checkpoints rank 0 keeps on its node (pipeline/workspace.py), if it ran on the head
        for local in head_dir.glob("session_*/diffusion-pipeline/train_diffusion-*/checkpoints"):
            shutil.rmtree(local, ignore_errors=True)
        tell("add")  # a replacement joins; the group is placed again across both nodes
        _wait_until(lambda: _job_status(ray_job, job_id) in ("SUCCEEDED", "FAILED", "STOPPED"), lambda: "RUNNING",
                    "the end of the job", timeout=900, every=JOB_POLL_S)
        logs = ray_job("logs", job_id).stdout
        assert _job_status(ray_job, job_id) == "SUCCEEDED", logs[-3000:]
    finally:
        try:
            tell("stop")
            cluster.wait(60)
        except Exception:  # noqa: BLE001 - a cluster that already died
            os.killpg(cluster.pid, signal.SIGKILL)
    lines = logs.splitlines()
    resumed = [ln for ln in lines if RESTART_LINE in ln]
    assert len(resumed) == 1 and int(resumed[0].split("at step ")[1].split()[0]) >= on_store, \
        "\n".join(ln for ln in logs.split("\nCURVE ")[0].splitlines() if "TrainController" not in ln)[-4000:]
    curve = json.loads(next(ln for ln in lines if ln.startswith("CURVE ")).removeprefix("CURVE "))
    assert [h["step"] for h in curve] == list(range(5, 81, 5))  # one loss curve: nothing repeated, nothing missing
    assert f"published models/diffusion/ to {s3}/two/models/diffusion" in logs

    _assert_same_model(f"{s3}/two/models/diffusion", unkilled_80, tmp_path, sample=True)


def _wait_for_dashboard(api: str, token: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not dashboard_answers(api, token):
        assert time.time() < deadline, f"the test cluster's dashboard did not answer at {api}"
        time.sleep(1)


def _job_status(ray_job, job_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, from `ray job status`."""
    res = ray_job("status", job_id)
    out = (res.stdout + res.stderr).upper()  # "Status for job '...': RUNNING" (Ray's cli_logger picks the stream)
    return next((w for w in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if w in out), "UNKNOWN")


def _wait_until(cond, status, what: str, timeout: float = 600, logs=lambda: "", every: float = 0.05) -> None:
    """Poll cond every `every` seconds until it holds; fail if the job ended first (asked every 3 s) or the time
    ran out."""
    deadline, asked = time.time() + timeout, time.time()
    while not cond():
        if time.time() - asked > 3:
            assert status() in ("PENDING", "RUNNING"), f"the job ended before {what}:\n{logs()[-3000:]}"
            asked = time.time()
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(every)
