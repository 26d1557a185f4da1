"""Stage `sweep` (Ray Tune): which schedule, parameterization, sampler, step count, eta and guidance give the best
samples, at what cost -> `reports/sweep.csv` (one row a trial), `reports/sweep/*.png`, `metrics/sweep.json`.

Two Tune runs under one MLflow run `sweep`, one nested MLflow run per trial (params and metrics, logged by the
driver from Tune's results so SQLite has one writer):
- training-time axis (`sweep.training`): schedule x parameterization, each trial a short training run from scratch
  with train_diffusion's settings otherwise. The loop runs in-process inside the Tune function trainable (the
  library's `Trainer` + `train_loop`, the same code each Ray Train worker of train_diffusion runs, with
  one worker): a TorchTrainer nested in a Tune trial would need its own worker group per trial (2 more processes,
  each with its start-up) and could not report to ASHA before it finished. Every
  `eval_every` steps the trial samples `eval_samples` images and reports fd_domain, so ASHA stops the worse ones.
  A trial that finishes then samples every setting of `sweep.training.samplers` (same seeds as the sampling
  grid): samplers x formulation/schedule on the same trained models, reports/sweep_training_x_sampling.csv.
- sampling-time axes (`sweep.sampling` blocks): sampler x steps x grid x eta x guidance x scale on
  models/diffusion, each setting `seed_sets` trials of `num_samples` samples; seed set k uses seeds
  seed + k*n .. seed + (k+1)*n - 1 (sample i of set k is the same noise in every trial). reports/sweep_summary.csv
  has one row per setting (mean, std, min, max over its sets); the plots draw the means with one-std error bars.
  metrics/sweep.json `selected` is the best setting under sweep.select's rule (evaluate's `setting: sweep`).
Trials run side by side, `max_concurrent` at a time with `cpus_per_trial` CPUs each; Ray storage is ray_results/.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from diffusion_core.evaluation import DOMAIN, INCEPTION, load_reference
from diffusion_core.io import atomic_write_json, atomic_write_text
from pipeline.config import ConfigError, load_params, validate_params
from pipeline.grid import CROSS_AXIS, cross_rows, sampling_trials, setting_name, trial_name, trial_seed

from ._stage import run_stage

STAGE = "sweep"
SECTIONS = ("project", "tracking", "data", "schedule", "diffusion", "train_diffusion", "reference_stats", STAGE)
MODEL, CLASSIFIER, FEATURE_NET, AUTOENCODER = "models/diffusion", "models/classifier", "models/feature_net", \
    "models/autoencoder"
STUDENT = "models/student"  # distill's students, sampled by `model: student` blocks
REFERENCE, CSV, SUMMARY, PLOTS, METRICS = Path("data/reference"), Path("reports/sweep.csv"), \
    Path("reports/sweep_summary.csv"), Path("reports/sweep"), Path("metrics/sweep.json")
CROSS_SUMMARY = Path("reports/sweep_training_x_sampling.csv")  # one row per (training setting, sampling setting)
METRIC_KEYS = ("fd_domain", "fid_inception", "kid_inception", "kid_inception_std", "inception_samples", "kd_domain",
               "kd_domain_std", "precision_domain", "recall_domain", "class_accuracy", "nll_bpd", "nll_bpd_se",
               "nll_bpd_given_class", "nll_bpd_given_class_se", "loss", "nfe", "classifier_nfe", "wall_seconds")


class Stopwatch:
    """Wall seconds since creation (perf_counter)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def _enter_trial(config: dict):
    """Common start of a trial: repo root as cwd, one thread per CPU, the domain extractor and its reference."""
    os.chdir(config["root"])
    threads = str(config["threads"])
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
    import torch

    torch.set_num_threads(int(threads))
    from diffusion_core.metrics.fidelity import domain_extractor

    return domain_extractor(FEATURE_NET, cuda=config["device"] == "cuda"), load_reference(REFERENCE, DOMAIN)


def _inception(config: dict, trial: dict) -> tuple:
    """(FID Inception extractor, its reference) for a trial whose seed set is among the first
    sweep.inception_seed_sets, else (None, None)."""
    if not config["inception_samples"] or trial.get("seed_set", 0) >= config["inception_seed_sets"]:
        return None, None
    rs = config["params"]["reference_stats"]
    return _inception_extractor(rs["inception_weights"], rs["inception_download"], config["device"] == "cuda"), \
        load_reference(REFERENCE, INCEPTION)


