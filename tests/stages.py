"""Helpers for tests that run pipeline stages as subprocesses: the environment they get, and the paths they use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
PARAMS = ROOT / "params.yaml"
VENV_BIN = Path(sys.executable).parent


def params_raw(overrides: dict | None = None, base: Path = PARAMS) -> dict:
    """The parsed params file `base` (the repository's params.yaml) with `overrides` deep-merged in."""
    from pipeline.config import merged, read_yaml

    return merged(read_yaml(base), overrides or {})


def stage_env(**extra: str) -> dict:
    """The environment every test gives the stages, servers and scripts it starts: this one without MLflow/Ray
    settings, with the repo on PYTHONPATH, the venv first on PATH and Ray's usage stats off; `extra` on top (e.g.
    OMP_NUM_THREADS="1" for tiny models on a busy 2-core box, fake secrets, a storage root)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    # Ray's workers at the priority of the test that starts them (Ray's default, nice 15, starves them behind the
    # other xdist workers' processes on a busy machine: a `ray start` cluster's too, which sets none of its own)
    env.update(PYTHONPATH=str(ROOT), PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_worker_niceness="0")
    env.update(extra)
    return env


def ray_token_env(**extra: str) -> dict:
    """stage_env with Ray's token authentication on and a fresh token in RAY_AUTH_TOKEN, which every Ray process
    reads before ~/.ray/auth_token: the test's cluster and its clients share it, and the home folder is left alone."""
    import secrets

    return stage_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), **extra)


def listening_ips(pids: set[int], port: int | None = None) -> set[str]:
    """IP addresses of the TCP sockets in LISTEN state held by the processes `pids` (on `port` only, if given)."""
    import psutil

    return {c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids and (port is None or c.laddr.port == port)}


def group_pids(pgid: int) -> set[int]:
    """The processes of process group `pgid`."""
    import psutil

    pids = set()
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                pids.add(p.pid)
        except OSError:
            pass
    return pids


def dashboard_answers(api: str, token: str) -> bool:
    """Ray's dashboard at `api` (http://host:port) answers an authenticated request (token auth on)."""
    import urllib.request

    req = urllib.request.Request(f"{api}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        urllib.request.urlopen(req, timeout=2)
        return True
    except OSError:
        return False
