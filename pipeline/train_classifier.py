"""Stage `train_classifier`: noisy classifier p(y | x_t, t) for classifier guidance, Ray Train (DDP) ->
`models/classifier/`, `metrics/train_classifier.json` (test accuracy per quarter of the timestep range).

Same space (pixel | latent) and the same forward process (`schedule`, `diffusion` sections) as train_diffusion.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from diffusion_core.checkpoint import CheckpointError, save_model_dir
from diffusion_core.classifiers import NoisyClassifierObjective, build_noisy_classifier, evaluate_noisy_classifier
from diffusion_core.data import DataError, load_split, read_meta
from diffusion_core.io import OutputError
from diffusion_core.pretrained import diffusion_spec
from diffusion_core.storage import join
from diffusion_core.training import (
    LoopHooks,
    NumericalError,
    Trainer,
    build_diffusion_from_options,
    load_rank_data,
    train_loop,
)
from pipeline.config import ConfigError, load_params, validate_params
from pipeline.provenance import data_checksums, finish_model, input_model, model_files, provenance
from pipeline.tracking import TrackingError, start_run

from . import workspace
from ._ray import remove_run, report, run_torch_trainer, worker_context
from ._stage import run_stage, storage_root, worker_params

STAGE = "train_classifier"
SECTIONS = ("project", "tracking", "data", "schedule", "diffusion", STAGE)
OUT, METRICS, AUTOENCODER = Path("models/classifier"), Path("metrics/train_classifier.json"), "models/autoencoder"
EXPECTED = (ConfigError, DataError, CheckpointError, OutputError, TrackingError, NumericalError, ValueError)


def _source(space: str, shard_dir: str | Path | None = None) -> tuple[Path | str, dict, float]:
    """(shard dir, its meta.json, scale): latents are scaled by scale_factor exactly as train_diffusion scales them.
    `shard_dir`: where a worker reads them (a URL on the storage root), else the workspace's folder."""
    shard_dir = shard_dir or Path("data/shards" if space == "pixel" else "data/latents")
    meta = read_meta(shard_dir)
    if len(meta["sample_shape"]) != 3:
        raise DataError(f"{STAGE} needs images or latents [C, H, W]; {meta['dataset']} is {meta['kind']} "
                        f"{meta['sample_shape']}")
    return shard_dir, meta, float(meta["scale_factor"]) if space == "latent" else 1.0


def train_loop_per_worker(config: dict) -> None:
    tracking_root = workspace.enter(config["ws"])
    rank, world = worker_context()
    params = validate_params(config["params"], SECTIONS)
    cfg = params.train_classifier
    shard_dir, meta, scale = _source(cfg.space, config["ws"]["data"])
    data = load_rank_data(shard_dir, rank, world, scale=scale, verify_checksums=params.data.verify_checksums,
                          on_bad_shard=params.data.on_bad_shard)
    diffusion = build_diffusion_from_options(params.schedule.to_options(), params.diffusion.to_options())
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_noisy_classifier(cfg.classifier.to_options(), meta["sample_shape"], int(meta["num_classes"]))
    device = f"cuda:{torch.cuda.current_device()}" if cfg.scaling.use_gpu else "cpu"
    options = cfg.train_options(loss_name="classifier loss", fix_hint="lower train_classifier.lr")
    trainer = Trainer(model, NoisyClassifierObjective(diffusion), params.diffusion.timestep_sampler, options, device)
    with start_run(STAGE, params.to_dict("project", *SECTIONS[2:]), params.tracking, rank=rank,
                   experiment=params.project.experiment, root=tracking_root) as run:
        def log(tr: Trainer, m: dict) -> None:
            run.log_metrics(m, step=tr.step)
            if rank == 0:
                print(f"{STAGE}: step {tr.step}/{cfg.steps} loss {m.get('loss', float('nan')):.4f} train acc "
                      f"{m['train_accuracy']:.3f} lr {m['lr']:.2e} {m['samples_per_second']:.0f} samples/s", flush=True)

        t0 = time.perf_counter()
        last = train_loop(trainer, data, cfg.steps, cfg.batch_size // world, log_every=cfg.log_every,
                          hooks=LoopHooks(log=log))
        seconds = time.perf_counter() - t0
        report({"step": trainer.step, "loss": last.get("loss")})
        if rank == 0:
            _finish(params, run, trainer, diffusion, config, meta, scale, last, seconds, world)
            workspace.send_outputs(config["ws"], (str(OUT), str(METRICS)))