_EXTRACTORS: dict = {}  # one FID Inception per trial actor (Tune reuses actors): 87 MB of weights, read and hashed


def _inception_extractor(weights: str | None, download: bool, cuda: bool):
    from diffusion_core.metrics.fidelity import inception_extractor

    key = (weights, download, cuda)
    if key not in _EXTRACTORS:
        _EXTRACTORS.clear()
        _EXTRACTORS[key] = inception_extractor(weights, download=download, cuda=cuda)
    return _EXTRACTORS[key]


def sampling_trial(config: dict) -> None:
    """Tune trainable: one sample set of models/diffusion at one setting; reports its metrics once."""
    from ray import tune

    from diffusion_core.evaluation import sample_metrics
    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.model_folders import load_classifier_dir, load_diffusion_dir
    watch = Stopwatch()
    ext, ref = _enter_trial(config)
    t = config["trial"]
    bundle = load_diffusion_dir(STUDENT if t.get("model") == "student" else MODEL)
    clf = load_classifier_dir(CLASSIFIER) if t["guidance"] == "classifier" else None
    spec = SamplingSpec.from_setting(t, spacing=t.get("spacing", config["spacing"]))
    out = generate(bundle, t["num_samples"], spec, classifier_bundle=clf, seed=trial_seed(t, config["seed"]),
                   batch_size=config["batch_size"], bf16=config["bf16"], channels_last=config["channels_last"],
                   device=config["device"])
    inception = _inception(config, t)
    metrics = sample_metrics(out["images"], out["labels"], ref, ext, *inception,
                             inception_samples=config["inception_samples"])
    k = config["grid_samples"]
    staged = Path(config["staging"]) / f"{trial_name(t)}.npz"
    np.savez(staged.with_suffix(".tmp.npz"), images=out["images"][:k], labels=out["labels"][:k])
    os.replace(staged.with_suffix(".tmp.npz"), staged)  # a trial killed mid-write leaves no half file
    tune.report({**metrics, "nfe": out["nfe"], "classifier_nfe": out["classifier_nfe"],
                 "sampling_seconds": out["seconds"], "wall_seconds": watch.seconds})


def training_trial(config: dict) -> None:
    """Tune trainable: a short training run with one (schedule, parameterization); reports every eval_every steps."""
    from ray import tune

    from diffusion_core.evaluation import nll_on_test, sample_metrics
    from diffusion_core.generation import SamplingSpec, generate
    from pipeline.short_training import short_training

    watch = Stopwatch()
    ext, ref = _enter_trial(config)
    params = validate_params(config["params"], SECTIONS)
    t, td, tc, sw = config["trial"], params.train_diffusion, params.sweep.training, params.sweep
    data, decoder, data_block, x_test, y_test = _trial_data(params)
    num_classes = data_block["num_classes"]
    schedule = params.schedule.model_copy(update={"name": t["schedule"]})
    diffusion = params.diffusion.model_copy(update={"parameterization": t["parameterization"]})
    guidance = tc.eval_guidance if num_classes is not None else "none"

    def on_eval(step: int, bundle, loss) -> None:
        spec = SamplingSpec(tc.eval_sampler, min(tc.eval_steps, schedule.num_timesteps), sw.spacing,
                            guidance=guidance, scale=tc.eval_scale)
        out = generate(bundle, tc.eval_samples, spec, seed=sw.seed, batch_size=sw.batch_size, bf16=sw.bf16,
                       channels_last=sw.channels_last, device=config["device"])
        metrics = {**sample_metrics(out["images"], out["labels"], ref, ext), "nfe": out["nfe"], "loss": loss,
                   "step": step}
        if step >= tc.steps and x_test is not None:
            metrics.update(nll_on_test(bundle, x_test, y_test, tc.nll_samples, seed=sw.seed))
        if step >= tc.steps and config["cross"]:  # the finished model under every sampler of training.samplers
            metrics["cross_json"] = json.dumps([_cross_point(bundle, sub, config, num_classes is not None, ref, ext)
                                                for sub in config["cross"]])
        tune.report({**metrics, "guidance": guidance, "wall_seconds": watch.seconds})

    short_training(td, schedule, diffusion, data, data_block, decoder, steps=tc.steps, batch_size=tc.batch_size,
                   eval_every=tc.eval_every, on_eval=on_eval, device=config["device"])


