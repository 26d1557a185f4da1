"""Stage `encode_latents`: `data/shards` through `models/autoencoder` ->
`data/latents/{train,test}-%06d.tar` + `meta.json`.

Each sample holds `npy` = the RAW posterior mean z (float32 C x h x w, NOT scaled) and `cls`. `meta.json` records
`scale_factor` = 1 / std(train z) (LDM; Stable Diffusion's 0.18215): diffusion trains on `z * scale_factor`
(unit variance) and decodes its samples with `autoencoder.decode(z_scaled / scale_factor)`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from diffusion_core.autoencoding import encode_means, latent_scale_factor
from diffusion_core.checkpoint import load_model_dir
from diffusion_core.data import build_meta, load_split, read_meta, write_array_split, write_meta
from diffusion_core.data.shards import META_NAME, replace_dir
from diffusion_core.io import atomic_write_json, staging_dir
from pipeline.config import load_params
from pipeline.tracking import start_run

from ._stage import run_stage, stage_device

STAGE = "encode_latents"
SHARDS, MODEL_DIR, LATENTS, METRICS = "data/shards", "models/autoencoder", Path("data/latents"), f"metrics/{STAGE}.json"
SCALING_NOTE = ("npy holds the raw posterior mean z (unscaled); diffusion trains on z * scale_factor (unit variance) "
                "and decodes samples as autoencoder.decode(z_scaled / scale_factor)")


def _run(args) -> None:
    params = load_params(args.params, sections=("project", "tracking", STAGE))
    cfg = params.encode_latents
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)  # all cores unless told
    meta = read_meta("data/shards")
    device = stage_device(params.project)
    model, model_cfg = load_model_dir(MODEL_DIR)
    model = model.to(device)
    with start_run(STAGE, params.to_dict("project", STAGE), params.tracking,
                   experiment=params.project.experiment) as run:
        t0 = time.perf_counter()
        z, y = {}, {}
        for split in ("train", "test"):
            x, y[split] = load_split(SHARDS, split, meta=meta)
            z[split] = encode_means(model, x.to(device), cfg.batch_size).cpu()
        scale = latent_scale_factor(z["train"])
        _write_latents(z, y, scale, meta, model_cfg, cfg.samples_per_shard)
        zt = z["train"].double()
        metrics = {"scale_factor": scale, "latent_mean": zt.mean().item(), "latent_std": zt.std().item(),
                   "scaled_mean": (zt * scale).mean().item(), "scaled_std": (zt * scale).std().item(),
                   "test_scaled_std": (z["test"].double() * scale).std().item(),
                   "train_count": len(z["train"]), "test_count": len(z["test"]),
                   "latent_shape": list(z["train"].shape[1:]), "seconds": time.perf_counter() - t0}
        atomic_write_json(METRICS, metrics)
        run.log_metrics({k: v for k, v in metrics.items() if k != "latent_shape"})
        run.log_artifact(LATENTS / META_NAME)
    print(f"{STAGE}: {metrics['train_count']} train / {metrics['test_count']} test latents "
          f"{'x'.join(map(str, metrics['latent_shape']))}, scale_factor {scale:.5f} -> {LATENTS}")


def _write_latents(z: dict, y: dict, scale: float, meta: dict, model_cfg: dict, samples_per_shard: int) -> None:
    """data/latents (shards of both splits and meta.json) written in a temp folder, swapped in as a whole."""
    with staging_dir(LATENTS.parent, ".encode_latents-") as tmp:
        shards = {s: write_array_split(tmp / LATENTS.name, s, z[s].numpy(), y[s].numpy(), samples_per_shard,
                                       payload="npy") for s in z}
        latent_meta = build_meta(
            dataset=meta["dataset"], kind="latent", payload="npy", sample_shape=z["train"].shape[1:],
            class_names=meta["class_names"], labels={s: y[s].numpy() for s in y}, shards=shards,
            scale_factor=scale, scaling=SCALING_NOTE, image_shape=[meta["channels"], *meta["image_size"]],
            autoencoder={"dir": MODEL_DIR, "checksums": model_cfg["checksums"]}, source_shards=SHARDS,
        )
        write_meta(tmp / LATENTS.name / META_NAME, latent_meta)
        replace_dir(tmp / LATENTS.name, LATENTS)  # shards and meta.json swap in together


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv,
                     description="Encode the image shards into latent shards with the trained autoencoder.")


if __name__ == "__main__":
    sys.exit(main())
