"""Stage `train_diffusion`: DDPM training with Ray Train (DDP) -> `models/diffusion/`, `metrics/train_diffusion.json`.

Resumes from the last good `checkpoints/train_diffusion/step-%08d/`; a lost worker restarts from it (FailureConfig).
The driver, the workers' resume and checkpoints and the rank-0 finish are the shared skeleton's
(pipeline/training_stage.py); this module builds the denoiser and its objective and says what it reports.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffusion_core.builders import build_denoiser, build_diffusion_from_options, data_std
from diffusion_core.checkpoint import CheckpointError
from diffusion_core.data import read_meta
from diffusion_core.io import atomic_write_json
from diffusion_core.model_folders import diffusion_spec, load_autoencoder_decoder, save_diffusion_dir
from diffusion_core.models import unwrap_model
from diffusion_core.objectives import DiffusionObjective
from diffusion_core.rank_data import load_rank_data
from diffusion_core.training import LoopHooks, Trainer, sample_preview, train_loop, weights_sha256
from pipeline.config import ConfigError, params_hash
from pipeline.provenance import registered_name

from . import training_stage
from .training_stage import Inputs, TrainingStage, Worker

AUTOENCODER = "models/autoencoder"


def _latent(cfg, meta: dict) -> dict | None:
    return {"autoencoder": AUTOENCODER, "scale_factor": float(meta["scale_factor"])} if cfg.space == "latent" else None


class TrainDiffusion(TrainingStage):
    name = "train_diffusion"
    sections = ("project", "tracking", "data", "schedule", "diffusion", "train_diffusion")
    out, metrics = Path("models/diffusion"), Path("metrics/train_diffusion.json")
    curve, workers = Path("reports/train_diffusion_loss.json"), Path("reports/train_diffusion_workers.json")
    reports = (curve, workers)
    description = "Train the diffusion model (Ray Train DDP) named in params."

    def inputs(self, params) -> Inputs:
        cfg = params.train_diffusion
        shard_dir = Path("data/shards" if cfg.space == "pixel" else "data/latents")
        meta = read_meta(shard_dir)
        shape = tuple(meta["sample_shape"])
        if cfg.backbone == "dit" and (len(shape) != 3 or shape[-1] % cfg.dit.patch_size):
            raise ConfigError(f"train_diffusion.backbone dit cuts {cfg.space} samples of shape {list(shape)} into "
                              f"patches of train_diffusion.dit.patch_size {cfg.dit.patch_size}: use a patch size "
                              f"that divides the side, or backbone unet")
        if cfg.space == "latent" and not (Path(AUTOENCODER) / "config.json").is_file():
            raise CheckpointError(f"latent space needs {AUTOENCODER}/ to decode samples: run train_autoencoder and "
                                  f"encode_latents, or set train_diffusion.space: pixel")
        return Inputs(shard_dir, (AUTOENCODER,) if cfg.space == "latent" else (), splits=("train",))

    def run_key(self, params) -> str:
        """Hash of what makes checkpoints interchangeable (not steps/cadences/scaling: those may change on resume)."""
        cfg = params.train_diffusion.model_dump(mode="json")
        for k in ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "scaling"):
            cfg.pop(k)
        return params_hash({"cfg": cfg, **params.to_dict("schedule", "diffusion")})

    def train(self, w: Worker) -> None:
        params, cfg = w.params, w.cfg
        shard_dir = w.config.ws["data"]  # a path, or a URL on the storage root
        meta = read_meta(shard_dir)
        latent = _latent(cfg, meta)
        data = load_rank_data(shard_dir, w.rank, w.world, scale=latent["scale_factor"] if latent else 1.0,
                              verify_checksums=params.data.verify_checksums, on_bad_shard=params.data.on_bad_shard)
        num_classes = int(meta["num_classes"]) if cfg.conditional else None
        sigma_data = data_std(data.x) if params.diffusion.parameterization == "edm" else None
        diffusion = build_diffusion_from_options(params.schedule.to_options(), params.diffusion.to_options(),
                                                 sigma_data)
        shape = tuple(meta["sample_shape"])
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model = build_denoiser(cfg.net_options(), shape, num_classes, diffusion.learn_sigma)
        objective = DiffusionObjective(diffusion, num_classes, cfg.label_dropout)
        trainer = Trainer(model, objective, params.diffusion.timestep_sampler, cfg.train_options(), w.device)
        spec = diffusion_spec(params.schedule.to_options(), params.diffusion.to_options(),
                              diffusion.formulation_options)
        data_block = {"space": cfg.space, "shape": list(shape), "num_classes": num_classes,
                      "dataset": meta["dataset"], "class_names": meta.get("class_names"),
                      "kind": "points" if meta["kind"] == "points" else "image",
                      "label_dropout": cfg.label_dropout if num_classes is not None else 0.0}
        continues = w.resume(trainer)
        with w.start_run(continues) as run:
            hooks = LoopHooks(
                log=w.log_hook(run, lambda tr, m: f"loss {m.get('loss', float('nan')):.4f} lr {m['lr']:.2e} "
                                                  f"{m['samples_per_second']:.0f} samples/s"),
                sample=self._preview(w, run, diffusion, shape, num_classes, latent),
                checkpoint=w.checkpoint_hook(run, {"diffusion": spec, "data": data_block, "latent": latent},
                                             cfg.keep_checkpoints))
            train_loop(trainer, data, cfg.steps, cfg.batch_size // w.world, log_every=cfg.log_every,
                       checkpoint_every=cfg.checkpoint_every, sample_every=cfg.sample_every, hooks=hooks)
            workers = _workers_report(trainer, data, w.rank, w.world)
            if w.rank == 0:
                hooks.sample(trainer)
                self._finish(w, run, trainer, spec, data_block, latent, meta, workers)

    def _preview(self, w: Worker, run, diffusion, shape: tuple, num_classes: int | None, latent: dict | None):
        """The loop's sample hook: a grid of EMA samples to MLflow (rank 0, tracking on, images only)."""
        decoder = None

        def sample(tr: Trainer) -> None:
            nonlocal decoder
            if w.rank != 0 or not run.active or len(shape) != 3:
                return
            if latent and decoder is None:
                decoder = load_autoencoder_decoder(AUTOENCODER, latent["scale_factor"], w.device)
            grid = sample_preview(tr.ema.module, diffusion, shape, num_classes, decoder, seed=w.cfg.seed,
                                  clip_denoised=latent is None)
            from diffusion_core.data.preview import image_grid

            run.log_image(image_grid(grid, nrow=10, scale=max(1, 56 // grid.shape[1])),
                          f"samples/step-{tr.step:08d}.png")

        return sample

    def _finish(self, w: Worker, run, trainer: Trainer, spec: dict, data_block: dict, latent: dict | None,
                meta: dict, workers: list[dict]) -> None:
        """Rank 0 after the last step: loss curve, workers report, then the skeleton's finish (model folder,
        metrics, publishing, MLflow's registered model)."""
        cfg, params, model = w.cfg, w.params, trainer.model
        final_loss = trainer.history[-1]["loss"] if trainer.history else None
        metrics = {"final_loss": final_loss, "steps": trainer.step, "samples_seen": trainer.samples_seen,
                   "wall_seconds": round(trainer.train_seconds, 2),
                   "samples_per_second": round(trainer.samples_seen / max(trainer.train_seconds, 1e-9), 1)}
        atomic_write_json(self.curve, trainer.history)
        atomic_write_json(self.workers, workers)
        run.log_metrics({f"final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        cond = "class-conditional (label dropout: classifier-free guidance)" if cfg.conditional else "unconditional"
        what = (f"Denoising diffusion model (`{unwrap_model(model).config['kind']}`, "
                f"{sum(p.numel() for p in model.parameters()):,} parameters, EMA weights in ema.safetensors) of "
                f"{meta['dataset']} in {cfg.space} space {list(meta['sample_shape'])}, {cond}; schedule "
                f"`{params.schedule.name}` with T = {params.schedule.num_timesteps}, parameterization "
                f"`{params.diffusion.parameterization}`, variance `{params.diffusion.variance}`"
                + (f"; samples decode through `{AUTOENCODER}`." if latent else "."))
        w.finish(run, metrics, trainer.train_seconds,
                 lambda files: save_diffusion_dir(self.out, model, trainer.ema, spec, data_block, latent,
                                                  extra_files=files),
                 f"Diffusion model: {meta['dataset']} ({cfg.space})", what,
                 register_as=registered_name(params.project.experiment), diffusion=True,
                 autoencoder=AUTOENCODER if latent else None)
        print(f"{self.name}: {trainer.step} steps, final loss {final_loss}, {metrics['samples_per_second']} "
              f"samples/s -> {self.out}/", flush=True)


def _workers_report(trainer: Trainer, data, rank: int, world: int) -> list[dict]:
    """Every rank's sample count, sample keys and weights hash (gathered on every rank: a collective)."""
    workers = [{"rank": rank, "num_samples": len(data.keys), "keys": data.keys,
                "weights_sha256": weights_sha256(trainer.model)}]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, workers[0])
        workers = gathered
    return workers


STAGE = TrainDiffusion()


def main(argv=None) -> int:
    return training_stage.main(STAGE, argv)


if __name__ == "__main__":  # the importable module's stage, so that Ray pickles it by name
    from pipeline.train_diffusion import main as _main

    sys.exit(_main())