def _trial_data(params) -> tuple:
    """(training data in memory, the latent decoder or None, the model folder's data block, test images and labels
    for NLL or None, None): what train_diffusion would train on, pixels or scaled latents."""
    from diffusion_core.data import load_split, read_meta
    from diffusion_core.model_folders import load_autoencoder_decoder
    from diffusion_core.rank_data import load_rank_data

    td, tc = params.train_diffusion, params.sweep.training
    latent = td.space == "latent"
    shard_dir = Path("data/latents" if latent else "data/shards")
    meta = read_meta(shard_dir)
    scale = float(meta["scale_factor"]) if latent else 1.0
    data = load_rank_data(shard_dir, 0, 1, scale=scale, verify_checksums=params.data.verify_checksums,
                          on_bad_shard=params.data.on_bad_shard)
    decoder = load_autoencoder_decoder(AUTOENCODER, scale) if latent else None
    num_classes = int(meta["num_classes"]) if td.conditional else None
    data_block = {"space": td.space, "shape": list(meta["sample_shape"]), "num_classes": num_classes, "kind": "image",
                  "label_dropout": td.label_dropout if num_classes is not None else 0.0}
    x_test = y_test = None
    if not latent and tc.nll_samples >= 2:
        x_test, y_test = load_split(shard_dir, "test", meta=meta)
    return data, decoder, data_block, x_test, y_test


def _cross_point(bundle, sub: dict, config: dict, conditional: bool, ref, ext) -> dict:
    """One sample set of a short-trained model at sampling setting `sub` (sweep.training.samplers): its metrics."""
    from diffusion_core.evaluation import sample_metrics
    from diffusion_core.generation import SamplingSpec, generate
    watch = Stopwatch()
    guidance = sub["guidance"] if conditional else "none"
    out = generate(bundle, sub["num_samples"], SamplingSpec.from_setting(sub, guidance=guidance),
                   seed=trial_seed(sub, config["seed"]), batch_size=config["batch_size"], bf16=config["bf16"],
                   channels_last=config["channels_last"], device=config["device"])
    return {**sample_metrics(out["images"], out["labels"], ref, ext), "nfe": out["nfe"],
            "wall_seconds": watch.seconds}


def trial_progress(desc: str, total: int):
    """A Tune callback: one tqdm bar of finished/total trials, with the running count and the best fd_domain so far.

    Tune pickles it with the run (tuner.pkl) and restores that copy on `Tuner.restore`: the bar is made lazily and
    counts from the trial states Tune passes, so a resumed sweep's bar starts at the trials it already has."""
    from ray import tune

    class TrialProgress(tune.Callback):
        def __init__(self):
            self._bar, self._shown = None, None

        def __getstate__(self) -> dict:
            return {"_bar": None, "_shown": None}

        def _update(self, trials) -> None:
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            running = sum(t.status == "RUNNING" for t in trials)
            fds = [t.last_result.get("fd_domain") for t in trials if t.last_result]
            fds = [f for f in fds if isinstance(f, (int, float)) and math.isfinite(f)]
            state = (done, running, min(fds) if fds else None)
            if state == self._shown:
                return
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="trial", dynamic_ncols=True)
            self._shown = state
            self._bar.n = done
            self._bar.set_postfix_str(f"running {running}" + (f", best fd_domain {state[2]:.4g}" if fds else ""))

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            self._update(trials)

        def on_experiment_end(self, trials: list, **info) -> None:
            self._update(trials)
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    return TrialProgress()


