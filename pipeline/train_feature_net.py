"""Stage `train_feature_net`: clean-image classifier on `data/shards` -> `models/feature_net/`,
`metrics/train_feature_net.json`.

Its penultimate activations (`FeatureNet.features`, [B, feature_dim]) are the offline domain FID/KID embedding.
Single process: the data and the network are small enough that Ray would only add start-up time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from diffusion_core.checkpoint import save_model_dir
from diffusion_core.classifiers import classification_accuracy, train_feature_net
from diffusion_core.data import DataError, load_split, read_meta
from diffusion_core.models import FeatureNet
from pipeline.config import load_params
from pipeline.provenance import data_checksums, model_files, provenance
from pipeline.publish import finish_model
from pipeline.tracking import start_run

from ._stage import run_stage, stage_device

STAGE = "train_feature_net"
SECTIONS = ("project", "tracking", "data", STAGE)
SHARDS, OUT, METRICS = Path("data/shards"), Path("models/feature_net"), Path("metrics/train_feature_net.json")


def _run(args) -> None:
    params = load_params(args.params, sections=SECTIONS)
    cfg = params.train_feature_net
    meta = read_meta(SHARDS)
    if meta["kind"] != "image" or len(meta["sample_shape"]) != 3 or meta["sample_shape"][1] != meta["sample_shape"][2]:
        raise DataError(f"{STAGE} needs square images; dataset {meta['dataset']!r} is {meta['kind']} "
                        f"{meta['sample_shape']} (set prepare.dataset to an image dataset)")
    x, y = load_split(SHARDS, "train", meta=meta, verify_checksums=params.data.verify_checksums)
    x_test, y_test = load_split(SHARDS, "test", meta=meta, verify_checksums=params.data.verify_checksums)
    c, h, _ = meta["sample_shape"]
    device = stage_device(params.project)
    with start_run(STAGE, params.to_dict("project", "data", STAGE), params.tracking,
                   experiment=params.project.experiment) as run:
        torch.manual_seed(cfg.seed)
        model = FeatureNet(c, h, int(meta["num_classes"]), width=cfg.width, feature_dim=cfg.feature_dim).to(device)

        def log(step: int, m: dict) -> None:
            run.log_metrics(m, step=step)
            print(f"{STAGE}: step {step}/{cfg.steps} loss {m['loss']:.4f} train acc {m['train_accuracy']:.3f} "
                  f"lr {m['lr']:.2e}", flush=True)

        t0 = time.perf_counter()
        last = train_feature_net(model, x.to(device), y.to(device), steps=cfg.steps, batch_size=cfg.batch_size,
                                 lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                                 max_shift=cfg.max_shift, label_smoothing=cfg.label_smoothing, seed=cfg.seed,
                                 log_every=cfg.log_every, log_fn=log)
        seconds = time.perf_counter() - t0
        metrics = {"test_accuracy": classification_accuracy(model, x_test, y_test), "train_loss": last["loss"],
                   "train_accuracy": last["train_accuracy"], "steps": cfg.steps, "train_count": len(y),
                   "test_count": len(y_test), "wall_seconds": round(seconds, 2)}
        _save(model.cpu(), params, meta, metrics, seconds, run)
        run.log_metrics({k: v for k, v in metrics.items() if k != "steps"})
    print(f"{STAGE}: test accuracy {metrics['test_accuracy']:.4f} on {len(y_test)} {meta['dataset']} test images "
          f"({seconds:.1f} s) -> {OUT}/")


def _save(model, params, meta: dict, metrics: dict, seconds: float, run) -> None:
    """The model folder with its card and provenance, the metrics file, publishing and MLflow's model."""
    cfg = params.train_feature_net
    c, h, _ = meta["sample_shape"]
    data_block = {"space": "pixel", "shape": [c, h, h], "num_classes": int(meta["num_classes"]),
                  "class_names": meta["class_names"], "dataset": meta["dataset"]}
    prov = provenance(STAGE, OUT, params.to_dict("project", "data", STAGE), data_checksums(SHARDS), run, metrics,
                      seconds)
    what = (f"Clean-image classifier (`FeatureNet`, {sum(p.numel() for p in model.parameters()):,} parameters) of "
            f"{meta['dataset']} images {c} x {h} x {h}, {meta['num_classes']} classes; its {cfg.feature_dim}-d "
            f"penultimate features are the domain FID/KID embedding of the evaluate stage.")
    save_model_dir(OUT, model, {"data": data_block, "feature_dim": cfg.feature_dim},
                   extra_files=model_files(prov, f"Feature net: {meta['dataset']}", what))
    finish_model(run, OUT, METRICS, metrics, params.project)


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv, description="Train the clean-image feature network (domain FID features).")


if __name__ == "__main__":
    sys.exit(main())
