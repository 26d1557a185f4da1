"""Stage `train_classifier`: noisy classifier p(y | x_t, t) for classifier guidance, Ray Train (DDP) ->
`models/classifier/`, `metrics/train_classifier.json` (test accuracy per quarter of the timestep range).

Same space (pixel | latent) and the same forward process (`schedule`, `diffusion` sections) as train_diffusion.
The driver and the rank-0 finish are the shared skeleton's (pipeline/training_stage.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from diffusion_core.builders import build_diffusion_from_options, build_noisy_classifier
from diffusion_core.checkpoint import save_model_dir
from diffusion_core.classifiers import evaluate_noisy_classifier
from diffusion_core.data import DataError, load_split, read_meta
from diffusion_core.model_folders import diffusion_spec
from diffusion_core.objectives import NoisyClassifierObjective
from diffusion_core.rank_data import load_rank_data
from diffusion_core.training import LoopHooks, Trainer, train_loop
from pipeline.config import ConfigError

from . import training_stage
from ._ray import report
from .training_stage import Inputs, TrainingStage, Worker

AUTOENCODER = "models/autoencoder"


def _source(space: str, shard_dir: str | Path | None = None) -> tuple[Path | str, dict, float]:
    """(shard dir, its meta.json, scale): latents are scaled by scale_factor exactly as train_diffusion scales them.
    `shard_dir`: where a worker reads them (a URL on the storage root), else the workspace's folder."""
    shard_dir = shard_dir or Path("data/shards" if space == "pixel" else "data/latents")
    meta = read_meta(shard_dir)
    if len(meta["sample_shape"]) != 3:
        raise DataError(f"train_classifier needs images or latents [C, H, W]; {meta['dataset']} is {meta['kind']} "
                        f"{meta['sample_shape']}")
    return shard_dir, meta, float(meta["scale_factor"]) if space == "latent" else 1.0


class TrainClassifier(TrainingStage):
    name = "train_classifier"
    sections = ("project", "tracking", "data", "schedule", "diffusion", "train_classifier")
    extra_sections = ("train_diffusion",)
    out, metrics = Path("models/classifier"), Path("metrics/train_classifier.json")
    description = "Train the noisy classifier for classifier guidance (Ray Train)."
    errors = (*TrainingStage.errors, ValueError)

    def inputs(self, params) -> Inputs:
        cfg = params.train_classifier
        if cfg.space != params.train_diffusion.space:
            raise ConfigError(f"train_classifier.space is {cfg.space!r} but train_diffusion.space is "
                              f"{params.train_diffusion.space!r}: the classifier must see what the diffusion model "
                              f"samples; set both to the same space")
        shard_dir, _, _ = _source(cfg.space)
        return Inputs(shard_dir, (AUTOENCODER,) if cfg.space == "latent" else ())

    def train(self, w: Worker) -> None:
        params, cfg = w.params, w.cfg
        shard_dir, meta, scale = _source(cfg.space, w.config.ws["data"])
        data = load_rank_data(shard_dir, w.rank, w.world, scale=scale, verify_checksums=params.data.verify_checksums,
                              on_bad_shard=params.data.on_bad_shard)
        diffusion = build_diffusion_from_options(params.schedule.to_options(), params.diffusion.to_options())
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        model = build_noisy_classifier(cfg.classifier.to_options(), meta["sample_shape"], int(meta["num_classes"]))
        options = cfg.train_options(loss_name="classifier loss", fix_hint="lower train_classifier.lr")
        trainer = Trainer(model, NoisyClassifierObjective(diffusion), params.diffusion.timestep_sampler, options,
                          w.device)
        with w.start_run() as run:
            log = w.log_hook(run, lambda tr, m: f"loss {m.get('loss', float('nan')):.4f} train acc "
                                                f"{m['train_accuracy']:.3f} lr {m['lr']:.2e} "
                                                f"{m['samples_per_second']:.0f} samples/s")
            t0 = time.perf_counter()
            last = train_loop(trainer, data, cfg.steps, cfg.batch_size // w.world, log_every=cfg.log_every,
                              hooks=LoopHooks(log=log))
            seconds = time.perf_counter() - t0
            report({"step": trainer.step, "loss": last.get("loss")})
            if w.rank == 0:
                self._finish(w, run, trainer, diffusion, meta, scale, last, seconds)

    def _finish(self, w: Worker, run, trainer: Trainer, diffusion, meta: dict, scale: float, last: dict,
                seconds: float) -> None:
        """Rank 0 after the last step: test accuracy per timestep quarter, then the skeleton's finish."""
        params, cfg = w.params, w.cfg
        x_test, y_test = load_split(w.config.ws["data"], "test", meta=meta,
                                    verify_checksums=params.data.verify_checksums)
        acc = evaluate_noisy_classifier(trainer.model.eval(), diffusion, x_test * scale, y_test,
                                        repeats=cfg.eval_repeats, seed=cfg.seed)
        data_block = {"space": cfg.space, "shape": list(meta["sample_shape"]),
                      "num_classes": int(meta["num_classes"]), "class_names": meta["class_names"],
                      "dataset": meta["dataset"], "scale_factor": scale if cfg.space == "latent" else None}
        metrics = {**acc, "final_loss": last.get("loss"), "steps": trainer.step, "test_count": len(y_test),
                   "wall_seconds": round(seconds, 2), "num_workers": w.world}
        what = (f"Noisy classifier p(y | x_t, t) (`NoisyClassifier`, "
                f"{sum(p.numel() for p in trainer.model.parameters()):,} parameters) of {meta['dataset']} in "
                f"{cfg.space} space {list(meta['sample_shape'])}, {meta['num_classes']} classes, trained on the "
                f"forward process of schedule `{params.schedule.name}` (T = {params.schedule.num_timesteps}); "
                f"it guides the diffusion model (classifier guidance).")
        spec = diffusion_spec(params.schedule.to_options(), params.diffusion.to_options())
        run.log_metrics({k: v for k, v in metrics.items() if k not in ("steps", "num_workers")})
        w.finish(run, metrics, seconds,
                 lambda files: save_model_dir(self.out, trainer.model, {"diffusion": spec, "data": data_block},
                                              extra_files=files),
                 f"Noisy classifier: {meta['dataset']}", what)


STAGE = TrainClassifier()


def main(argv=None) -> int:
    return training_stage.main(STAGE, argv)


if __name__ == "__main__":  # the importable module's stage, so that Ray pickles it by name
    from pipeline.train_classifier import main as _main

    sys.exit(_main())