def _tune(trainable, trials: list[dict], common: dict, sw, name: str, scheduler=None):
    """Run one grid of trials (or finish the interrupted run of that name: its finished trials are kept, the
    others rerun); returns Tune's ResultGrid, raising a one-line RayError if any trial failed."""
    from ray import tune

    from ._ray import VERBOSE_ENV, RayError

    # Ctrl+C stops the stage (exit 130, the Tune run kept for the rerun to finish), where Tune's own handler would
    # end fit() early and hand back a part of the grid as if it were all of it
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    if os.environ.get(VERBOSE_ENV) != "1":
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # its start-up table prints even at verbose=0
    path = Path("ray_results").resolve() / name
    resources = {"cpu": sw.cpus_per_trial, **({"gpu": sw.gpus_per_trial} if sw.gpus_per_trial else {})}
    trainable = tune.with_resources(trainable, resources)
    space = {**common, "trial": tune.grid_search(trials)}
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, restart_errored=True, param_space=space)
        done = sum(1 for f in path.glob("*/result.json") if f.stat().st_size)
        print(f"{STAGE}: resuming the interrupted Tune run {path.name}/ ({done} of {len(trials)} trials had "
              "reported; finished ones are kept)", flush=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            # one trial actor serves trial after trial (a process with its torch and Ray imports once per actor, not
            # per trial)
            tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=sw.max_concurrent,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=name, storage_path=str(path.parent), verbose=0,
                                      callbacks=[trial_progress(f"{STAGE} {name.rsplit('-', 1)[1]}", len(trials))]))
    results = tuner.fit()
    if results.errors:
        e = results.errors[0]
        raise RayError(f"{STAGE}: {len(results.errors)} trial(s) failed; first: {type(e).__name__}: "
                       f"{' '.join(str(e).split())[-400:]}")
    return results


def _sweep_key(params) -> str:
    """Hash of the params and the input files (size and mtime) the trials read: an interrupted sweep's Tune runs
    are resumed only by a sweep with the same key, so a retrained model or changed grid starts afresh."""
    from pipeline.config import params_hash

    inputs = {}
    for folder in (MODEL, STUDENT, CLASSIFIER, FEATURE_NET, AUTOENCODER, REFERENCE, "data/shards", "data/latents"):
        for f in sorted(Path(folder).rglob("*")):
            if f.is_file():
                st = f.stat()
                inputs[str(f)] = [st.st_size, st.st_mtime_ns]
    return params_hash({"params": params.to_dict(*SECTIONS[2:]), "inputs": inputs})


def _row(result, axis: str, max_reports: int = 0) -> tuple[dict, list[dict]]:
    """A CSV row and the report history of one Tune result."""
    t, m = result.config["trial"], result.metrics or {}
    history = [] if result.metrics_dataframe is None else result.metrics_dataframe.to_dict("records")
    row = {"trial": trial_name(t), "setting": setting_name(t), "axis": axis, **t, **{k: m.get(k) for k in METRIC_KEYS}}
    if axis == "training":
        row["train_steps"] = m.get("step")
        row["status"] = "completed" if m.get("training_iteration", 0) >= max_reports else "pruned"
    else:
        row["status"] = "completed"
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}, history


def _brief(row: dict) -> dict:
    """The config and main metrics of a trial or setting row for metrics/sweep.json (empty values dropped)."""
    keys = ("setting", "trial", "schedule", "parameterization", "model", "sampler", "steps", "eta", "spacing",
            "options", "guidance", "scale", "num_samples", "seed_sets", "nfe", "fd_domain", "fd_domain_std",
            "fid_inception", "fid_inception_std", "inception_samples", "inception_sets", "kid_inception", "kd_domain",
            "precision_domain", "recall_domain", "class_accuracy", "nll_bpd", "nll_bpd_given_class", "trials")
    return {k: row[k] for k in keys if row.get(k) is not None}


def _selected(settings: list[dict], sw) -> dict | None:
    """sweep.select's pick, with the rule and the seeds it was chosen on (evaluate must sample other seeds)."""
    from pipeline.reports import select_setting

    rule = sw.select
    sets = sw.inception_seed_sets if rule.metric == "fid_inception" else sw.seed_sets
    best = select_setting(settings, sw.num_samples, rule.max_nfe, rule.min_class_accuracy, sets, rule.metric,
                          rule.models)
    if best is None:
        return None
    n = f"the first {sw.inception_samples} of " if rule.metric == "fid_inception" else ""
    return {**_brief(best), "trials": best["trials"].split(";"), "metric": rule.metric,
            "rule": f"lowest mean {rule.metric} over {sets} seed sets of {n}{sw.num_samples} samples, "
                    f"NFE <= {rule.max_nfe}, class_accuracy >= {rule.min_class_accuracy}, "
                    f"models {' or '.join(rule.models)}",
            "seeds": [sw.seed, sw.seed + best["seed_sets"] * best["num_samples"]]}


