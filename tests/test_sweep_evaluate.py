"""sweep/evaluate helpers: the sampling grid, trial names, metrics of a sample set, CSV and plots; and a sweep
killed mid-run through its command line, resumed (slow)."""

import contextlib
import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_core.evaluation import load_reference, reference_path, sample_metrics
from diffusion_core.metrics.errors import MetricsError
from pipeline.config import validate_params
from pipeline.grid import CROSS_AXIS, cross_rows, sampling_trials, setting_name, trial_name, trial_seed
from pipeline.reports import (
    CROSS_COLUMNS,
    SUMMARY_COLUMNS,
    SWEEP_COLUMNS,
    converged_reference,
    plot_fd_vs_nfe,
    plot_guidance,
    plot_precision_recall,
    plot_training,
    plot_training_x_sampling,
    reference_setting,
    select_setting,
    summarize,
    write_csv,
)

from .e2e import checkout_env, shared_repro
from .stages import TINY, params_raw
from .tiny_models import make_feature_net

torch.set_num_threads(1)


def _grid(*blocks):
    return validate_params(params_raw({"sweep": {"sampling": list(blocks)}}), ["sweep"]).sweep


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


def test_seed_sets_are_disjoint_and_each_setting_has_them_all():
    sw = validate_params(params_raw({"sweep": {"seed": 7, "seed_sets": 3, "sampling": [
        {"samplers": ["ddim", "dpmpp2m"], "steps": [5, 10]},
        {"samplers": ["ddim"], "steps": [20], "num_samples": 50, "seed_sets": 1}]}}), ["sweep"]).sweep
    trials = sampling_trials(sw.sampling, 100, 1000, default_seed_sets=sw.seed_sets)
    assert len(trials) == 4 * 3 + 1 and len({trial_name(t) for t in trials}) == len(trials)
    by_setting = {}
    for t in trials:
        by_setting.setdefault(setting_name(t), []).append(t)
    assert sorted(len(ts) for ts in by_setting.values()) == [1, 3, 3, 3, 3]
    for ts in by_setting.values():
        assert [t["seed_set"] for t in ts] == list(range(len(ts)))
        seeds = [set(range(trial_seed(t, sw.seed), trial_seed(t, sw.seed) + t["num_samples"])) for t in ts]
        assert all(not (a & b) for i, a in enumerate(seeds) for b in seeds[i + 1:])  # disjoint sets
        assert min(map(min, seeds)) == 7  # set 0 starts at sweep.seed: sample i is the same noise in every setting


def test_default_params_compare_samplers_on_enough_samples():
    from pathlib import Path

    from pipeline.config import load_params

    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml", ["sweep", "evaluate"])
    sw = p.sweep
    trials = sampling_trials(sw.sampling, sw.num_samples, 1000, sw.spacing, sw.seed_sets)
    main = [t for t in trials if sum(1 for u in trials if setting_name(u) == setting_name(t)) >= 3]  # >= 3 sets
    have = {(t["sampler"], t["steps"]) for t in main}
    # DDIM against DDPM ancestral at equal NFE (the DDIM paper's claim), and the DPM-Solvers at fewer
    assert {("ddim", 10), ("ddim", 20), ("ddpm", 20), ("dpmpp2m", 10), ("dpmpp3m", 10)} <= have
    assert len({t["num_samples"] for t in main}) == 1 and main[0]["num_samples"] >= 200  # FD at equal N
    # the teacher's samplers compared at the guidance evaluate uses; the 1-step student at the scale its class
    # accuracy needs (its input), the others at evaluate's
    assert {t["scale"] for t in main if "model" not in t} == {p.evaluate.scale}
    students = {t["steps"]: t["scale"] for t in main if t.get("model") == "student"}
    assert students == {1: 2.5, 2: p.evaluate.scale, 4: p.evaluate.scale}
    assert len({t["scale"] for t in trials if t["guidance"] == "cfg"}) >= 3
    assert {"eps", "v"} <= set(sw.training.parameterizations)
    assert p.evaluate.setting == "sweep" and p.evaluate.seed >= sw.seed + sw.seed_sets * sw.num_samples


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
    for r in rows:
        r["setting"] = r["trial"]
    plot_fd_vs_nfe(summarize(rows), tmp_path / "fd.png")
    plot_guidance(summarize(rows), tmp_path / "g.png")
    plot_precision_recall(rows, tmp_path / "pr.png")
    plot_training({"train-cosine-eps": [{"step": 5, "fd_domain": 3.0}, {"step": 10, "fd_domain": 2.0}]},
                  tmp_path / "t.png")
    plot_fd_vs_nfe([], tmp_path / "empty.png")  # no trials: an empty, still valid plot
    for name in ("fd.png", "g.png", "pr.png", "t.png", "empty.png"):
        with Image.open(tmp_path / name) as im:
            im.load()
            assert im.size[0] > 100


