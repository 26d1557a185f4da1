"""Stage `train_autoencoder`: KL autoencoder on `data/shards` -> `models/autoencoder/`,
`metrics/train_autoencoder.json`, `reports/autoencoder_recon.png` (test originals above their reconstructions)."""

from __future__ import annotations

import math
import os
import sys
import time

import torch
from tqdm import tqdm

from diffusion_core.autoencoding import (
    autoencoder_loss,
    batch_indices,
    evaluate_autoencoder,
    grid_scale,
    reconstruction_pairs,
)
from diffusion_core.builders import build_autoencoder
from diffusion_core.checkpoint import save_model_dir
from diffusion_core.data import load_split, read_meta
from diffusion_core.data.preview import save_image_grid
from diffusion_core.training import NumericalError
from pipeline.config import ConfigError, load_params
from pipeline.provenance import data_checksums, model_files, provenance
from pipeline.publish import finish_model
from pipeline.tracking import start_run

from ._stage import run_stage, stage_device

STAGE = "train_autoencoder"
SHARDS, MODEL_DIR = "data/shards", "models/autoencoder"
METRICS, RECON = f"metrics/{STAGE}.json", "reports/autoencoder_recon.png"
GRID_N = 10  # test images shown in the reconstruction grid


def _image_size(meta: dict, cfg) -> int:
    if meta.get("kind") != "image":
        raise ConfigError(f"{STAGE} needs image data, but {SHARDS} holds {meta.get('kind')!r} ({meta.get('dataset')})")
    (h, w), c = meta["image_size"], meta["channels"]
    if h != w or c != cfg.autoencoder.in_channels:
        raise ConfigError(f"{STAGE}.autoencoder.in_channels={cfg.autoencoder.in_channels} and square images are "
                          f"required; the data are {c} x {h} x {w} ({meta['dataset']})")
    return int(h)


def _run(args) -> None:
    params = load_params(args.params, sections=("project", "tracking", STAGE))
    cfg = params.train_autoencoder
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)  # all cores unless told
    meta = read_meta("data/shards")
    image_size = _image_size(meta, cfg)
    device = stage_device(params.project)
    x_train, _ = load_split(SHARDS, "train", meta=meta)
    x_test, _ = load_split(SHARDS, "test", meta=meta)
    x_train, x_test = x_train.to(device), x_test.to(device)
    torch.manual_seed(cfg.seed)
    model = build_autoencoder(cfg.autoencoder.to_options(), image_size).to(device).train()
    with start_run(STAGE, params.to_dict("project", STAGE), params.tracking,
                   experiment=params.project.experiment) as run:
        t0 = time.perf_counter()
        _train(model, x_train, x_test, cfg, run, image_size)
        seconds = time.perf_counter() - t0
        test = evaluate_autoencoder(model, x_test)
        metrics = _save(model.cpu(), params, meta, image_size, x_test.cpu(), test, seconds, run)
        run.log_metrics({k: v for k, v in metrics.items() if k != "latent_shape"}, step=cfg.steps)
        run.log_artifact(RECON)
    c, h, w = metrics["latent_shape"]
    print(f"{STAGE}: test PSNR {test['psnr']:.2f} dB, MSE {test['mse']:.5f}, KL {test['kl']:.1f}, latents "
          f"{c}x{h}x{w} ({metrics['compression_factor']:.1f}x fewer values) in {seconds:.0f} s -> {MODEL_DIR}")


def _train(model, x_train: torch.Tensor, x_test: torch.Tensor, cfg, run, image_size: int) -> None:
    """Adam steps on random batches; every log_every steps the test losses and a reconstruction grid."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = batch_indices(len(x_train), cfg.batch_size, gen)
    # the posterior's noise is drawn on the data's device: on a GPU from a generator of its own
    noise = gen if x_train.device.type == "cpu" else torch.Generator(x_train.device).manual_seed(cfg.seed + 1)
    bar = tqdm(range(1, cfg.steps + 1), desc=STAGE, unit="step", mininterval=2.0, file=sys.stderr)
    for step in bar:
        loss, stats = autoencoder_loss(model, x_train[next(batches).to(x_train.device)], cfg.kl_weight,
                                       cfg.recon_loss, noise)
        if not math.isfinite(stats["loss"]):
            raise NumericalError(f"autoencoder loss is {stats['loss']} at step {step}: training stopped, "
                                 f"{MODEL_DIR} is left as it was; lower train_autoencoder.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{stats['loss']:.4f}", refresh=False)
        if step % cfg.log_every == 0 or step == cfg.steps:
            test = evaluate_autoencoder(model, x_test)
            run.log_metrics({**{f"train_{k}": v for k, v in stats.items()},
                             **{f"test_{k}": v for k, v in test.items()}}, step=step)
            pairs = reconstruction_pairs(model, x_test, GRID_N)
            grid = save_image_grid(pairs, RECON, nrow=GRID_N, scale=grid_scale(image_size))
            run.log_image(grid, f"recon/step_{step:06d}.png")
    bar.close()


def _save(model, params, meta: dict, image_size: int, x_test: torch.Tensor, test: dict, seconds: float,
          run) -> dict:
    """The model folder (with its card and provenance), metrics/train_autoencoder.json, publishing and MLflow's
    model; returns the metrics."""
    cfg = params.train_autoencoder
    c, h, w = model.latent_shape
    data_info = {"dataset": meta["dataset"], "image_shape": [meta["channels"], image_size, image_size],
                 "counts": meta["counts"], "train_shard_sha256": [r["sha256"] for r in meta["shards"]["train"]]}
    metrics = {"test_mse": test["mse"], "test_psnr": test["psnr"], "kl": test["kl"], "latent_shape": [c, h, w],
               "compression_factor": x_test[0].numel() / (c * h * w), "downsample": model.factor,
               "train_seconds": seconds, "steps": cfg.steps}
    prov = provenance(STAGE, MODEL_DIR, params.to_dict("project", STAGE), data_checksums(SHARDS), run, metrics,
                      seconds)
    what = (f"KL autoencoder (`AutoencoderKL`, {sum(p.numel() for p in model.parameters()):,} parameters) of "
            f"{meta['dataset']} images {meta['channels']} x {image_size} x {image_size} into latents {c} x {h} x "
            f"{w} ({metrics['compression_factor']:.1f}x fewer values); the latent diffusion model samples in its "
            f"latent space and decodes through it.")
    save_model_dir(MODEL_DIR, model, {"data": data_info, "train": cfg.model_dump(mode="json")},
                   extra_files=model_files(prov, f"Autoencoder: {meta['dataset']}", what))
    finish_model(run, MODEL_DIR, METRICS, metrics, params.project)
    return metrics


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv, description="Train the KL autoencoder of params `train_autoencoder`.")


if __name__ == "__main__":
    sys.exit(main())