def _grids(rows: list[dict], staging: Path, target_nfe: int | None) -> dict[str, Path]:
    """One sample grid per sampler at (nearest to) a common NFE; returns {sampler: png}."""
    from diffusion_core.data.preview import save_image_grid
    from pipeline.reports import reference_setting, sampler_of

    ref = reference_setting(rows)
    pool = [r for r in rows if (r["guidance"], r["scale"], r["eta"]) == ref and not r.get("seed_set")] or rows
    by_sampler = {s: [r for r in pool if sampler_of(r) == s] for s in sorted(set(map(sampler_of, pool)))}
    common = set.intersection(*({round(r["nfe"]) for r in rs} for rs in by_sampler.values())) if by_sampler else set()
    target = target_nfe or (max(common) if common else min(max(r["nfe"] for r in rs) for rs in by_sampler.values()))
    out = {}
    for sampler, rs in by_sampler.items():
        r = min(rs, key=lambda r: abs(r["nfe"] - target))
        with np.load(staging / f"{r['trial']}.npz") as z:
            images = z["images"]
        out[sampler] = PLOTS / f"grid_{sampler}_nfe{round(r['nfe'])}.png"
        save_image_grid(images, out[sampler], nrow=10, scale=max(1, 56 // images.shape[1]))
    return out


def _run(args) -> None:
    from pipeline.tracking import start_run

    from ._ray import init_ray

    params = load_params(args.params, sections=SECTIONS)
    sw = params.sweep
    train_trials, cross, trials = _grid_trials(params)
    _check_references(params)
    name, staging = _staging(params)
    previous_run = staging.parent / "mlflow_run_id"  # the MLflow run of the interrupted sweep, if any
    common = {"root": str(Path.cwd().resolve()), "threads": sw.cpus_per_trial, "seed": sw.seed,
              "batch_size": sw.batch_size, "spacing": sw.spacing, "grid_samples": sw.grid_samples, "bf16": sw.bf16,
              "channels_last": sw.channels_last, "staging": str(staging), "cross": cross,
              "inception_samples": sw.inception_samples, "inception_seed_sets": sw.inception_seed_sets,
              "device": "cuda" if sw.gpus_per_trial else "cpu",  # Ray shows a trial only the GPUs it asked for
              "params": json.loads(json.dumps(params.to_dict(*SECTIONS)))}
    t0 = time.perf_counter()
    init_ray()
    with start_run(STAGE, params.to_dict("project", "schedule", "diffusion", STAGE), params.tracking,
                   experiment=params.project.experiment,
                   continues=previous_run.read_text() if previous_run.is_file() else None) as run:
        if run.run_id:
            atomic_write_text(previous_run, run.run_id)
        rows, histories = _trials(train_trials, trials, cross, common, sw, name)
        summary, artifacts = _reports(rows, histories, sw, staging, t0)
        _log_trials(rows, histories, params)
        run.log_metrics({"num_trials": summary["num_trials"], "wall_seconds": summary["wall_seconds"]})
        if summary["selected"]:
            keys = ("fd_domain", "fd_domain_std", "fid_inception", "fid_inception_std", "nfe")
            run.log_metrics({f"selected_{k}": summary["selected"][k] for k in keys if k in summary["selected"]})
        for path in artifacts:
            run.log_artifact(path, "sweep")
    shutil.rmtree(staging.parent, ignore_errors=True)
    for sub in ("training", "sampling"):
        shutil.rmtree(Path("ray_results") / f"{name}-{sub}", ignore_errors=True)
    print(_summary_line(rows, summary))


def _summary_line(rows: list, summary: dict) -> str:
    sel = summary["selected"]
    fid = f", fid_inception {sel['fid_inception']:.4g}" if sel and "fid_inception" in sel else ""
    picked = (f"; selected {sel['setting']} (fd_domain {sel['fd_domain']:.4g} over {sel['seed_sets']} set(s){fid}, "
              f"{sel['nfe']:.0f} NFE)" if sel else "; no setting passes sweep.select")
    return (f"{STAGE}: {len(rows)} trials ({summary['num_pruned']} pruned) in {summary['wall_seconds']} s -> {CSV}, "
            f"{SUMMARY}, {PLOTS}/, {METRICS}{picked}")


def _check_references(params) -> None:
    """One-line errors before Ray starts: a missing reference ("run reference_stats"), or Inception asked of the
    trials without reference_stats computing its statistics."""
    sw = params.sweep
    load_reference(REFERENCE, DOMAIN)
    if sw.inception_samples:
        if not params.reference_stats.inception:
            raise ConfigError("sweep.inception_samples > 0 needs reference_stats.inception: true (or set "
                              "sweep.inception_samples: 0)")
        load_reference(REFERENCE, INCEPTION)
    if sw.select.metric == "fid_inception" and not sw.inception_samples:
        raise ConfigError("sweep.select.metric fid_inception needs sweep.inception_samples > 0")


def _check_students(sw) -> None:
    """`model: student` blocks need distill's folder and ask only the step counts it was distilled for."""
    if any(b.model == "student" for b in sw.training.samplers):
        raise ConfigError("sweep.training.samplers cannot use model: student (the students are distilled from "
                          "models/diffusion, not from the short trainings): drop the model key there")
    blocks = [(i, b) for i, b in enumerate(sw.sampling) if b.model == "student"]
    if not blocks:
        return
    path = Path(STUDENT) / "config.json"
    if not path.is_file():
        raise ConfigError(f"sweep.sampling has model: student blocks but {STUDENT}/ is missing: run distill first")
    student = json.loads(path.read_text())["student"]
    distilled = student["steps"]
    for i, b in blocks:
        if b.samplers != (student["sampler"],):
            raise ConfigError(f"sweep.sampling[{i}] (model: student) samples with {b.samplers[0]} but {STUDENT} "
                              f"({student['method']}) samples with {student['sampler']}: set samplers: "
                              f"[{student['sampler']}]")
        bad = [n for n in b.steps if n not in distilled]
        if bad:
            raise ConfigError(f"sweep.sampling[{i}] (model: student) asks {bad[0]} steps; {STUDENT} was distilled "
                              f"for {', '.join(map(str, distilled))}: use those (distill.rounds)")


def _grid_trials(params) -> tuple[list, list, list]:
    """(training trials, the sampling settings each is crossed with, sampling trials of models/diffusion)."""
    sw, tc = params.sweep, params.sweep.training
    T = json.loads((Path(MODEL) / "config.json").read_text())["diffusion"]["num_timesteps"]
    train_trials = [{"schedule": s, "parameterization": p} for s in tc.schedules for p in tc.parameterizations]
    _check_students(sw)
    cross = sampling_trials(tc.samplers, sw.num_samples, params.schedule.num_timesteps, sw.spacing, sw.seed_sets)
    return train_trials, cross, sampling_trials(sw.sampling, sw.num_samples, T, sw.spacing, sw.seed_sets)


def _staging(params) -> tuple[str, Path]:
    """(Tune run name, staging folder for sample grids). The name is fixed by the params and inputs, so a sweep
    killed part-way is finished by the next one (Tune's restore); an interrupted sweep of other params is removed."""
    name = f"{STAGE}-{_sweep_key(params)[:12]}"
    for stale in Path("ray_results").glob(f"{STAGE}-*"):
        if not stale.name.startswith(name):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path("ray_results").resolve() / name / "samples"
    staging.mkdir(parents=True, exist_ok=True)
    return name, staging


def _trials(train_trials: list, trials: list, cross: list, common: dict, sw, name: str) -> tuple[list, dict]:
    """Run the training axis (ASHA-pruned, each crossed with `cross`) and the sampling axis; rows in grid order
    (whatever order Tune hands results back in: a restored run's differs), and the training curves."""
    tc, rows, histories = sw.training, [], {}
    if train_trials:
        from ray.tune.schedulers import ASHAScheduler

        max_reports = math.ceil(tc.steps / tc.eval_every)
        asha = ASHAScheduler(metric="fd_domain", mode="min", time_attr="training_iteration", max_t=max_reports,
                             grace_period=min(tc.grace_period, max_reports), reduction_factor=tc.reduction_factor)
        for result in _tune(training_trial, train_trials, common, sw, f"{name}-training", asha):
            row, hist = _row(result, "training", max_reports)
            row.update(sampler=tc.eval_sampler, steps=tc.eval_steps, eta=0.0, num_samples=tc.eval_samples,
                       guidance=result.metrics.get("guidance", tc.eval_guidance), scale=tc.eval_scale)
            rows.append(row)
            histories[row["trial"]] = hist
            rows += cross_rows({**row, "cross": cross}, result.metrics.get("cross_json"))
    if trials:
        rows += [_row(r, "sampling")[0] for r in _tune(sampling_trial, trials, common, sw, f"{name}-sampling")]
    order = {trial_name(t): i for i, t in enumerate([*train_trials, *cross, *trials])}
    axes = {"training": 0, CROSS_AXIS: 1, "sampling": 2}
    rows.sort(key=lambda r: (axes[r["axis"]], *(order.get(part, len(order)) for part in r["trial"].split("/"))))
    return rows, {k: histories[k] for k in sorted(histories, key=lambda k: order.get(k, len(order)))}


def _reports(rows: list, histories: dict, sw, staging: Path, t0: float) -> tuple[dict, list[Path]]:
    """Write the CSVs, plots, sample grids and metrics/sweep.json (wall time since t0); returns (that summary,
    files to log)."""
    from pipeline import reports

    sampled = [r for r in rows if r["axis"] == "sampling"]
    settings = reports.summarize(sampled)
    crossed = reports.summarize(rows, axis=CROSS_AXIS)
    reports.write_csv(CSV, rows)
    reports.write_csv(SUMMARY, settings, reports.SUMMARY_COLUMNS)
    reports.write_csv(CROSS_SUMMARY, crossed, reports.CROSS_COLUMNS)
    plots = {name: PLOTS / f"{name}.png" for name in ("fd_vs_nfe", "guidance", "precision_recall", "training",
                                                      "training_x_sampling")}
    reports.plot_training_x_sampling(crossed, plots["training_x_sampling"])
    reports.plot_fd_vs_nfe(settings, plots["fd_vs_nfe"])
    reports.plot_guidance(settings, plots["guidance"])
    reports.plot_precision_recall([*settings, *(r for r in rows if r["axis"] == "training")],
                                  plots["precision_recall"])
    reports.plot_training(histories, plots["training"])
    grids = _grids(sampled, staging, sw.grid_nfe) if sampled else {}
    at_n = [r for r in settings if r["num_samples"] == sw.num_samples and r["fd_domain"] is not None]
    best = {s: _brief(min((r for r in at_n if reports.sampler_of(r) == s), key=lambda r: r["fd_domain"]))
            for s in sorted(set(map(reports.sampler_of, at_n)))}
    trained = [r for r in rows if r["axis"] == "training" and r["fd_domain"] is not None]
    reference = reports.converged_reference(settings)
    summary = {"num_trials": len(rows), "num_settings": len(settings),
               "num_pruned": sum(r["status"] == "pruned" for r in rows),
               "wall_seconds": round(time.perf_counter() - t0, 1), "best": best,
               "selected": _selected(settings, sw), "reference": _brief(reference) if reference else None,
               "best_training": _brief(min(trained, key=lambda r: r["fd_domain"])) if trained else None,
               "training_x_sampling": [{**_brief(r), "training": r["training"]} for r in crossed]}
    atomic_write_json(METRICS, summary)
    return summary, [CSV, SUMMARY, CROSS_SUMMARY, *plots.values(), *grids.values()]


def _log_trials(rows: list, histories: dict, params) -> None:
    """One nested MLflow run per trial, under the sweep's run: its settings, metrics and training curve."""
    from pipeline.tracking import start_run

    for row in rows:
        with start_run(f"{STAGE}/{row['trial']}", {"trial": {k: row[k] for k in row if k not in METRIC_KEYS}},
                       params.tracking, experiment=params.project.experiment, nested=True,
                       tags={"sweep_axis": row["axis"], "status": row["status"], "setting": row["setting"],
                             "seed_set": str(row.get("seed_set", ""))}) as child:
            for point in histories.get(row["trial"], []):
                child.log_metrics({k: point.get(k) for k in ("fd_domain", "loss")}, step=int(point["step"]))
            child.log_metrics({k: row[k] for k in METRIC_KEYS if isinstance(row.get(k), (int, float))})


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv, description="Ray Tune sweep over schedules, samplers, steps and guidance.")


if __name__ == "__main__":
    sys.exit(main())