def _trial_rows():
    """Two settings x 3 seed sets and a DDPM ladder; fd_domain values chosen so means and spreads are known."""
    rows = []
    fds = {"ddim-10": [1.0, 1.2, 1.4], "dpmpp2m-5": [0.5, 0.9, 0.7], "ddpm-20": [0.8, 0.8, 0.8],
           "ddpm-50": [0.6, 0.7, 0.8]}
    for name, vals in fds.items():
        sampler, steps = name.split("-")
        for k, fd in enumerate(vals):
            rows.append({"trial": f"{name}-s{k}", "setting": name, "seed_set": k, "axis": "sampling",
                         "sampler": sampler, "steps": int(steps), "eta": 0.0, "spacing": "trailing", "options": {},
                         "guidance": "cfg", "scale": 1.5, "num_samples": 1000, "nfe": 2.0 * int(steps),
                         "fd_domain": fd, "class_accuracy": 0.96 if sampler == "dpmpp2m" else 0.98})
    return rows


def test_summary_means_spreads_and_the_selection_rule(tmp_path):
    import statistics

    settings = {r["setting"]: r for r in summarize(_trial_rows())}
    assert list(settings) == ["ddim-10", "dpmpp2m-5", "ddpm-20", "ddpm-50"]
    d = settings["dpmpp2m-5"]
    assert d["seed_sets"] == 3 and d["trials"] == "dpmpp2m-5-s0;dpmpp2m-5-s1;dpmpp2m-5-s2"
    assert d["fd_domain"] == pytest.approx(0.7) and d["fd_domain_std"] == pytest.approx(statistics.stdev([.5, .9, .7]))
    assert (d["fd_domain_min"], d["fd_domain_max"]) == (0.5, 0.9)
    assert settings["ddpm-20"]["fd_domain_std"] == pytest.approx(0.0)
    # the rule: dpmpp2m-5 has the lowest FD but fails class_accuracy >= 0.97; ddpm-50 (100 NFE) is over max_nfe
    s = list(settings.values())
    assert select_setting(s, 1000, 50, 0.97)["setting"] == "ddpm-20"
    assert select_setting(s, 1000, 50, 0.95)["setting"] == "dpmpp2m-5"
    assert select_setting(s, 1000, None, 0.97)["setting"] == "ddpm-50"
    assert select_setting(s, 250, None, 0.0) is None  # FD at another N is not comparable
    assert select_setting(s, 1000, 50, 0.97, min_seed_sets=4) is None  # every setting has 3 sets
    assert converged_reference(s)["setting"] == "ddpm-50"
    write_csv(tmp_path / "summary.csv", s, SUMMARY_COLUMNS)
    with open(tmp_path / "summary.csv") as f:
        read = list(csv.DictReader(f))
    assert [r["setting"] for r in read] == list(settings) and float(read[1]["fd_domain"]) == pytest.approx(0.7)
    plot_fd_vs_nfe(s, tmp_path / "fd.png")
    with Image.open(tmp_path / "fd.png") as im:
        im.load()


