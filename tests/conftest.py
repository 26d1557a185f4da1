"""Test-wide settings, and the `prepared` folder shared by the tests that run stages."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.stages import TINY, stage_env

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """configs/tiny.yaml's `prepare` (digits 8x8) run once per session through its CLI, tracking off: the folder holds
    data/, metrics/prepare.json, reports/prepare_samples.png and tiny.yaml. Tests copy from it and never write to it."""
    d = tmp_path_factory.mktemp("prepared")
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["enabled"] = False
    (d / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    res = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", "tiny.yaml"], cwd=d, env=stage_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return d
