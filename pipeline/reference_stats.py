"""Stage `reference_stats`: features, mean and covariance of the real split (`reference_stats.split`) under each
feature extractor -> `data/reference/reference-domain.npz` (the domain feature net) and `reference-inception.npz`
(the FID Inception-v3, unless `reference_stats.inception` is false), plus `metrics/reference_stats.json`. Computed
once per dataset and split; `sweep` and `evaluate` reuse them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from diffusion_core.data import load_split, read_meta
from diffusion_core.data.shards import replace_dir
from diffusion_core.evaluation import DOMAIN, INCEPTION, reference_path
from diffusion_core.io import atomic_write_json, staging_dir
from diffusion_core.metrics import MetricsError
from pipeline.config import load_params

from ._stage import run_stage, stage_device

STAGE = "reference_stats"
SECTIONS = ("project", "tracking", "data", STAGE)
SHARDS, FEATURE_NET, OUT, METRICS = (Path("data/shards"), Path("models/feature_net"), Path("data/reference"),
                                     Path("metrics/reference_stats.json"))
TMP_PREFIX = ".reference_stats-"


def _run(args) -> None:

    from diffusion_core.metrics.fidelity import domain_extractor, inception_extractor, reference_stats
    from pipeline.tracking import start_run

    params = load_params(args.params, sections=SECTIONS)
    cfg = params.reference_stats
    cuda = stage_device(params.project).type == "cuda"  # torch-fidelity's flag: features extracted on the GPU
    meta = read_meta(SHARDS)
    real, _ = load_split(SHARDS, cfg.split, meta=meta, verify_checksums=params.data.verify_checksums, as_uint8=True)
    inception = None
    if cfg.inception:  # built before any work: missing weights fail the stage at once, with the fix
        inception = inception_extractor(cfg.inception_weights, download=cfg.inception_download, cuda=cuda)
        if inception is None:
            raise MetricsError("reference_stats.inception is true but no FID Inception weights are installed: run "
                               "`make install` (or `python -m diffusion_core.metrics.inception fetch`), or set "
                               "reference_stats.inception: false to skip fid_inception")
    with start_run(STAGE, params.to_dict("project", "data", STAGE), params.tracking,
                   experiment=params.project.experiment) as run:
        t0 = time.perf_counter()
        # the whole folder is written aside and swapped in: readers see the old set of files or the new one, and
        # an extractor dropped from params leaves no old file behind
        with staging_dir(OUT.parent, TMP_PREFIX) as tmp:
            new = tmp / OUT.name
            domain = domain_extractor(str(FEATURE_NET), cuda=cuda)
            stats = {DOMAIN: reference_stats(real, domain, reference_path(new, DOMAIN), batch_size=cfg.batch_size)}
            if inception is not None:
                n = cfg.inception_images or len(real)
                stats[INCEPTION] = reference_stats(real[:n], inception, reference_path(new, INCEPTION),
                                                   batch_size=cfg.batch_size)
            replace_dir(new, OUT)
        metrics = {"num_real": int(real.shape[0]), "split": cfg.split, "extractors": sorted(stats),
                   "num_real_inception": int(len(stats[INCEPTION].features)) if INCEPTION in stats else 0,
                   **{f"feature_dim_{k}": int(v.mu.shape[0]) for k, v in stats.items()},
                   "inception": inception is not None, "wall_seconds": round(time.perf_counter() - t0, 2)}
        atomic_write_json(METRICS, metrics)
        run.log_metrics({"num_real": metrics["num_real"], "wall_seconds": metrics["wall_seconds"]})
    skipped = "" if inception is not None else " (Inception-v3 off: reference_stats.inception is false)"
    print(f"{STAGE}: {', '.join(sorted(stats))} statistics of {real.shape[0]} {cfg.split} images "
          f"({metrics['num_real_inception']} for Inception) -> {OUT}/{skipped}")


def main(argv=None) -> int:
    return run_stage(STAGE, _run, argv,
                     description="Reference statistics of the real split per feature extractor.")


if __name__ == "__main__":
    sys.exit(main())
