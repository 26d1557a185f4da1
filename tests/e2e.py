"""The scratch checkout the e2e tests run `dvc repro` in, and the commands they run there (dvc, git), each with the
environment every stage of those runs gets."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from .stages import ROOT, stage_env
from .test_no_secrets import SECRETS

REPRO_TIMEOUT_S = 1800
DVC = str(Path(sys.executable).parent / "dvc")


def scratch_checkout(work: Path, params: Path) -> Path:
    """A git repo and DVC project in `work` holding this checkout's code, dvc.yaml, configs/, .gitignore and
    .dvcignore, with `params` as its params.yaml, committed; returns `work`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipeline", "diffusion_core", "configs"):
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(params, work / "params.yaml")
    for name in (".gitignore", ".dvcignore"):  # the checkout's own: what git ignores, `dvc exp` cannot record
        shutil.copy(ROOT / name, work / name)
    git(work, "init", "-q")
    git(work, "config", "user.name", "e2e")
    git(work, "config", "user.email", "e2e@example.invalid")
    git(work, "config", "commit.gpgsign", "false")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "code and params")
    dvc(work, "init", "-q")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "dvc init")
    return work


def shared_repro(tmp_path_factory, params: Path) -> tuple[Path, str]:
    """`dvc repro` of `params` in a scratch checkout, once per test session: the first test (of any xdist worker) to
    ask runs it under a file lock, the others wait and share it. Returns (the checkout, dvc's output). Shared means
    read only: a test that runs anything in it other than a read (a dvc command that writes, a stage) works on a
    copy. A failed repro fails every test that asks, with its output, and is not run again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp lies in the session's own folder
        base = base.parent
    root = base / f"repro-{params.stem}"
    log, failed = root / "repro.log", root / "repro.failed"
    with open(base / f"repro-{params.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if failed.exists():
            pytest.fail(f"dvc repro of {params.name} failed in the test that ran it:\n{failed.read_text()}")
        if not log.exists():
            (root / "work").mkdir(parents=True, exist_ok=True)
            try:
                out = dvc(scratch_checkout(root / "work", params), "repro")
            except BaseException as e:
                failed.write_text(str(e)[-6000:])
                raise
            log.write_text(out)
    return root / "work", log.read_text()


def copy_checkout(work: Path, to: Path) -> Path:
    """A copy of the checkout `work` (git, DVC cache and all) to run commands in; returns `to`."""
    shutil.copytree(work, to, symlinks=True, ignore=shutil.ignore_patterns("ray_results", "dvc_plots"))
    return to


def checkout_env(work: Path) -> dict:
    """The stages' environment in `work`: one thread each, and SECRETS, which are fake: no stage may log them
    (test_pipeline_e2e's test_no_secrets_in_the_store_or_the_output)."""
    return stage_env(**SECRETS, PYTHONPATH=str(work), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DVC_NO_ANALYTICS="1")


def run(work: Path, cmd: list[str], timeout: int, **extra: str) -> subprocess.CompletedProcess:
    """`cmd` in `work` with checkout_env(work) and `extra`; fails the test, with its output, unless it exits 0."""
    proc = subprocess.run(cmd, cwd=work, env={**checkout_env(work), **extra}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def dvc(work: Path, *args: str, timeout: int = REPRO_TIMEOUT_S, **extra: str) -> str:
    """`dvc ARGS` in `work`; returns its output, stdout and stderr together."""
    proc = run(work, [DVC, *args], timeout, **extra)
    return proc.stdout + proc.stderr


def dvc_json(work: Path, *args: str) -> dict | list:
    return json.loads(run(work, [DVC, *args, "--json"], 300).stdout)


def git(work: Path, *args: str) -> str:
    return run(work, ["git", *args], 60).stdout


def png_ok(path: Path) -> None:
    """`path` is a readable image larger than 8x8."""
    with Image.open(path) as im:
        im.load()
        assert im.size[0] > 8 and im.size[1] > 8, path