def test_training_axis_is_crossed_with_samplers(tmp_path):
    """Each finished short training x each sweep.training.samplers point (seed sets included) is one row named by
    both; a pruned training has none; the summary averages over seed sets per (training, sampler) pair."""
    sw = validate_params(params_raw({"sweep": {"seed_sets": 2, "num_samples": 100, "training": {"samplers": [
        {"samplers": ["ddim"], "steps": [20], "scales": [1.5]},
        {"samplers": ["dpmpp2m"], "steps": [10], "scales": [1.5], "spacings": ["logsnr"], "seed_sets": 1}]}}}),
        ["sweep"]).sweep
    cross = sampling_trials(sw.training.samplers, sw.num_samples, 1000, sw.spacing, sw.seed_sets)
    assert [(t["sampler"], t["seed_set"]) for t in cross] == [("ddim", 0), ("ddim", 1), ("dpmpp2m", 0)]
    rows = []
    for param, fds in (("eps", [3.0, 5.0, 9.0]), ("v", [1.0, 1.5, 0.8])):
        train = {"trial": f"train-cosine-{param}", "setting": f"train-cosine-{param}", "axis": "training",
                 "status": "completed", "schedule": "cosine", "parameterization": param, "train_steps": 150,
                 "cross": cross}
        points = [{"fd_domain": fd, "nfe": 2.0 * t["steps"], "class_accuracy": 0.9} for fd, t in zip(fds, cross)]
        rows += cross_rows(train, json.dumps(points))
    assert cross_rows({**train, "status": "pruned"}, json.dumps(points)) == []  # pruned: never crossed
    with pytest.raises(ValueError, match="2 sampler points reported for 3"):
        cross_rows(train, json.dumps(points[:2]))
    assert {r["axis"] for r in rows} == {CROSS_AXIS} and len({r["trial"] for r in rows}) == 6
    assert rows[0]["trial"] == "train-cosine-eps/ddim-20-eta0-cfg1.5-n100-s0"
    settings = {r["setting"]: r for r in summarize(rows, axis=CROSS_AXIS)}
    eps_ddim = settings["train-cosine-eps/ddim-20-eta0-cfg1.5-n100"]
    assert eps_ddim["fd_domain"] == pytest.approx(4.0) and eps_ddim["seed_sets"] == 2
    assert (eps_ddim["training"], eps_ddim["parameterization"]) == ("train-cosine-eps", "eps")
    assert settings["train-cosine-v/dpmpp2m-10-logsnr-cfg1.5-n100"]["fd_domain"] == pytest.approx(0.8)
    assert summarize(rows) == []  # the sampling axis' summary does not take them
    write_csv(tmp_path / "x.csv", list(settings.values()), CROSS_COLUMNS)
    with open(tmp_path / "x.csv") as f:
        assert [r["parameterization"] for r in csv.DictReader(f)] == ["eps", "eps", "v", "v"]
    plot_training_x_sampling(list(settings.values()), tmp_path / "x.png")
    plot_training_x_sampling([], tmp_path / "none.png")
    for name in ("x.png", "none.png"):
        with Image.open(tmp_path / name) as im:
            im.load()


def test_classifier_guidance_is_refused_for_the_training_axis():
    with pytest.raises(ValueError, match="classifier"):
        validate_params(params_raw({"sweep": {"training": {"samplers": [{"samplers": ["ddim"], "steps": [5],
                                                               "guidance": ["classifier"]}]}}}), ["sweep"])


