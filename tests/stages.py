"""Helpers for tests that run pipeline stages as subprocesses: the environment they get, and the paths they use."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
VENV_BIN = Path(sys.executable).parent


def stage_env() -> dict:
    """This environment without MLflow/Ray settings, with the repo on PYTHONPATH and the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env.update(PYTHONPATH=str(ROOT), PATH=f"{VENV_BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    return env
