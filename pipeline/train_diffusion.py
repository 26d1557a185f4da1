"""Stage `train_diffusion`: DDPM training with Ray Train (DDP) -> `models/diffusion/`, `metrics/train_diffusion.json`.

Resumes from the last good `checkpoints/train_diffusion/step-%08d/`; a lost worker restarts from it (FailureConfig).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from diffusion_core.checkpoint import CheckpointError, find_last_good_checkpoint, read_config
from diffusion_core.data import DataError, read_meta
from diffusion_core.io import OutputError, atomic_write_json
from diffusion_core.models import unwrap_model
from diffusion_core.pretrained import diffusion_spec, load_autoencoder_decoder, save_diffusion_dir
from diffusion_core.storage import join
from diffusion_core.training import (
    DiffusionObjective,
    LoopHooks,
    NumericalError,
    Trainer,
    build_denoiser,
    build_diffusion_from_options,
    data_std,
    load_rank_data,
    prune_checkpoints,
    sample_preview,
    train_loop,
    weights_sha256,
)
from pipeline.config import ConfigError, load_params, params_hash, validate_params
from pipeline.provenance import data_checksums, finish_model, input_model, model_files, provenance, registered_name
from pipeline.tracking import TrackingError, start_run

from . import workspace
from ._ray import latest_ray_checkpoint, remove_run, report, run_torch_trainer, worker_context
from ._stage import run_stage, storage_root, worker_params

STAGE = "train_diffusion"
SECTIONS = ("project", "tracking", "data", "schedule", "diffusion", STAGE)
CKPT_ROOT, OUT, METRICS = Path("checkpoints") / STAGE, Path("models/diffusion"), Path("metrics/train_diffusion.json")
CURVE, WORKERS, AUTOENCODER = Path("reports/train_diffusion_loss.json"), Path("reports/train_diffusion_workers.json"), \
    "models/autoencoder"
OUTPUTS = tuple(str(p) for p in (OUT, METRICS, CURVE, WORKERS))  # what rank 0 writes (pipeline/workspace.py)
EXPECTED = (ConfigError, DataError, CheckpointError, OutputError, TrackingError, NumericalError)


def _source(cfg) -> tuple[Path, dict, dict | None]:
    """The driver's (shard dir, its meta.json, latent block of config.json or None) for train_diffusion.space."""
    shard_dir = Path("data/shards" if cfg.space == "pixel" else "data/latents")
    meta = read_meta(shard_dir)
    if cfg.space == "latent" and not (Path(AUTOENCODER) / "config.json").is_file():
        raise CheckpointError(f"latent space needs {AUTOENCODER}/ to decode samples: run train_autoencoder and "
                              f"encode_latents, or set train_diffusion.space: pixel")
    return shard_dir, meta, _latent(cfg, meta)


def _latent(cfg, meta: dict) -> dict | None:
    return {"autoencoder": AUTOENCODER, "scale_factor": float(meta["scale_factor"])} if cfg.space == "latent" else None


def _run_key(params) -> str:
    """Hash of what makes checkpoints interchangeable (not steps/cadences/scaling: those may change on resume)."""
    cfg = params.train_diffusion.model_dump(mode="json")
    for k in ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "scaling"):
        cfg.pop(k)
    return params_hash({"cfg": cfg, **params.to_dict("schedule", "diffusion")})