def test_evaluate_takes_the_sweeps_selection_on_fresh_seeds(tmp_path):
    from pipeline.evaluate import SettingError, resolve_setting

    cfg = validate_params(params_raw({"evaluate": {"setting": "sweep", "seed": 3000, "num_samples": 1000}}),
                          ["evaluate"]).evaluate
    with pytest.raises(SettingError, match="run the sweep stage first"):
        resolve_setting(cfg, tmp_path / "sweep.json")
    (tmp_path / "sweep.json").write_text(json.dumps({"selected": None}))
    with pytest.raises(SettingError, match="loosen sweep.select"):
        resolve_setting(cfg, tmp_path / "sweep.json")
    sel = {"setting": "dpmpp3m-10-logsnr-cfg1.5-n1000", "sampler": "dpmpp3m", "steps": 10, "spacing": "logsnr",
           "guidance": "cfg", "scale": 1.5, "num_samples": 1000, "seed_sets": 3, "fd_domain": 0.28,
           "fd_domain_std": 0.03, "trials": ["a-s0", "a-s1", "a-s2"], "rule": "r", "seeds": [0, 3000]}
    (tmp_path / "sweep.json").write_text(json.dumps({"selected": sel}))
    used = resolve_setting(cfg, tmp_path / "sweep.json")
    assert (used["sampler"], used["steps"], used["spacing"], used["scale"], used["eta"]) == ("dpmpp3m", 10, "logsnr",
                                                                                             1.5, 0.0)
    assert used["source"] == "sweep" and used["sweep_trials"] == ["a-s0", "a-s1", "a-s2"]
    overlapping = validate_params(params_raw({"evaluate": {"setting": "sweep", "seed": 2999}}), ["evaluate"]).evaluate
    with pytest.raises(SettingError, match="overlap the seeds 0..2999"):
        resolve_setting(overlapping, tmp_path / "sweep.json")
    params = validate_params(params_raw({"evaluate": {"setting": "params", "sampler": "heun", "steps": 6,
                                                          "options": {"s_churn": 5}}}),
                             ["evaluate"]).evaluate
    assert resolve_setting(params, tmp_path / "nope.json")["options"] == {"s_churn": 5}


def test_students_are_their_own_line_and_the_rule_may_pick_them_or_not(tmp_path):
    """`model: student` rows (distill's students) summarise as their own settings, may be selected, and are left out
    when sweep.select.models leaves them out; a student block that asks another sampler is refused."""
    from pipeline.config import SECTIONS
    from pipeline.grid import sampling_trials, setting_name
    from pipeline.reports import sampler_of

    block = SECTIONS["sweep"].model_fields["sampling"].annotation.__args__[0]
    trials = sampling_trials([block(model="student", samplers=["ddim"], steps=[1, 2], scales=[2.0])], 1000, 1000,
                             default_seed_sets=3)
    assert len(trials) == 6 and all(t["model"] == "student" for t in trials)
    assert setting_name(trials[0]) == "student-ddim-1-eta0-cfg2-n1000"
    with pytest.raises(ValueError, match="students' own grid"):
        block(model="student", samplers=["dpmpp3m"], steps=[1])
    rows = _trial_rows()
    for t in trials:
        rows.append({**t, "trial": setting_name(t) + f"-s{t['seed_set']}", "setting": setting_name(t),
                     "axis": "sampling", "nfe": float(t["steps"]), "fd_domain": 0.2 + 0.01 * t["seed_set"],
                     "class_accuracy": 0.99})
    s = summarize(rows)
    student = [r for r in s if r.get("model") == "student"]
    assert [r["setting"] for r in student] == ["student-ddim-1-eta0-cfg2-n1000", "student-ddim-2-eta0-cfg2-n1000"]
    assert {sampler_of(r) for r in student} == {"student"} and sampler_of(s[0]) == "ddim"
    assert select_setting(s, 1000, 50, 0.97)["setting"] == "student-ddim-1-eta0-cfg2-n1000"
    assert select_setting(s, 1000, 50, 0.97, models=("diffusion",))["setting"] == "ddpm-20"
    plot_fd_vs_nfe(s, tmp_path / "fd.png")  # a line of its own ("student") beside the samplers'


