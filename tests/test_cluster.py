"""Beyond one disk (issue 13): train_diffusion with its storage root on an S3 server (moto's, on 127.0.0.1).

Ray Train persists its checkpoints under <root>/ray_results, so a worker group restarted after a lost worker
resumes from the store, not from a disk only the dead worker's node could read; the finished model is published
as <root>/models/diffusion and is bitwise the model of the same run without the kill. Still one Ray node here:
the 2-node version of this test (`ray start --head` plus a second `ray start --address`) is not built yet.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

from diffusion_core.checkpoint import load_model_dir

from .stages import stage_env
from .test_train_diffusion import _cmd, _steps, _wait_for, _workdir

pytestmark = pytest.mark.slow


def _stage(cwd, env) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pipeline.train_diffusion", "--params", "tiny.yaml"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _ray_checkpoints(bucket_path: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    try:
        return [p for p in fs.find(bucket_path) if p.endswith("/config.json") and "/step-" in p]
    except FileNotFoundError:
        return []


def test_worker_lost_mid_run_resumes_from_the_store_and_ends_bitwise_as_unkilled(s3, prepared, tmp_path):
    import psutil

    train = {"steps": 80, "checkpoint_every": 10, "log_every": 5, "sample_every": 0}
    env = {**stage_env(), "DIFFUSION_STORAGE_ROOT": f"{s3}/killed"}
    cwd = _workdir(prepared, tmp_path / "killed", **train)
    proc, lines = _stage(cwd, env)
    try:
        # Ray commits a checkpoint once every rank has reported it: a second one on the store means the first is
        store = f"{s3.removeprefix('s3://')}/killed/ray_results"
        _wait_for(lambda: len(_ray_checkpoints(store)) >= 2, proc, "two Ray checkpoints on the store")
        on_store = min(int(p.split("/step-")[1][:8]) for p in _ray_checkpoints(store))
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in _cmd(p)]
        assert len(workers) == 2
        workers[-1].kill()  # a lost worker: Ray restarts the group inside the same run
        # ... and with it the disk rank 0 wrote its checkpoints to (a node gone): once the surviving worker is
        # down too (it could still write one), only the store has them when the new group looks
        psutil.wait_procs(workers[:1], timeout=120)
        shutil.rmtree(cwd / "checkpoints")
        assert proc.wait(timeout=400) == 0, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    resumed = [ln for ln in lines if "workers restarted by Ray; resuming from its checkpoint at step" in ln]
    assert len(resumed) == 1 and f"({s3}/killed/ray_results)" in resumed[0], \
        "".join(ln for ln in lines if "TrainController" not in ln)[-4000:]
    assert int(resumed[0].split("at step ")[1].split()[0]) >= on_store
    assert _steps(cwd) == list(range(5, 81, 5))  # one loss curve: nothing repeated, nothing missing
    assert f"published models/diffusion/ to {s3}/killed/models/diffusion" in out

    clean = _workdir(prepared, tmp_path / "clean", **train)
    proc, lines = _stage(clean, {**stage_env(), "DIFFUSION_STORAGE_ROOT": f"{s3}/clean"})
    assert proc.wait(timeout=400) == 0, "".join(lines)[-3000:]
    # the user's side: both models pulled back by URL, the killed run's is the unkilled run's, bit for bit
    killed, _ = load_model_dir(f"{s3}/killed/models/diffusion")
    unkilled, _ = load_model_dir(f"{s3}/clean/models/diffusion")
    a, b = killed.state_dict(), unkilled.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
