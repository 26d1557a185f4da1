"""Stage `prepare`: dataset -> WebDataset shards `data/shards/`, `data/meta.json`, `metrics/prepare.json`."""

from __future__ import annotations

import sys
import time

from diffusion_core.data import prepare_dataset
from diffusion_core.data.preview import save_preview
from diffusion_core.io import atomic_write_json
from pipeline.config import ConfigError, load_params
from pipeline.tracking import start_run

from ._stage import run_stage

STAGE = "prepare"
DATA_DIR, METRICS, PREVIEW = "data", "metrics/prepare.json", "reports/prepare_samples.png"


def _run(args) -> None:
    params = load_params(args.params, sections=("project", "tracking", STAGE))
    cfg = params.prepare
    if cfg.dataset == "swissroll":  # before any work: the next stages would refuse the points one by one
        raise ConfigError("prepare.dataset 'swissroll' is 2-D points, and the pipeline's stages train and evaluate "
                          "image models: choose an image dataset (mnist5k, cmnist5k, digits, mnist, fashion_mnist, "
                          "cifar10, imagefolder), or use the Swiss roll through the library (README 'The Swiss roll')")
    logged = params.to_dict("project", STAGE)
    with start_run(STAGE, logged, params.tracking, experiment=params.project.experiment) as run:
        t0 = time.perf_counter()
        meta, data, splits = prepare_dataset(cfg.to_options(), DATA_DIR)
        seconds = time.perf_counter() - t0
        train = splits["train"]
        save_preview(data.x[train], data.y[train], data.kind, PREVIEW, data.class_names)
        metrics = {
            "train_count": meta["counts"]["train"],
            "test_count": meta["counts"]["test"],
            "num_classes": meta["num_classes"],
            "train_shards": len(meta["shards"]["train"]),
            "test_shards": len(meta["shards"]["test"]),
        }
        atomic_write_json(METRICS, metrics)
        run.log_metrics({**metrics, "seconds": seconds})
        run.log_artifact(PREVIEW)
        run.log_artifact(f"{DATA_DIR}/meta.json")
    print(
        f"prepare: {meta['dataset']} -> {metrics['train_count']} train / {metrics['test_count']} test samples "
        f"in {metrics['train_shards'] + metrics['test_shards']} shards ({seconds:.1f} s)"
    )


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv, description="Write the dataset named in params `prepare` as WebDataset shards.")


if __name__ == "__main__":
    sys.exit(main())