def train_loop_per_worker(config: dict) -> None:
    tracking_root = workspace.enter(config["ws"])
    rank, world = worker_context()
    params = validate_params(config["params"], SECTIONS)
    cfg = params.train_diffusion
    shard_dir = config["ws"]["data"]  # a path, or a URL on the storage root
    meta = read_meta(shard_dir)
    latent = _latent(cfg, meta)
    data = load_rank_data(shard_dir, rank, world, scale=latent["scale_factor"] if latent else 1.0,
                          verify_checksums=params.data.verify_checksums, on_bad_shard=params.data.on_bad_shard)
    num_classes = int(meta["num_classes"]) if cfg.conditional else None
    sigma_data = data_std(data.x) if params.diffusion.parameterization == "edm" else None
    diffusion = build_diffusion_from_options(params.schedule.to_options(), params.diffusion.to_options(), sigma_data)
    shape = tuple(meta["sample_shape"])
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = build_denoiser(cfg.unet.to_options(), shape, num_classes, diffusion.learn_sigma)
    device = f"cuda:{torch.cuda.current_device()}" if cfg.scaling.use_gpu else "cpu"
    objective = DiffusionObjective(diffusion, num_classes, cfg.label_dropout)
    trainer = Trainer(model, objective, params.diffusion.timestep_sampler, cfg.train_options(), device)
    spec = diffusion_spec(params.schedule.to_options(), params.diffusion.to_options(), diffusion.formulation_options)
    data_block = {"space": cfg.space, "shape": list(shape), "num_classes": num_classes, "dataset": meta["dataset"],
                  "class_names": meta.get("class_names"), "kind": "points" if meta["kind"] == "points" else "image",
                  "label_dropout": cfg.label_dropout if num_classes is not None else 0.0}
    extra = {"diffusion": spec, "data": data_block, "latent": latent, "run_key": config["run_key"]}
    continues = _resume(trainer, config, rank)
    with start_run(STAGE, params.to_dict(*SECTIONS[:1], *SECTIONS[2:]), params.tracking, rank=rank,
                   experiment=params.project.experiment, root=tracking_root, continues=continues) as run:
        hooks = _hooks(run, trainer, cfg, extra, latent, device)
        train_loop(trainer, data, cfg.steps, cfg.batch_size // world, log_every=cfg.log_every,
                   checkpoint_every=cfg.checkpoint_every, sample_every=cfg.sample_every, hooks=hooks)
        workers = _workers_report(trainer, data, rank, world)
        if rank == 0:
            hooks.sample(trainer)
            _finish(params, run, trainer, spec, data_block, latent, config, workers)
            workspace.send_outputs(config["ws"], OUTPUTS)


def _resume(trainer: Trainer, config: dict, rank: int) -> str | None:
    """Load the newest checkpoint of this run_key: Ray's (set after FailureConfig restarted the workers: the one
    to use off-node), one on the store, or the local one; returns the MLflow run id of the run that wrote it (None:
    from scratch)."""
    ray_ckpt = latest_ray_checkpoint()
    stored = _fetch_stored(config)
    with ray_ckpt.as_directory() if ray_ckpt is not None else contextlib.nullcontext(None) as from_ray:
        candidates = [Path(c) for c in (from_ray, find_last_good_checkpoint(CKPT_ROOT)) if c is not None]
        candidates = [c for c in candidates if read_config(c).get("run_key") == config["run_key"]]
        if not candidates:
            return None
        newest = max(candidates, key=lambda c: read_config(c)["training_step"])
        trainer.load_checkpoint(newest)
        own = stored is not None and newest == stored[1] and f"/{config['ray_run']}/" in stored[0]
        if rank == 0 and (own or (from_ray is not None and newest == Path(from_ray))):
            print(f"{STAGE}: workers restarted by Ray; resuming from its checkpoint at step {trainer.step} "
                  f"({config['ray_storage']})", flush=True)
        elif rank == 0 and stored is not None and newest == stored[1]:
            print(f"{STAGE}: resuming from {stored[0]} (step {trainer.step} of "
                  f"{config['params'][STAGE]['steps']})", flush=True)
        return read_config(newest).get("mlflow_run_id")


def _fetch_stored(config: dict) -> tuple[str, Path] | None:
    """With a storage root: the newest verifying checkpoint of this run_key on the store, fetched into CKPT_ROOT
    (pipeline/workspace.py). An earlier job's, or this run's own: Ray registers a checkpoint only when its
    controller next polls the workers, so a group it restarts may get none from Ray although the lost group had
    uploaded some (the newest three are tried)."""
    if not config["store_resume"]:
        return None
    found = workspace.checkpoints_on_store(config["ray_storage"], STAGE, config["run_key"])
    return workspace.fetch_checkpoint([url for url, _, _ in found[:3]], CKPT_ROOT) if found else None