def _finish(params, run, trainer: Trainer, diffusion, config: dict, meta: dict, scale: float, last: dict,
            seconds: float, world: int) -> None:
    """Rank 0 after the last step: test accuracy per timestep quarter, the model folder with its card and
    provenance, metrics, publishing (storage root) and MLflow's model."""
    cfg = params.train_classifier
    x_test, y_test = load_split(config["ws"]["data"], "test", meta=meta, verify_checksums=params.data.verify_checksums)
    acc = evaluate_noisy_classifier(trainer.model.eval(), diffusion, x_test * scale, y_test,
                                    repeats=cfg.eval_repeats, seed=cfg.seed)
    data_block = {"space": cfg.space, "shape": list(meta["sample_shape"]), "num_classes": int(meta["num_classes"]),
                  "class_names": meta["class_names"], "dataset": meta["dataset"],
                  "scale_factor": scale if cfg.space == "latent" else None}
    metrics = {**acc, "final_loss": last.get("loss"), "steps": trainer.step, "test_count": len(y_test),
               "wall_seconds": round(seconds, 2), "num_workers": world}
    prov = provenance(STAGE, OUT, params.to_dict("project", *SECTIONS[2:]), config["data_checksums"], run,
                      metrics, seconds, config["input_models"])
    what = (f"Noisy classifier p(y | x_t, t) (`NoisyClassifier`, "
            f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters) of {meta['dataset']} in "
            f"{cfg.space} space {list(meta['sample_shape'])}, {meta['num_classes']} classes, trained on the "
            f"forward process of schedule `{params.schedule.name}` (T = {params.schedule.num_timesteps}); "
            f"it guides the diffusion model (classifier guidance).")
    spec = diffusion_spec(params.schedule.to_options(), params.diffusion.to_options())
    save_model_dir(OUT, trainer.model, {"diffusion": spec, "data": data_block},
                   extra_files=model_files(prov, f"Noisy classifier: {meta['dataset']}", what))
    run.log_metrics({k: v for k, v in metrics.items() if k not in ("steps", "num_workers")})
    finish_model(run, OUT, METRICS, metrics, params.project)


def _run(args) -> None:
    params = load_params(args.params, sections=(*SECTIONS, "train_diffusion"))
    cfg = params.train_classifier
    if cfg.space != params.train_diffusion.space:
        raise ConfigError(f"train_classifier.space is {cfg.space!r} but train_diffusion.space is "
                          f"{params.train_diffusion.space!r}: the classifier must see what the diffusion model "
                          f"samples; set both to the same space")
    shard_dir, _, _ = _source(cfg.space)  # fail here, before Ray starts, if the shards are missing
    name = f"{STAGE}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    root = storage_root(params.project)
    storage = join(root, "ray_results") if root else Path("ray_results").resolve()
    latent = cfg.space == "latent"
    config = {"params": worker_params(params, SECTIONS), "data_checksums": data_checksums(shard_dir),
              "ws": workspace.open_run(name, params.project, shard_dir, (AUTOENCODER,) if latent else ()),
              "input_models": {AUTOENCODER: input_model(AUTOENCODER)} if latent else None}
    run_torch_trainer(train_loop_per_worker, config, cfg.scaling, name, storage, no_retry=(NumericalError,),
                      reraise=EXPECTED)
    workspace.receive_outputs(config["ws"])
    remove_run(storage, name)
    print(f"{STAGE}: wrote {OUT}/ and {METRICS}: {json.dumps(json.loads(METRICS.read_text()))}")


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv, description="Train the noisy classifier for classifier guidance (Ray Train).")


if __name__ == "__main__":
    sys.exit(main())
