"""The whole pipeline under `dvc repro` on configs/tiny.yaml, in a scratch git checkout of the repo; then every
output is checked, the MLflow store must hold one run per stage and one nested run per sweep trial, and a second
`dvc repro` must have nothing to do. On top of that repro, README's experiment commands: `dvc exp run -S` variants,
`dvc exp show`, `dvc plots show`. The repro is the session's shared one (tests/e2e.py, `shared_repro`: the killed
sweep of tests/test_sweep_evaluate.py starts from it too). Slow (minutes): marked `slow`, still run in CI."""

import csv
import json
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion_core.checkpoint import load_model_dir
from diffusion_core.data import load_split
from diffusion_core.models import NoisyClassifier

from .e2e import copy_checkout, dvc, dvc_json, git, png_ok, shared_repro
from .stages import ROOT, TINY
from .test_no_secrets import SECRETS, assert_store_holds_no_secret_or_environment

pytestmark = pytest.mark.slow


def _outputs(stage: dict) -> list[str]:
    paths = []
    for key in ("outs", "metrics", "plots"):
        for item in stage.get(key, []):
            paths.append(next(iter(item)) if isinstance(item, dict) else item)
    return paths


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work, log = shared_repro(tmp_path_factory, TINY)
    return work, log, yaml.safe_load((work / "dvc.yaml").read_text())["stages"]


def test_every_stage_ran_and_wrote_its_outputs(pipeline):
    work, _, stages = pipeline
    for name, stage in stages.items():
        for rel in _outputs(stage):
            p = work / rel
            assert p.exists(), f"stage {name} did not write {rel}"
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".png":
                png_ok(p)
            elif p.is_dir():
                assert any(p.iterdir()), f"{rel} is empty"
    meta = json.loads((work / "data/meta.json").read_text())
    assert sorted(meta["shards"]) == ["test", "train"]
    assert any((work / "data/shards").glob("*.tar"))
    for model in ("diffusion", "classifier", "feature_net"):
        assert (work / "models" / model / "config.json").is_file()


def test_reference_stats(pipeline):
    work, _, _ = pipeline
    with np.load(work / "data/reference/reference-domain.npz") as z:
        d = z["mu"].shape[0]
        assert z["sigma"].shape == (d, d) and z["features"].shape[1] == d
    # the FID Inception (installed by make install, offline) on the first reference_stats.inception_images images
    n = yaml.safe_load((work / "params.yaml").read_text())["reference_stats"]["inception_images"]
    with np.load(work / "data/reference/reference-inception.npz") as z:
        assert z["features"].shape == (n, 2048) and z["sigma"].shape == (2048, 2048)
        assert str(z["extractor"]) == "inception-v3-fid"
    m = json.loads((work / "metrics/reference_stats.json").read_text())
    assert m["num_real_inception"] == n and m["split"] == "test"