def _hooks(run, trainer: Trainer, cfg, extra: dict, latent: dict | None, device: str) -> LoopHooks:
    """The loop's hooks: log (MLflow; rank 0 prints), preview grids (rank 0, tracking on), checkpoints (rank 0
    writes, every rank reports to Ray)."""
    rank, diffusion = trainer.rank, trainer.objective.diffusion
    shape, num_classes = tuple(extra["data"]["shape"]), extra["data"]["num_classes"]
    decoder = None

    def log(tr: Trainer, m: dict) -> None:
        run.log_metrics(m, step=tr.step)
        if rank == 0:
            print(f"{STAGE}: step {tr.step}/{cfg.steps} loss {m.get('loss', float('nan')):.4f} "
                  f"lr {m['lr']:.2e} {m['samples_per_second']:.0f} samples/s", flush=True)

    def sample(tr: Trainer) -> None:
        nonlocal decoder
        if rank != 0 or not run.active or len(shape) != 3:
            return
        if latent and decoder is None:
            decoder = load_autoencoder_decoder(AUTOENCODER, latent["scale_factor"], device)
        grid = sample_preview(tr.ema.module, diffusion, shape, num_classes, decoder, seed=cfg.seed,
                              clip_denoised=latent is None)
        from diffusion_core.data.preview import image_grid

        run.log_image(image_grid(grid, nrow=10, scale=max(1, 56 // grid.shape[1])), f"samples/step-{tr.step:08d}.png")

    def checkpoint(tr: Trainer) -> None:
        path = None
        if rank == 0:
            path = tr.save_checkpoint(CKPT_ROOT, {**extra, "training_step": tr.step, "mlflow_run_id": run.run_id})
            prune_checkpoints(CKPT_ROOT, cfg.keep_checkpoints)
        report({"step": tr.step, "loss": tr.history[-1]["loss"] if tr.history else None}, path)

    return LoopHooks(log=log, sample=sample, checkpoint=checkpoint)


def _workers_report(trainer: Trainer, data, rank: int, world: int) -> list[dict]:
    """Every rank's sample count, sample keys and weights hash (gathered on every rank: a collective)."""
    workers = [{"rank": rank, "num_samples": len(data.keys), "keys": data.keys,
                "weights_sha256": weights_sha256(trainer.model)}]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, workers[0])
        workers = gathered
    return workers


def _finish(params, run, trainer: Trainer, spec: dict, data_block: dict, latent: dict | None, config: dict,
            workers: list[dict]) -> None:
    """Rank 0 after the last step: the model folder, loss curve, workers report and metrics, then publishing
    (storage root) and MLflow's model."""
    final_loss = trainer.history[-1]["loss"] if trainer.history else None
    metrics = {"final_loss": final_loss, "steps": trainer.step, "samples_seen": trainer.samples_seen,
               "wall_seconds": round(trainer.train_seconds, 2),
               "samples_per_second": round(trainer.samples_seen / max(trainer.train_seconds, 1e-9), 1)}
    save_diffusion_dir(OUT, trainer.model, trainer.ema, spec, data_block, latent,
                       extra_files=_model_files(params, run, metrics, trainer, config))
    atomic_write_json(CURVE, trainer.history)
    atomic_write_json(WORKERS, workers)
    run.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    finish_model(run, OUT, METRICS, metrics, params.project, diffusion=True,
                 autoencoder=AUTOENCODER if latent else None, register_as=registered_name(params.project.experiment))
    print(f"{STAGE}: {trainer.step} steps, final loss {final_loss}, {metrics['samples_per_second']} "
          f"samples/s -> {OUT}/", flush=True)


def _model_files(params, run, metrics: dict, trainer: Trainer, config: dict) -> dict:
    """README.md and provenance.json of models/diffusion (pipeline/provenance.py); the data's and input models'
    checksums come from the driver, which holds the workspace."""
    cfg, model = params.train_diffusion, trainer.model
    prov = provenance(STAGE, OUT, params.to_dict(*SECTIONS[:1], *SECTIONS[2:]), config["data_checksums"], run, metrics,
                      trainer.train_seconds, config["input_models"], registered_name(params.project.experiment))
    data = read_meta(config["ws"]["data"])
    latent = cfg.space == "latent"
    cond = "class-conditional (label dropout: classifier-free guidance)" if cfg.conditional else "unconditional"
    what = (f"Denoising diffusion model (`{unwrap_model(model).config['kind']}`, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, EMA weights in ema.safetensors) of "
            f"{data['dataset']} in {cfg.space} space {list(data['sample_shape'])}, {cond}; schedule "
            f"`{params.schedule.name}` with T = {params.schedule.num_timesteps}, parameterization "
            f"`{params.diffusion.parameterization}`, variance `{params.diffusion.variance}`"
            + (f"; samples decode through `{AUTOENCODER}`." if latent else "."))
    return model_files(prov, f"Diffusion model: {data['dataset']} ({cfg.space})", what)


def _set_aside_stale(run_key: str) -> Path | None:
    """Last good checkpoint of these params; checkpoints of other params are moved to <root>.previous/."""
    last = find_last_good_checkpoint(CKPT_ROOT)
    if last is not None and read_config(last).get("run_key") != run_key:
        aside = CKPT_ROOT.with_name(CKPT_ROOT.name + ".previous")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(CKPT_ROOT, aside)
        print(f"{STAGE}: checkpoints in {CKPT_ROOT}/ were written with other params; moved to {aside}/, "
              f"starting from step 0")
        return None
    return last


def _run(args) -> None:
    params = load_params(args.params, sections=SECTIONS)
    cfg = params.train_diffusion
    shard_dir, _, latent = _source(cfg)  # fail here, before Ray starts, if the data or autoencoder is missing
    run_key = _run_key(params)
    last = _set_aside_stale(run_key)
    root = storage_root(params.project)
    # Ray's copies of the checkpoints (what a restarted worker group resumes from, on any node): on the storage
    # root when there is one (where an earlier job's are found too), else beside the workspace
    storage = join(root, "ray_results") if root else Path("ray_results").resolve()
    earlier = workspace.checkpoints_on_store(storage, STAGE, run_key) if root and last is None else []
    if last is not None:
        print(f"{STAGE}: resuming from {last} (step {int(last.name.split('-')[1])} of {cfg.steps})", flush=True)
    elif earlier:
        print(f"{STAGE}: checkpoints of these params from an earlier run are on the store (newest: step "
              f"{earlier[0][1]}); the workers resume from the newest that verifies", flush=True)
    # a fresh Ray run name each time: resuming is ours (from checkpoints/), not Ray's restore-by-name
    name = f"{STAGE}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    inputs = (AUTOENCODER,) if latent else ()
    config = {"params": worker_params(params, SECTIONS), "run_key": run_key, "ray_storage": str(storage),
              "ws": workspace.open_run(name, params.project, shard_dir, inputs),
              "data_checksums": data_checksums(shard_dir, ("train",)),
              "input_models": {rel: input_model(rel) for rel in inputs} or None,
              "store_resume": bool(root), "ray_run": name}
    run_torch_trainer(train_loop_per_worker, config, cfg.scaling, name, storage, keep_checkpoints=cfg.keep_checkpoints,
                      no_retry=(NumericalError,), reraise=EXPECTED)
    workspace.receive_outputs(config["ws"])
    remove_run(storage, name)  # kept only after a failure
    for run in {run for _, _, run in earlier}:  # the failed runs this one went on from: superseded
        remove_run(storage, run)
    print(f"{STAGE}: wrote {OUT}/ and {METRICS}: {METRICS.read_text().strip()}")


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv, description="Train the diffusion model (Ray Train DDP) named in params.")


if __name__ == "__main__":
    sys.exit(main())