def _recorded_trials(work: Path) -> int:
    """Sampling trials Tune's saved experiment state records as finished (what a restore keeps). Tune saves it every
    ~10 s; a trial's result.json alone can be ahead of it, and a restore reruns a trial the state has as running."""
    done = 0
    for state in work.glob("ray_results/sweep-*-sampling/experiment_state-*.json"):
        with contextlib.suppress(OSError, ValueError):  # being rewritten: read it again next time
            done += sum('"TERMINATED"' in trial[0] for trial in json.loads(state.read_text())["trial_data"])
    return done


@pytest.mark.slow
def test_a_killed_sweep_resumes_its_finished_trials(tmp_path_factory, tmp_path):
    """kill -9 of the sweep after some sampling trials have reported: the rerun restores the Tune run (the trials
    Tune had recorded are not rerun), ends with the table of the unkilled sweep, and MLflow has the killed run
    marked KILLED and the new one naming it."""
    import time

    work, _ = shared_repro(tmp_path_factory, TINY)  # the e2e pipeline's: its trained models and its sweep's table
    copy = tmp_path / "w"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns(".git", "cache", "ray_results", "dvc_plots"))
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["sweep"]["training"]["schedules"] = []  # the sampling axis alone: its rows do not depend on the trainings
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [sys.executable, "-m", "pipeline.sweep", "--params", "params.yaml"]
    # Tune saves the experiment state a restore reads every 10 s by default; every 0.5 s here, so the kill lands
    # while the sweep (reused trial actors: a dozen tiny trials in about 15 s) still has trials to run
    first = subprocess.Popen(cmd, cwd=copy, env={**checkout_env(copy), "TUNE_GLOBAL_CHECKPOINT_S": "0.5"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while _recorded_trials(copy) < 2:
            assert first.poll() is None, "the sweep ended before Tune recorded two finished sampling trials"
            assert time.time() < deadline, "no two finished sampling trials in 10 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, 9)
        first.wait()
    recorded = _recorded_trials(copy)
    staged = {p: {p.stat().st_mtime_ns} for p in copy.glob("ray_results/sweep-*/samples/*.npz")}

    rerun = subprocess.Popen(cmd, cwd=copy, env=checkout_env(copy), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    while rerun.poll() is None:  # each trial that runs writes its samples anew: watch them until the sweep ends
        for path, seen in staged.items():
            with contextlib.suppress(FileNotFoundError):  # the finished sweep removes its staging folder
                seen.add(path.stat().st_mtime_ns)
        time.sleep(0.05)
    out = rerun.stdout.read()
    assert rerun.returncode == 0, out[-3000:]
    kept = re.search(r"resuming the interrupted Tune run sweep-\w+-sampling/ \((\d+) of (\d+) trials", out)
    assert kept and 1 <= int(kept[1]) < int(kept[2]), out[-3000:]
    untouched = [path for path, seen in staged.items() if len(seen) == 1]
    assert len(untouched) >= recorded >= 2, "a trial Tune had recorded was run again"
    assert not list(copy.glob("ray_results/sweep-*")), "the finished sweep leaves no Tune run behind"

    def table(path: Path) -> list[tuple]:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        keys = [k for k in rows[0] if not k.endswith("seconds")]
        return sorted(tuple(r[k] for k in keys) for r in rows if r["axis"] == "sampling")

    assert table(copy / "reports/sweep.csv") == table(work / "reports/sweep.csv")
    with sqlite3.connect(copy / "mlflow.db") as db:
        sweeps = dict(db.execute("SELECT run_uuid, status FROM runs WHERE name = 'sweep'"))
        link = dict(db.execute("SELECT run_uuid, value FROM tags WHERE key = 'continues_run'"))
    killed = [r for r, status in sweeps.items() if status == "KILLED"]
    assert len(killed) == 1 and list(link.values()) == killed
    assert sweeps[next(iter(link))] == "FINISHED" and "RUNNING" not in sweeps.values()
