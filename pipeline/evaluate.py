"""Stage `evaluate`: the chosen sampling configuration on more samples -> `reports/metrics.json` (DVC metrics:
fd_domain, kd_domain, precision_domain, recall_domain, class_accuracy, nll_bpd for pixel models,
fid_inception/kid_inception only when Inception-v3 reference statistics exist), `reports/samples.png` and
`reports/evaluate_setting.json` (the setting used and where it came from).

The setting is params `evaluate` (`setting: params`) or the sweep's selected one (`setting: sweep`: metrics/
sweep.json `selected`, chosen under sweep.select's rule on the sweep's seeds); evaluate's seeds must not overlap
the seeds it was chosen on, so the figure is measured on fresh noise.

Sampling is split over `evaluate.num_workers` Ray tasks with `generate(start=...)`: sample i uses seed `seed + i`
whichever task draws it, so the set is the same for any worker count.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from diffusion_core.evaluation import DOMAIN, INCEPTION, load_reference
from diffusion_core.io import atomic_write_json
from pipeline.config import load_params

from ._stage import run_stage, stage_device

STAGE = "evaluate"
SECTIONS = ("project", "tracking", "data", "reference_stats", STAGE)
MODEL, CLASSIFIER, FEATURE_NET, REFERENCE = "models/diffusion", "models/classifier", "models/feature_net", \
    Path("data/reference")
FOLDERS = {"diffusion": MODEL, "student": "models/student"}  # a setting's `model`: the folder it samples
OUT, SAMPLES, USED = Path("reports/metrics.json"), Path("reports/samples.png"), Path("reports/evaluate_setting.json")
SWEEP_METRICS = Path("metrics/sweep.json")
SETTING_KEYS = ("model", "sampler", "steps", "eta", "spacing", "options", "guidance", "scale")


class SettingError(ValueError):
    """evaluate.setting: sweep without a usable selection in metrics/sweep.json."""


def resolve_setting(cfg, sweep_metrics: Path = SWEEP_METRICS) -> dict:
    """The sampling setting evaluate runs: {sampler, steps, eta, spacing, options, guidance, scale, source, ...}."""
    if cfg.setting == "params":
        return {**{k: getattr(cfg, k) for k in SETTING_KEYS}, "options": dict(cfg.options), "source": "params"}
    import json

    if not sweep_metrics.is_file():
        raise SettingError(f"evaluate.setting is 'sweep' but {sweep_metrics} is missing: run the sweep stage first "
                           f"(dvc repro sweep) or set evaluate.setting: params")
    sel = json.loads(sweep_metrics.read_text()).get("selected")
    if not sel:
        raise SettingError(f"evaluate.setting is 'sweep' but {sweep_metrics} selected no setting (none passes "
                           f"sweep.select): loosen sweep.select or set evaluate.setting: params")
    lo, hi = sel["seeds"]
    if cfg.seed < hi and lo < cfg.seed + cfg.num_samples:
        raise SettingError(f"evaluate seeds {cfg.seed}..{cfg.seed + cfg.num_samples - 1} overlap the seeds "
                           f"{lo}..{hi - 1} the sweep chose {sel['setting']} on: move evaluate.seed to >= {hi}")
    setting = {k: sel.get(k) for k in SETTING_KEYS}
    setting.update(model=setting["model"] or "diffusion", options=dict(setting["options"] or {}),
                   eta=setting["eta"] or 0.0,
                   spacing=setting["spacing"] or "trailing",
                   scale=1.0 if setting["scale"] is None else setting["scale"])
    return {**setting, "source": "sweep", "sweep_setting": sel["setting"], "sweep_trials": sel["trials"],
            "sweep_rule": sel["rule"], "sweep_fd_domain": sel["fd_domain"],
            "sweep_fd_domain_std": sel.get("fd_domain_std"), "sweep_num_samples": sel["num_samples"],
            "sweep_seed_sets": sel["seed_sets"]}


def sample_part(root: str, kwargs: dict, num: int, start: int) -> dict:
    """Samples start..start+num-1 of the evaluation set (runs in a Ray task or in-process); kwargs["model"] is the
    setting's model folder, kwargs["setting"] its sampling setting, the rest goes to generate."""
    os.chdir(root)
    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.model_folders import load_classifier_dir, load_diffusion_dir

    kwargs = dict(kwargs)
    bundle = load_diffusion_dir(kwargs.pop("model"))
    spec = SamplingSpec.from_setting(kwargs.pop("setting"))
    clf = load_classifier_dir(CLASSIFIER) if spec.guidance == "classifier" else None
    return generate(bundle, num, spec, classifier_bundle=clf, start=start, **kwargs)