def _runs(work: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(work / "mlflow.db") as db:
        return db.execute("SELECT name, status FROM runs").fetchall()


def test_train_feature_net_outputs(pipeline):
    """The feature net behind domain FID: its config's data block, finite non-constant features of the configured
    size, and reloaded weights that score the reported test accuracy, well above chance (0.1)."""
    work, _, _ = pipeline
    metrics = json.loads((work / "metrics" / "train_feature_net.json").read_text())
    model, config = load_model_dir(work / "models" / "feature_net")
    tiny = yaml.safe_load((work / "params.yaml").read_text())["train_feature_net"]
    assert config["data"] == {"space": "pixel", "shape": [1, 8, 8], "num_classes": 10, "dataset": "digits",
                              "class_names": [str(i) for i in range(10)]}
    x, y = load_split(work / "data" / "shards", "test")
    with torch.no_grad():
        feats = model.features(x)
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert feats.shape == (len(x), tiny["feature_dim"]) and config["feature_dim"] == tiny["feature_dim"]
    assert torch.isfinite(feats).all() and feats.std() > 0
    assert acc == pytest.approx(metrics["test_accuracy"]) and acc > 0.5
    assert metrics["wall_seconds"] > 0 and metrics["test_count"] == len(y)
    assert ("train_feature_net", "FINISHED") in _runs(work)


def test_train_classifier_outputs(pipeline):
    """The noisy classifier, trained on two Ray workers (DDP): accuracy high at small t and near chance at large t,
    and a model folder that loads as a classifier of the diffusion model's process."""
    from diffusion_core.model_folders import diffusion_spec, load_classifier_dir
    from pipeline.config import load_params

    work, _, _ = pipeline
    metrics = json.loads((work / "metrics" / "train_classifier.json").read_text())
    keys = ["acc_t0_25", "acc_t25_50", "acc_t50_75", "acc_t75_100"]  # T = 100 in tiny.yaml
    assert set(keys) <= set(metrics) and metrics["num_workers"] == 2 and metrics["steps"] == 60
    accs = [metrics[k] for k in keys]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert accs[0] > accs[3] + 0.2, accs  # clean-ish inputs are classifiable, x_T is not
    assert accs[3] < 0.25 and min(accs) <= metrics["accuracy"] <= max(accs)
    params = load_params(work / "params.yaml", sections=("schedule", "diffusion"))
    bundle = load_classifier_dir(work / "models" / "classifier")
    assert isinstance(bundle.model, NoisyClassifier) and bundle.num_classes == 10
    assert bundle.config["diffusion"] == diffusion_spec(params.schedule.to_options(), params.diffusion.to_options())
    assert bundle.config["data"]["space"] == "pixel" and bundle.config["data"]["shape"] == [1, 8, 8]
    assert ("train_classifier", "FINISHED") in _runs(work)


def test_sweep_outputs(pipeline):
    work, _, _ = pipeline
    sys.path.insert(0, str(ROOT))
    from pipeline.config import load_params
    from pipeline.grid import sampling_trials

    sw = load_params(work / "params.yaml", ["sweep"]).sweep
    T = load_params(work / "params.yaml", ["schedule"]).schedule.num_timesteps
    trials = sampling_trials(sw.sampling, sw.num_samples, T, sw.spacing, sw.seed_sets)
    n_sampling = len(trials)
    n_training = len(sw.training.schedules) * len(sw.training.parameterizations)
    cross = sampling_trials(sw.training.samplers, sw.num_samples, T, sw.spacing, sw.seed_sets)
    with open(work / "reports/sweep.csv") as f:
        rows = list(csv.DictReader(f))
    finished = [r["setting"] for r in rows if r["axis"] == "training" and r["status"] == "completed"]
    assert finished and cross, "tiny's sweep crosses at least one finished short training with samplers"
    assert len(rows) == n_sampling + n_training + len(finished) * len(cross)
    assert sum(r["axis"] == "training" for r in rows) == n_training
    # every finished training under every sampler of sweep.training.samplers, summarized per pair
    crossed = [r for r in rows if r["axis"] == "training_x_sampling"]
    assert sorted({r["setting"].split("/")[0] for r in crossed}) == sorted(finished)
    with open(work / "reports/sweep_training_x_sampling.csv") as f:
        pairs = {r["setting"]: r for r in csv.DictReader(f)}
    assert set(pairs) == {r["setting"] for r in crossed}
    assert {p["sampler"] for p in pairs.values()} == {t["sampler"] for t in cross}
    for r in rows:
        assert float(r["fd_domain"]) >= 0 and float(r["nfe"]) > 0 and float(r["wall_seconds"]) > 0
        assert 0 <= float(r["precision_domain"]) <= 1 and 0 <= float(r["recall_domain"]) <= 1
        if r["guidance"] in ("cfg", "classifier"):
            assert 0 <= float(r["class_accuracy"]) <= 1
        if r["axis"] == "training" and r["status"] == "completed":
            # tiny is a class-conditional pixel model trained with label dropout: both bounds, each its own name
            assert float(r["nll_bpd_given_class"]) > 0 and float(r["nll_bpd"]) > 0
    for name in ("fd_vs_nfe", "guidance", "precision_recall", "training", "training_x_sampling"):
        png_ok(work / "reports/sweep" / f"{name}.png")
    # a line per sampler; distill's students (model: student, DDIM on their own grid) are a line of their own
    samplers = {"student" if r["model"] == "student" else r["sampler"] for r in rows if r["axis"] == "sampling"}
    assert "student" in samplers
    grids = list((work / "reports/sweep").glob("grid_*.png"))
    assert {g.name.split("_")[1] for g in grids} == samplers
    summary = json.loads((work / "metrics/sweep.json").read_text())
    assert set(summary["best"]) == samplers and summary["num_trials"] == len(rows)
    # the per-setting table: each setting's mean over its seed sets, recomputed here from the trial rows
    with open(work / "reports/sweep_summary.csv") as f:
        settings = {r["setting"]: r for r in csv.DictReader(f)}
    sampled = [r for r in rows if r["axis"] == "sampling"]
    assert set(settings) == {r["setting"] for r in sampled} and summary["num_settings"] == len(settings)
    for name, s in settings.items():
        fds = [float(r["fd_domain"]) for r in sampled if r["setting"] == name]
        assert int(s["seed_sets"]) == len(fds) and float(s["fd_domain"]) == pytest.approx(np.mean(fds), rel=1e-5)
    # selected: the lowest mean fd_domain under the rule
    sel, rule = summary["selected"], sw.select
    ok = [s for s in settings.values() if int(s["num_samples"]) == sw.num_samples
          and int(s["seed_sets"]) >= sw.seed_sets and float(s["nfe"]) <= rule.max_nfe + 1e-9]
    assert sel["setting"] == min(ok, key=lambda s: float(s["fd_domain"]))["setting"]
    assert len(sel["trials"]) == sw.seed_sets
    # fid_inception on the first sweep.inception_samples of each sampling trial in the first inception_seed_sets
    for r in sampled:
        has = int(r["seed_set"] or 0) < sw.inception_seed_sets
        assert (r["fid_inception"] != "") == has, r["trial"]
        if has:
            assert float(r["fid_inception"]) > 0 and int(r["inception_samples"]) == sw.inception_samples
    for s in settings.values():
        assert float(s["fid_inception"]) > 0 and int(s["inception_sets"]) == sw.inception_seed_sets


def test_evaluate_outputs(pipeline):
    work, _, _ = pipeline
    m = json.loads((work / "reports/metrics.json").read_text())
    for key in ("fd_domain", "kd_domain", "precision_domain", "recall_domain", "class_accuracy", "nll_bpd",
                "nll_bpd_given_class", "nfe", "num_samples"):
        assert isinstance(m[key], (int, float)), key
    params = yaml.safe_load((work / "params.yaml").read_text())["evaluate"]
    assert m["num_samples"] == params["num_samples"]
    assert m["fid_inception"] > 0 and m["inception_samples"] == params["inception_samples"]  # offline, installed
    used = json.loads((work / "reports/evaluate_setting.json").read_text())
    sel = json.loads((work / "metrics/sweep.json").read_text())["selected"]
    assert used["source"] == "sweep" and used["sweep_setting"] == sel["setting"]
    assert (used["sampler"], used["steps"]) == (sel["sampler"], sel["steps"]) and used["sweep_trials"] == sel["trials"]
    png_ok(work / "reports/samples.png")


def test_a_learned_variance_pixel_model_trains_samples_and_reports_bits_per_dim(pipeline):
    """tiny.yaml trains Improved DDPM's learned variances (learned_range, hybrid loss) in pixel space: the model
    folder says so and outputs twice the image channels, and evaluate reports its bits/dim through the learned
    variances (the bound's terms use them)."""
    from diffusion_core.model_folders import load_diffusion_dir

    work, _, _ = pipeline
    bundle = load_diffusion_dir(work / "models" / "diffusion")
    assert (bundle.diffusion.variance, bundle.diffusion.loss) == ("learned_range", "hybrid") and not bundle.is_latent
    x = torch.zeros(2, *bundle.shape)
    assert bundle.model(x, torch.zeros(2, dtype=torch.long), None).shape[1] == 2 * bundle.shape[0]
    m = json.loads((work / "reports/metrics.json").read_text())
    assert np.isfinite(m["nll_bpd"]) and m["nll_bpd"] > 0 and m["nll_bpd_se"] >= 0


def test_distilled_students_sample_from_their_folder_in_one_call_a_step(pipeline):
    """distill ran on 2 Ray workers after train_diffusion; its family samples by path at each distilled step count
    with classifier-free guidance as an input (NFE = steps), and refuses a step count it was not distilled for."""
    from diffusion_core.generation import SamplingError, SamplingSpec, generate
    from diffusion_core.model_folders import load_diffusion_dir

    work, log, _ = pipeline
    assert log.index("Running stage 'distill'") > log.index("Running stage 'train_diffusion'")
    metrics = json.loads((work / "metrics/distill.json").read_text())
    rounds = yaml.safe_load(TINY.read_text())["distill"]["rounds"]
    assert metrics["rounds"] == rounds and all(np.isfinite(metrics[f"final_loss_{n}_steps"]) for n in rounds)
    bundle = load_diffusion_dir(work / "models/student")
    for steps in rounds:
        r = generate(bundle, 4, SamplingSpec("ddim", steps, guidance="cfg", scale=2.0), classes=[1, 2])
        assert r["nfe"] == steps and r["images"].shape[0] == 4
    with pytest.raises(SamplingError, match="distilled for"):
        generate(bundle, 4, SamplingSpec("ddim", 3, guidance="cfg", scale=2.0))


def test_mlflow_holds_one_run_per_stage_and_one_nested_run_per_trial(pipeline):
    work, _, stages = pipeline
    db = sqlite3.connect(work / "mlflow.db")
    runs = db.execute("SELECT run_uuid, name, status FROM runs").fetchall()
    parents = dict(db.execute("SELECT run_uuid, value FROM tags WHERE key = 'mlflow.parentRunId'").fetchall())
    top = [(uid, name, status) for uid, name, status in runs if uid not in parents]
    assert sorted(name for _, name, _ in top) == sorted(stages), "one MLflow run per stage"
    assert all(status == "FINISHED" for *_, status in top)
    sweep_id = next(uid for uid, name, _ in top if name == "sweep")
    with open(work / "reports/sweep.csv") as f:
        trials = {r["trial"] for r in csv.DictReader(f)}
    nested = [name for uid, name, _ in runs if parents.get(uid) == sweep_id]
    assert sorted(nested) == sorted(f"sweep/{t}" for t in trials)
    assert len(parents) == len(nested), "nested runs only under the sweep"


def test_second_repro_is_a_no_op(pipeline):
    work, _, _ = pipeline
    out = dvc(work, "repro", timeout=900)
    assert "Running stage" not in out
    assert "up to date" in out.lower()


def test_no_absolute_path_of_this_machine_in_models_or_checkpoints(pipeline):
    """Model folders and checkpoints travel (object storage, another node, a colleague's checkout): no byte of them
    names the folder the pipeline ran in, nor this user's home."""

    work, _, _ = pipeline
    needles = {str(work).encode(), str(work.resolve()).encode(), os.path.expanduser("~").encode() + b"/"}
    files = [f for d in ("models", "checkpoints") for f in (work / d).rglob("*") if f.is_file()]
    assert len([f for f in files if f.name == "config.json"]) >= 5  # the four model folders and checkpoints
    baked = sorted(str(f.relative_to(work)) for f in files if any(n in f.read_bytes() for n in needles))
    assert baked == []


def test_no_secrets_in_the_store_or_the_output(pipeline):
    """Every stage ran with fake secrets in its environment (Ray workers inherit it): none reached the MLflow store
    (any run's params, tags, any byte of mlflow.db, any artifact) or dvc's output."""
    work, log, _ = pipeline
    for secret in SECRETS.values():
        assert secret not in log
    assert_store_holds_no_secret_or_environment(work, list(SECRETS.values()))


# Ray's own chatter seen in a default `make repro`: the Train placement-group cleaner polling a State API
# that a dashboard-less local Ray does not have (546 lines), one INFO line per ray.train.report of every rank, the
# preemption watcher's set-up error; and the rank-0 worker's lines printed twice (Train's print patch)
RAY_NOISE = ("Failed to query Ray Train Controller", "Reporting training result", "has constructor arguments in the")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_console_is_quiet(pipeline):
    """No known Ray noise line, and no line from a Ray process said twice (progress bars aside)."""
    _, log, _ = pipeline
    lines = [ANSI.sub("", ln).strip() for ln in log.replace("\r", "\n").splitlines()]
    noise = [ln for ln in lines if any(n in ln for n in RAY_NOISE)]
    assert not noise, f"{len(noise)} Ray noise lines, e.g. {noise[0]}"
    from_ray = [ln for ln in lines if re.match(r"^\(\w+ pid=\d+", ln) and not re.search(r"\d+%\|", ln)]
    repeated = sorted({ln for ln in from_ray if from_ray.count(ln) > 1})
    at = lines.index(repeated[0]) if repeated else 0
    assert not repeated, f"said more than once: {repeated[:3]}; around the first:\n" + "\n".join(lines[at - 15:at + 5])
    tb = next((i for i, ln in enumerate(lines) if "Traceback (most recent call last)" in ln), None)
    assert tb is None, "a traceback on the console:\n" + "\n".join(lines[max(tb - 3, 0):tb + 20])


# README's experiments: each variant takes fresh evaluate seeds (clear of the sweep's), so only `evaluate` reruns
EXPERIMENTS = {"seed2m": 2_000_000}  # each variant costs about a minute
EXP_TABLE = ("exp", "show", "--only-changed", "--drop", "Created|kd_|nll_|precision_|recall_|.*seconds",
             "--keep", "fd_domain|class_accuracy")


@pytest.fixture(scope="module")
def experiments(pipeline, tmp_path_factory):
    """The repro (a copy: the shared one stays as it ran) committed as the baseline, then `dvc exp run -n NAME -S
    evaluate.seed=N` per EXPERIMENTS entry in the workspace; what evaluate wrote (reports/metrics.json) is kept after
    each run. The variants log to an MLflow store of their own, so the one-run-per-stage check holds whichever order
    the tests run in. Returns the copy too."""
    work = copy_checkout(pipeline[0], tmp_path_factory.mktemp("experiments") / "w")
    git(work, "add", "-A")  # README's `git add -A`: dvc.lock, metrics/, reports/ (data and models are ignored)
    git(work, "commit", "-q", "-m", "baseline: dvc repro")
    head = git(work, "rev-parse", "HEAD").strip()
    written, logs = {"baseline": json.loads((work / "reports/metrics.json").read_text())}, {}
    store = f"sqlite:///{tmp_path_factory.mktemp('exp_store') / 'mlflow.db'}"
    for name, seed in EXPERIMENTS.items():
        logs[name] = dvc(work, "exp", "run", "-n", name, "-S", f"evaluate.seed={seed}", timeout=900,
                          MLFLOW_TRACKING_URI=store)
        written[name] = json.loads((work / "reports/metrics.json").read_text())
    return head, written, logs, dvc_json(work, "exp", "show"), work


def _exp_revs(show: list, head: str) -> dict[str, tuple[str, dict]]:
    """`dvc exp show --json` -> {"baseline" | experiment name: (commit, its data)}."""
    base = next(e for e in show if e["rev"] == head)
    revs = {"baseline": (head, base["data"])}
    for group in base.get("experiments") or []:
        for r in group["revs"]:
            revs[r["name"]] = (r["rev"], r["data"])
    return revs


def test_exp_run_reruns_only_what_the_param_feeds(experiments):
    _, _, logs, _, _ = experiments
    for name, log in logs.items():
        assert re.findall(r"Running stage '(\w+)'", log) == ["evaluate"], name
        assert f"Ran experiment(s): {name}" in log


def test_exp_show_lists_each_variant_with_its_metrics_and_changed_param(experiments):
    """Each row's fd_domain and class_accuracy are what evaluate wrote in that run and what the experiment's commit
    holds (so `dvc exp push` shares them); its evaluate.seed is the `-S` value, in exp show and in the commit."""
    head, written, _, show, work = experiments
    revs = _exp_revs(show, head)
    seeds = {"baseline": yaml.safe_load(git(work, "show", f"{head}:params.yaml"))["evaluate"]["seed"], **EXPERIMENTS}
    assert set(revs) == set(seeds)
    for name, (rev, data) in revs.items():
        entry = data["metrics"]["reports/metrics.json"]
        assert "data" in entry, f"{name}: exp show cannot read reports/metrics.json (git-ignored?): {entry}"
        shown = entry["data"]
        committed = json.loads(git(work, "show", f"{rev}:reports/metrics.json"))
        for key in ("fd_domain", "class_accuracy"):
            assert shown[key] == written[name][key] == committed[key], (name, key)
        assert data["params"]["params.yaml"]["data"]["evaluate"]["seed"] == seeds[name]
        assert yaml.safe_load(git(work, "show", f"{rev}:params.yaml"))["evaluate"]["seed"] == seeds[name]
    fds = [written[name]["fd_domain"] for name in revs]
    assert len(set(fds)) == len(fds), "fresh seeds, fresh samples: each variant is measured anew"
    # README's table: the changed param and the two metrics, a row per variant
    table = dvc(work, *EXP_TABLE, timeout=900)
    header = next(ln for ln in table.splitlines() if "Experiment" in ln)
    assert {"class_accuracy", "fd_domain", "evaluate.seed"} <= set(header.split())
    for name, seed in EXPERIMENTS.items():
        assert re.search(rf"\[{name}\].*\s{seed}\s", table), table


def test_plots_show_renders_the_loss_curve_and_fd_vs_nfe(pipeline):
    """`dvc plots show --json` and the page `dvc plots show` writes (dvc_plots/index.html): the training loss curve
    (step, loss) and FD vs NFE (nfe, each sweep setting's mean fd_domain) carry exactly the points in reports/."""
    work, _, _ = pipeline
    try:
        plots = {name: spec["content"] for name, (spec,) in dvc_json(work, "plots", "show")["data"].items()
                 if spec["type"] == "vega"}
        dvc(work, "plots", "show", timeout=900)
        html = (work / "dvc_plots/index.html").read_text()
    finally:
        shutil.rmtree(work / "dvc_plots", ignore_errors=True)  # leave the workspace as the other tests expect it
    rendered = {spec["title"]["text"]: spec for spec in _html_specs(html)}
    loss = json.loads((work / "reports/train_diffusion_loss.json").read_text())
    with open(work / "reports/sweep_summary.csv") as f:
        settings = list(csv.DictReader(f))
    expected = {"reports/train_diffusion_loss.json": ("step", "loss", [(r["step"], r["loss"]) for r in loss]),
                "fd_vs_nfe": ("nfe", "fd_domain", [(float(s["nfe"]), float(s["fd_domain"])) for s in settings]),
                "fid_vs_nfe": ("nfe", "fid_inception", [(float(s["nfe"]), float(s["fid_inception"]))
                                                        for s in settings])}
    assert len(loss) >= 2 and len(settings) >= 2
    for name, (x, y, points) in expected.items():
        for spec in (plots[name], rendered[name]):
            assert spec["encoding"]["x"]["field"] == x
            assert y in {enc["y"]["field"] for enc in _encodings(spec) if "y" in enc}
            assert sorted((float(v[x]), float(v[y])) for v in spec["data"]["values"]) == sorted(points), name


def _encodings(spec: dict):
    """Every `encoding` of a vega-lite spec, layers included."""
    if "encoding" in spec:
        yield spec["encoding"]
    for layer in spec.get("layer", []):
        yield from _encodings(layer)


def _html_specs(html: str) -> list[dict]:
    """The vega-lite specs embedded in the page `dvc plots show` writes (`var spec = {...}`, one per plot)."""
    decoder, at, specs = json.JSONDecoder(), 0, []
    while (at := html.find("var spec = ", at)) >= 0:
        spec, at = decoder.raw_decode(html, at + len("var spec = "))
        specs.append(spec)
    return specs
