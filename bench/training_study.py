"""Training choices at the default budget, each judged by the same samplers.

    python -m bench.training_study --run RUN_DIR [--variants v_minsnr5 edm ...] [--sets 3] [--points KEY ...]

RUN_DIR is a repo checkout after `dvc repro` (its `models/diffusion/` is the baseline). Each variant is
`train_diffusion` with params.yaml plus the variant's overrides (everything else as the default run: data,
steps, seeds, network), trained in RUN/study/<variant>/ (a git clone of RUN with RUN's data and autoencoder
linked in, tracking off) and linked as RUN/models/diffusion_<variant>/; then `bench.sampler_study` measures the
baseline and every variant at the same points, seed sets and CFG scale into RUN/reports/training_study.json.
A variant already trained is not retrained; sets already measured are kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {  # name -> {dotted params key: value}
    "v_minsnr5": {"diffusion.min_snr_gamma": 5.0},  # Hang et al. 2023, their gamma
    "edm": {"diffusion.parameterization": "edm"},  # Karras et al. 2022: c_skip/c_out/c_in/c_noise, their P_mean/P_std
    "v_shift+2": {"schedule.logsnr_shift": 2.0},  # less noise at every t (Hoogeboom et al. 2023's rule for d < 64)
    "v_shift-2": {"schedule.logsnr_shift": -2.0},  # more noise at every t
}
POINTS = ["dpmpp3m-10-logsnr", "dpmpp2m-10-logsnr", "ddim-50-trailing"]  # the few-step samplers the study judges


def variant_params(base: dict, overrides: dict) -> dict:
    """params.yaml's dict with dotted `overrides` set and tracking off (a study is not a pipeline run)."""
    from .common import with_dotted

    return with_dotted(base, {**overrides, "tracking.enabled": False}, "VARIANTS")


def train_variant(run: Path, name: str) -> Path:
    """Train variant `name` in RUN/study/<name>/ unless its model folder exists; returns RUN/models/diffusion_<name>."""
    import yaml

    link = run / "models" / f"diffusion_{name}"
    work = run / "study" / name
    if not (work / "models" / "diffusion" / "config.json").is_file():
        if not work.exists():
            subprocess.run(["git", "clone", "-q", str(run), str(work)], check=True)
        (work / "models").mkdir(exist_ok=True)
        for rel in ("data", "models/autoencoder"):
            if not (work / rel).exists():
                (work / rel).symlink_to((run / rel).resolve())
        params = variant_params(yaml.safe_load((run / "params.yaml").read_text()), VARIANTS[name])
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        print(f"training {name}: {VARIANTS[name]}", flush=True)
        subprocess.run([sys.executable, "-m", "pipeline.train_diffusion", "--params", "params.yaml"], cwd=work,
                       env=env, check=True)
    if not link.exists():
        link.symlink_to((work / "models" / "diffusion").resolve())
    return link


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="repo checkout after dvc repro")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--sets", type=int, default=3, help="disjoint seed sets of 1,000 samples per point")
    ap.add_argument("--points", nargs="+", default=POINTS, help="sampler-steps-spacing keys (bench.sampler_study)")
    ap.add_argument("--train-only", action="store_true", help="train the variants, measure nothing")
    args = ap.parse_args(argv)
    run = args.run.resolve()
    models = ["diffusion"] + [train_variant(run, v).name for v in args.variants]
    if args.train_only:
        return 0
    return measure(run, models, args.sets, args.points)


def measure(run: Path, models: list[str], sets: int, points: list[str]) -> int:
    """bench.sampler_study with one process per seed set (one torch thread each), merged into one JSON."""
    import json

    from bench.sampler_study import table
    from diffusion_core.io import atomic_write_json

    outs = [run / "reports" / f"training_study.set{k}.json" for k in range(sets)]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.sampler_study", "--run", str(run), "--models", *models,
                               "--only-set", str(k), "--points", *points, "--out", str(out)])
             for k, out in enumerate(outs)]
    if any(p.wait() for p in procs):
        raise SystemExit("error: a bench.sampler_study process failed (its output is above); rerun to resume")
    merged: dict = {}
    for out in outs:
        for name, pts in json.loads(out.read_text()).items():
            for key, rows in pts.items():
                merged.setdefault(name, {}).setdefault(key, []).extend(rows)
    atomic_write_json(run / "reports" / "training_study.json", merged)
    print(table(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