def _sample(cfg, setting: dict, workers: int, device) -> dict:
    """The evaluation set: in this process on a GPU (project.device) or with one worker, else over Ray tasks."""
    kwargs = {"model": FOLDERS[setting["model"]], "device": str(device), "seed": cfg.seed,
              "batch_size": cfg.batch_size, "bf16": cfg.bf16, "channels_last": cfg.channels_last,
              "setting": {k: setting[k] for k in ("sampler", "steps", "eta", "spacing", "options", "guidance",
                                                  "scale")}}
    root = str(Path.cwd().resolve())
    if workers == 1 or device.type != "cpu":
        return sample_part(root, {**kwargs, "progress": True}, cfg.num_samples, 0)
    from ._ray import init_ray

    init_ray()  # before the clock: sampling_seconds is sampling
    t0 = time.perf_counter()
    # tasks of one batch each (smaller when that leaves a worker idle), `workers` in flight: the bar moves as each
    # batch lands
    size = min(cfg.batch_size, -(-cfg.num_samples // workers))
    parts = _sample_on_ray(root, kwargs, cfg.num_samples, size, workers,
                           f"{STAGE}: {setting['sampler']} {setting['steps']} steps")
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("images", "labels", "seeds")}
    for key in ("nfe", "classifier_nfe"):  # per sample, over the parts
        out[key] = sum(p[key] * len(p["seeds"]) for p in parts) / cfg.num_samples
    out["seconds"] = time.perf_counter() - t0
    return out


def _sample_on_ray(root: str, kwargs: dict, num: int, size: int, workers: int, desc: str) -> list[dict]:
    """`sample_part` as Ray tasks of `size` samples, `workers` in flight, a progress bar over all; the parts in
    sample order (Ray is up). A task's own error is raised as itself, Ray's as one RayError line."""
    import ray
    from tqdm.auto import tqdm

    from ._ray import RayError

    task = ray.remote(num_cpus=1)(sample_part)
    todo, pending, parts = iter(range(0, num, size)), {}, {}

    def submit() -> None:
        lo = next(todo, None)
        if lo is not None:
            pending[task.remote(root, kwargs, min(size, num - lo), lo)] = lo

    bar = tqdm(total=num, desc=desc, unit="sample")
    try:
        for _ in range(workers):
            submit()
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            lo = pending.pop(ready)
            parts[lo] = ray.get(ready)
            bar.update(len(parts[lo]["seeds"]))
            submit()
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise RayError(f"{STAGE}: a sampling task failed: {' '.join(str(e).split())[-300:]}") from None
    finally:
        bar.close()
    return [parts[lo] for lo in sorted(parts)]


def _metrics(params, bundle, out: dict, ref, ref_inception, cuda: bool) -> dict:
    """fd/kd/precision/recall/class accuracy of the samples (Inception ones where its reference exists; features on
    the GPU with `cuda`), NLL in bits/dim on the test split for pixel models (evaluate.nll_samples >= 2; CPU)."""
    import torch

    from diffusion_core.data import load_split, read_meta
    from diffusion_core.evaluation import nll_on_test, sample_metrics
    from diffusion_core.metrics.fidelity import domain_extractor, inception_extractor

    cfg = params.evaluate
    inception = None
    if ref_inception is not None:
        inception = inception_extractor(params.reference_stats.inception_weights,
                                        download=params.reference_stats.inception_download, cuda=cuda)
    metrics = sample_metrics(out["images"], out["labels"], ref, domain_extractor(FEATURE_NET, cuda=cuda), inception,
                             ref_inception, inception_samples=cfg.inception_samples)
    if cfg.nll_samples >= 2 and not bundle.is_latent and not bundle.config.get("student"):  # a model's bound
        shards = Path("data/shards")
        x_test, y_test = load_split(shards, "test", meta=read_meta(shards),
                                    verify_checksums=params.data.verify_checksums)
        torch.manual_seed(cfg.seed)
        metrics.update(nll_on_test(bundle, x_test, y_test, cfg.nll_samples, cfg.nll_batch_size, seed=cfg.seed))
    return metrics


def _run(args) -> None:
    from diffusion_core.data.preview import save_image_grid
    from diffusion_core.model_folders import load_diffusion_dir
    from pipeline.provenance import run_links
    from pipeline.tracking import start_run

    params = load_params(args.params, sections=SECTIONS)
    cfg = params.evaluate
    setting, device = resolve_setting(cfg), stage_device(params.project)
    bundle = load_diffusion_dir(FOLDERS[setting["model"]])  # fail before Ray starts if the model is missing
    ref, ref_inception = load_reference(REFERENCE, DOMAIN), load_reference(
        REFERENCE, INCEPTION, required=params.reference_stats.inception)
    with start_run(STAGE, params.to_dict("project", "reference_stats", STAGE), params.tracking,
                   experiment=params.project.experiment) as run:
        t0 = time.perf_counter()
        sweep = {"sweep_setting": setting["sweep_setting"]} if setting["source"] == "sweep" else {}
        run.set_tags({"setting_source": setting["source"], **sweep, **run_links(  # the runs that trained them
            {"training_run_id": FOLDERS[setting["model"]], "classifier_run_id": CLASSIFIER,
             "feature_net_run_id": FEATURE_NET})})
        run.log_params({"used": {k: setting[k] for k in SETTING_KEYS}})
        out = _sample(cfg, setting, min(cfg.num_workers, cfg.num_samples), device)
        metrics = _metrics(params, bundle, out, ref, ref_inception, cuda=device.type == "cuda")
        metrics.update(nfe=out["nfe"], classifier_nfe=out["classifier_nfe"], num_samples=int(len(out["seeds"])),
                       sampling_seconds=round(out["seconds"], 2), wall_seconds=round(time.perf_counter() - t0, 2))
        skipped = sorted(k for k, v in metrics.items() if v is None)
        metrics = {k: v for k, v in metrics.items() if v is not None}  # skipped, not faked
        atomic_write_json(OUT, metrics)
        atomic_write_json(USED, setting)
        k = min(cfg.grid_samples, len(out["images"]))
        save_image_grid(out["images"][:k], SAMPLES, nrow=10, scale=max(1, 56 // out["images"].shape[1]))
        run.log_metrics(metrics)
        if run.active:  # the figures on the model registry's version of the folder sampled
            from pipeline.mlflow_models import tag_registered_version
            from pipeline.provenance import training_run_id

            tag_registered_version(training_run_id(FOLDERS[setting["model"]]), metrics, run.run_id)
        run.log_artifact(SAMPLES, STAGE)
        run.log_artifact(OUT, STAGE)
        run.log_artifact(USED, STAGE)
    print(_summary_line(setting, metrics, skipped))


def _summary_line(setting: dict, metrics: dict, skipped: list[str]) -> str:
    note = f" (skipped: {', '.join(skipped)})" if skipped else ""
    src = f"sweep's {setting['sweep_setting']}" if setting["source"] == "sweep" else "params"
    fid = (f", fid_inception {metrics['fid_inception']:.4g} on {metrics['inception_samples']}"
           if "fid_inception" in metrics else "")
    student = "the distilled student's " if setting["model"] == "student" else ""
    return (f"{STAGE}: {student}{setting['sampler']}-{setting['steps']} ({src}): "
            f"fd_domain {metrics['fd_domain']:.4g} on "
            f"{metrics['num_samples']} samples{fid}, {metrics['nfe']:.0f} NFE -> {OUT}, {SAMPLES}{note}")


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv, description="Evaluate the chosen sampling configuration on more samples.")


if __name__ == "__main__":
    sys.exit(main())
