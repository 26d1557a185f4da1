"""The scratch checkout the e2e tests run `dvc repro` in, and the commands they run there (dvc, git), each with the
environment every stage of those runs gets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

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
