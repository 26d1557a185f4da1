"""sweep/evaluate helpers: the sampling grid, trial names, metrics of a sample set, CSV and plots."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_core.config import validate_params
from diffusion_core.evaluation import load_reference, reference_path, sample_metrics, sampling_trials, trial_name
from diffusion_core.metrics.errors import MetricsError
from diffusion_core.reports import (SWEEP_COLUMNS, plot_fd_vs_nfe, plot_guidance, plot_precision_recall,
                                    plot_training, reference_setting, write_csv)

from .tiny_models import make_feature_net

torch.set_num_threads(1)


def _grid(*blocks):
    return validate_params({"sweep": {"sampling": list(blocks)}}, ["sweep"]).sweep


def test_sampling_trials_cross_dedupe_and_normalise():
    sw = _grid({"samplers": ["ddim", "ddpm"], "steps": [10, 20], "etas": [0.0, 1.0], "guidance": ["cfg", "none"],
                "scales": [1.0, 2.0]},
               {"samplers": ["ddim"], "steps": [10], "num_samples": 50})
    trials = sampling_trials(sw.sampling, sw.num_samples, 100)
    keys = [json.dumps(t, sort_keys=True) for t in trials]
    assert len(keys) == len(set(keys))
    # ddpm ignores eta, guidance none ignores scale: ddim 2*2*(2+1) + ddpm 2*(2+1) + the n=50 block's one trial
    assert len(trials) == 12 + 6 + 1
    assert all(t["eta"] == 0.0 for t in trials if t["sampler"] != "ddim")
    assert all(t["scale"] is None for t in trials if t["guidance"] == "none")
    assert {t["num_samples"] for t in trials} == {sw.num_samples, 50}
    assert len({trial_name(t) for t in trials}) == len(trials)


def test_sampling_trials_reject_steps_beyond_T():
    sw = _grid({"samplers": ["ddpm"], "steps": [1000]})
    with pytest.raises(ValueError, match=r"sweep.sampling\[0\].steps has 1000 > schedule.num_timesteps 100"):
        sampling_trials(sw.sampling, 10, 100)


def test_default_params_cover_the_seeds_comparisons():
    from pathlib import Path

    from diffusion_core.config import load_params

    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml", ["sweep"]).sweep
    trials = sampling_trials(p.sampling, p.num_samples, 1000)
    have = {(t["sampler"], t["steps"]) for t in trials}
    for s in (10, 20, 50):
        assert {("ddim", s), ("ddpm", s)} <= have
    assert {("ddpm", 1000), ("dpmpp2m", 10), ("dpmpp2m", 20)} <= have
    assert len({t["scale"] for t in trials if t["guidance"] == "cfg"}) >= 3
    assert {"linear", "cosine"} <= set(p.training.schedules)


def test_sample_metrics_keys_and_class_accuracy(tmp_path):
    from diffusion_core.metrics.fidelity import domain_extractor, reference_stats

    net = make_feature_net(num_classes=3)
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 1, 8, 8), generator=g, dtype=torch.uint8)
    ext = domain_extractor(net)
    reference_stats(real, ext, reference_path(tmp_path, "domain"))
    ref = load_reference(tmp_path, "domain")
    fake = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    m = sample_metrics(fake, np.arange(30) % 3, ref, ext)
    assert {"fd_domain", "kd_domain", "precision_domain", "recall_domain", "class_accuracy"} <= set(m)
    assert m["fd_domain"] >= 0 and 0 <= m["class_accuracy"] <= 1
    assert "fid_inception" not in m  # no Inception given: not reported, never faked
    assert sample_metrics(fake, np.full(30, -1), ref, ext)["class_accuracy"] is None
    with pytest.raises(MetricsError, match="run the reference_stats stage"):
        load_reference(tmp_path, "inception")
    assert load_reference(tmp_path, "inception", required=False) is None


def _rows():
    rows = []
    for sampler in ("ddim", "ddpm", "dpmpp2m"):
        for steps in (5, 10):
            rows.append({"trial": f"{sampler}-{steps}", "axis": "sampling", "status": "completed", "sampler": sampler,
                         "steps": steps, "eta": 0.0, "guidance": "cfg", "scale": 1.0, "num_samples": 40,
                         "nfe": float(steps), "fd_domain": 10.0 / steps, "kd_domain": 0.1, "precision_domain": 0.5,
                         "recall_domain": 0.4, "class_accuracy": 0.3, "wall_seconds": 1.5})
    for scale in (0.0, 2.0):
        rows.append({**rows[0], "trial": f"ddim-5-cfg{scale}", "scale": scale, "nfe": 5.0 * (1 + (scale > 1))})
    rows.append({**rows[0], "trial": "ddim-5-none", "guidance": "none", "scale": None, "class_accuracy": None})
    return rows


def test_csv_and_plots_are_well_formed(tmp_path):
    rows = _rows()
    write_csv(tmp_path / "sweep.csv", rows)
    with open(tmp_path / "sweep.csv") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows) and tuple(read[0]) == SWEEP_COLUMNS
    assert read[-1]["scale"] == "" and read[-1]["class_accuracy"] == ""
    assert reference_setting(rows) == ("cfg", 1.0, 0.0)
    plot_fd_vs_nfe(rows, tmp_path / "fd.png")
    plot_guidance(rows, tmp_path / "g.png")
    plot_precision_recall(rows, tmp_path / "pr.png")
    plot_training({"train-cosine-eps": [{"step": 5, "fd_domain": 3.0}, {"step": 10, "fd_domain": 2.0}]},
                  tmp_path / "t.png")
    plot_fd_vs_nfe([], tmp_path / "empty.png")  # no trials: an empty, still valid plot
    for name in ("fd.png", "g.png", "pr.png", "t.png", "empty.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.size[0] > 100
