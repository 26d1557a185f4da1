"""bench/gpu_check.sh's CPU fallback (no GPU here): it says so, measures on the CPU and writes its figures; asking
bench.gpu for CUDA where there is none is a one-line error."""

import json
import subprocess
import sys

import pytest

from .stages import ROOT, stage_env


def _env() -> dict:
    return stage_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_gpu_check_falls_back_to_the_cpu_and_measures_there(tmp_path):
    out = tmp_path / "gpu.json"
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--no-pipeline", "--quick", "--models",
                          "default", "--out", str(out)], cwd=ROOT, env={**_env(), "PY": sys.executable},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gpu_check: device cpu (no CUDA device: CPU fallback)" in res.stdout
    fig = json.loads(out.read_text())
    assert fig["device"] == "cpu" and fig["gpu"] is None and fig["quick"] is True
    rows = fig["rows"]
    assert [r["model"] for r in rows] == ["default"] * len(rows) and rows[0]["precision"] == "fp32"
    for r in rows:
        assert r["train_samples_per_s"] > 0 and r["ddim10_samples_per_s"] > 0 and r["peak_memory_mib"] > 100
        assert r["params"] > 1_000_000  # params.yaml's default network, not a stand-in


def test_cuda_asked_where_there_is_none_is_a_one_line_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cuda", "--out", str(tmp_path / "x.json")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "torch sees no CUDA device" in res.stderr and "--device cpu" in res.stderr
    assert not (tmp_path / "x.json").exists()
