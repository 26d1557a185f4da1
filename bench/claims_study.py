"""Improved DDPM's claims on our data: learned variances and the bound, L_vlb with importance sampling, cosine
against linear, and few-step ancestral sampling per variance choice (Nichol & Dhariwal 2021; the lecture notes).

    python -m bench.claims_study [--dir DIR] [--seeds 0 1 2] [--num 359] [--jobs 2]

DIR (default /tmp/claims-study) gets configs/claims.yaml as its params.yaml (pixel-space 8x8 digits, T = 1000,
unconditional) and the pipeline's own prepare, train_feature_net and reference_stats. Then every model of MODELS
is trained once per training seed by the pipeline's train_diffusion (in-process, one thread,
DIR/train/<model>-s<seed>/), all at the same budget (the config's steps, batch and network). Each trained
model is measured per row of ROWS (a model and the variance it is scored and sampled with: one L_simple model
gives both fixed variances):
  - test-set bits/dim: the full bound (T terms + prior) on every test image, its standard error over images, and
    the per-t profile of the vb terms (the plot);
  - DDPM ancestral sampling at 50, 100 and T steps, `--num` samples from one seed set per training seed (the
    same seeds for every row: paired): fd_domain, kd_domain and fid_inception (all samples, against the
    test split's statistics, which have as many images).
Results per model and seed land in DIR/results/ as they finish (a rerun measures only what is missing); the merged
figures go to docs/results/claims_study.json with plots docs/results/claims_*.png, and the table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "claims.yaml"
OUT = ROOT / "docs" / "results"

MODELS = {  # name -> {dotted params key: value} over configs/claims.yaml (cosine, fixed_small, simple)
    "simple_cosine": {},
    "hybrid_cosine": {"diffusion.variance": "learned_range", "diffusion.loss": "hybrid"},
    "vlb_cosine": {"diffusion.variance": "learned_range", "diffusion.loss": "vlb",
                   "diffusion.timestep_sampler": "loss_aware"},
    "simple_linear": {"schedule.name": "linear"},
}
ROWS = {  # row -> (model, variance to score and sample it with; None: the model's own)
    "fixed_small (L_simple)": ("simple_cosine", "fixed_small"),
    "fixed_large (L_simple)": ("simple_cosine", "fixed_large"),
    "learned (L_hybrid)": ("hybrid_cosine", None),
    "learned (L_vlb, importance-sampled t)": ("vlb_cosine", None),
    "linear schedule, fixed_small (L_simple)": ("simple_linear", "fixed_small"),
}
STEPS = (50, 100, None)  # DDPM ancestral grid points; None = the full schedule
SAMPLE_SEED = 3_000_000  # seed set of training seed s: SAMPLE_SEED + 10_000 * s ..


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _stage(cwd: Path, name: str) -> None:
    subprocess.run([sys.executable, "-m", f"pipeline.{name}", "--params", "params.yaml"], cwd=cwd, env=_env(),
                   check=True)


def prepare(study: Path) -> None:
    """params.yaml from configs/claims.yaml, then the data, the domain feature net and the reference statistics."""
    study.mkdir(parents=True, exist_ok=True)
    if not (study / "params.yaml").exists():
        shutil.copyfile(CONFIG, study / "params.yaml")
    for stage, done in (("prepare", "data/meta.json"), ("train_feature_net", "models/feature_net/config.json"),
                        ("reference_stats", "data/reference/reference-inception.npz")):
        if not (study / done).exists():
            _stage(study, stage)


def model_params(base: dict, overrides: dict, seed: int) -> dict:
    """`base` with dotted `overrides` set and train_diffusion.seed = seed; an unknown key is an error."""
    from .common import with_dotted

    return with_dotted(base, {**overrides, "train_diffusion.seed": seed}, "MODELS")


def train(study: Path, model: str, seed: int) -> Path:
    """train_diffusion for `model` at training seed `seed` unless its model folder exists; returns the folder."""
    import yaml

    work = study / "train" / f"{model}-s{seed}"
    folder = work / "models" / "diffusion"
    if not (folder / "config.json").is_file():
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "data").exists():
            (work / "data").symlink_to((study / "data").resolve())
        params = model_params(yaml.safe_load((study / "params.yaml").read_text()), MODELS[model], seed)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        print(f"training {model} seed {seed}", flush=True)
        _stage(work, "train_diffusion")
    return folder


def _rows(study: Path, model: str, seed: int):
    """(row, bundle scored and sampled with that row's variance) for each row of `model`."""
    import dataclasses

    from diffusion_core.model_folders import load_diffusion_dir

    base = load_diffusion_dir(study / "train" / f"{model}-s{seed}" / "models" / "diffusion")
    for row, (m, variance) in ROWS.items():
        if m == model:
            yield row, (base if variance is None else dataclasses.replace(
                base, diffusion=dataclasses.replace(base.diffusion, variance=variance)))


def bound(bundle, x_test, seed: int, clip: bool) -> dict:
    """The full bound on every test image (seeded noise, the same for every row): mean, standard error over
    images, the prior term and the per-t profile of the vb terms. `clip`: x0 clipped to [-1, 1] in the reverse
    process, the one DDPM sampling runs (improved-diffusion's NLL default); without it, the raw network's."""
    import torch

    terms = bundle.diffusion.bound_terms(bundle.model.eval(), x_test, generator=torch.Generator().manual_seed(seed),
                                         clip_denoised=clip)
    total = terms["total"]
    return {"bpd": float(total.mean()), "bpd_se": float(total.std() / len(total) ** 0.5), "test_images": len(total),
            "prior_bpd": float(terms["prior"].mean()), "vb_per_t": [round(float(v), 6) for v in terms["vb"].mean(0)]}


def add_clipped_bounds(study: Path, model: str, seed: int) -> None:
    """Results measured before the clipped bound (theirs is the raw network's): move it to "unclipped" and add
    the clipped one."""
    import torch

    from diffusion_core.data import load_split
    from diffusion_core.io import atomic_write_json

    torch.set_num_threads(1)
    path = study / "results" / f"{model}-s{seed}.json"
    results = json.loads(path.read_text())
    x_test, _ = load_split(study / "data" / "shards", "test")
    for row, bundle in _rows(study, model, seed):
        res = results[row]
        if "unclipped" not in res:
            unclipped = {k: res[k] for k in ("bpd", "bpd_se", "test_images", "prior_bpd", "vb_per_t")}
            results[row] = {**res, **bound(bundle, x_test, seed, clip=True), "unclipped": unclipped}
            atomic_write_json(path, results)
            print(f"{row} seed {seed}: bits/dim {results[row]['bpd']:.3f} clipped, {unclipped['bpd']:.3f} raw",
                  flush=True)


def measure(study: Path, model: str, seed: int, num: int) -> dict:
    """Every row of `model` at training seed `seed`: bounds, per-t profile, DDPM samples' metrics."""
    import torch

    from diffusion_core.data import load_split
    from diffusion_core.evaluation import DOMAIN, INCEPTION, load_reference, sample_metrics
    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.metrics.fidelity import domain_extractor, inception_extractor

    torch.set_num_threads(1)
    x_test, _ = load_split(study / "data" / "shards", "test")
    ref_dir = study / "data" / "reference"
    domain, domain_ref = domain_extractor(str(study / "models" / "feature_net")), load_reference(ref_dir, DOMAIN)
    inception, inception_ref = inception_extractor(), load_reference(ref_dir, INCEPTION)
    out = {}
    for row, bundle in _rows(study, model, seed):
        res = {**bound(bundle, x_test, seed, clip=True), "unclipped": bound(bundle, x_test, seed, clip=False),
               "samples": {}}
        for steps in STEPS:
            o = generate(bundle, num, SamplingSpec("ddpm", steps), seed=SAMPLE_SEED + 10_000 * seed, batch_size=num)
            met = sample_metrics(o["images"], o["labels"], domain_ref, domain, inception, inception_ref)
            key = str(steps or bundle.diffusion.num_timesteps)
            res["samples"][key] = {k: met[k] for k in ("fd_domain", "kd_domain", "fid_inception", "kid_inception",
                                                       "inception_samples")}
            res["samples"][key].update(nfe=o["nfe"], seconds=round(o["seconds"], 1))
            print(f"{row} seed {seed} ddpm-{key}: fd_domain {met['fd_domain']:.3f} fid_inception "
                  f"{met['fid_inception']:.2f}", flush=True)
        out[row] = res
    return out


def _job(study: Path, model: str, seed: int, num: int) -> None:
    result = study / "results" / f"{model}-s{seed}.json"
    if result.exists():
        return
    train(study, model, seed)
    subprocess.run([sys.executable, "-m", "bench.claims_study", "--dir", str(study), "--num", str(num),
                    "--measure-one", model, str(seed)], env=_env(), check=True)


def merge(study: Path, seeds: list[int]) -> dict:
    """{row: {seed: figures}} of every finished (model, seed), with the config and sample counts."""
    import yaml

    rows: dict = {}
    for model in MODELS:
        for seed in seeds:
            p = study / "results" / f"{model}-s{seed}.json"
            if p.exists():
                for row, res in json.loads(p.read_text()).items():
                    rows.setdefault(row, {})[str(seed)] = res
    params = yaml.safe_load((study / "params.yaml").read_text())
    td = params["train_diffusion"]
    return {"config": "configs/claims.yaml", "dataset": params["prepare"]["dataset"],
            "num_timesteps": params["schedule"]["num_timesteps"],
            "budget": {"steps": td["steps"], "batch_size": td["batch_size"], "unet": td["unet"]},
            "training_seeds": seeds, "models": MODELS, "rows": {r: rows[r] for r in ROWS if r in rows}}


def _spread(values: list[float], digits: int = 3) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def table(merged: dict) -> str:
    """Markdown: per row, bits/dim (the bound, and its terms at t = 0 and t = T - 1) and DDPM fd_domain /
    fid_inception per step count, mean ± std over seeds."""
    T = merged["num_timesteps"]
    keys = [str(s or T) for s in STEPS]
    head = (["row", "bits/dim", "term t=0", f"term t={T - 1}"] + [f"fd_domain {k}" for k in keys]
            + [f"fid_inception {k}" for k in keys])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, by_seed in merged["rows"].items():
        res = list(by_seed.values())
        cells = [row, _spread([r["bpd"] for r in res]), _spread([r["vb_per_t"][0] for r in res]),
                 _spread([r["vb_per_t"][-1] for r in res])]
        cells += [_spread([r["samples"][k]["fd_domain"] for r in res]) for k in keys]
        cells += [_spread([r["samples"][k]["fid_inception"] for r in res], 2) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(merged: dict, a: str, b: str, figure) -> tuple[float, float, int]:
    """Mean and standard error over training seeds of figure(row a) - figure(row b), paired by seed."""
    rows = merged["rows"]
    seeds = sorted(set(rows.get(a, {})) & set(rows.get(b, {})))
    d = [figure(rows[a][s]) - figure(rows[b][s]) for s in seeds]
    if len(d) < 2:
        return float("nan"), float("nan"), len(d)
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5, len(d)


CLAIMS = [  # (what is compared, row a, row b, figure): a - b < 0 means a is better (lower)
    ("bound: learned variances (L_hybrid) vs fixed small", "learned (L_hybrid)", "fixed_small (L_simple)", "bpd"),
    ("bound: fixed large vs fixed small", "fixed_large (L_simple)", "fixed_small (L_simple)", "bpd"),
    ("bound: L_vlb with importance sampling vs L_hybrid", "learned (L_vlb, importance-sampled t)",
     "learned (L_hybrid)", "bpd"),
    ("bound: cosine vs linear schedule (L_simple, fixed small)", "fixed_small (L_simple)",
     "linear schedule, fixed_small (L_simple)", "bpd"),
    ("fd_domain at the full schedule: cosine vs linear", "fixed_small (L_simple)",
     "linear schedule, fixed_small (L_simple)", "fd_domain@T"),
    ("fid_inception at the full schedule: cosine vs linear", "fixed_small (L_simple)",
     "linear schedule, fixed_small (L_simple)", "fid_inception@T"),
    ("fd_domain at 50 steps: learned (L_hybrid) vs fixed small", "learned (L_hybrid)", "fixed_small (L_simple)",
     "fd_domain@50"),
    ("fd_domain at 50 steps: learned (L_hybrid) vs fixed large", "learned (L_hybrid)", "fixed_large (L_simple)",
     "fd_domain@50"),
    ("fid_inception at 50 steps: learned (L_hybrid) vs fixed large", "learned (L_hybrid)",
     "fixed_large (L_simple)", "fid_inception@50"),
]


def _figure(res: dict, name: str, T: int) -> float:
    if "@" not in name:
        return res[name]
    metric, steps = name.split("@")
    return res["samples"][str(T if steps == "T" else steps)][metric]


def claims(merged: dict) -> str:
    """Markdown: each comparison of CLAIMS as the paired difference a - b over training seeds (mean ± SE, n)."""
    T = merged["num_timesteps"]
    lines = ["| comparison | a - b (mean ± SE over seeds) | seeds |", "|---|---|---|"]
    for what, a, b, fig in CLAIMS:
        mean, se, n = paired(merged, a, b, lambda r, fig=fig: _figure(r, fig, T))
        lines.append(f"| {what} | {mean:+.3f} ± {se:.3f} | {n} |")
    return "\n".join(lines)


def plots(merged: dict, out: Path) -> list[Path]:
    """claims_bpd_per_t.png (the vb terms' profile per row) and claims_fd_vs_steps.png (FD per variance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from diffusion_core.io import atomic_path

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, by_seed in merged["rows"].items():
        prof = np.mean([r["vb_per_t"] for r in by_seed.values()], axis=0)
        ax.plot(np.arange(len(prof)), prof, label=row)
    ax.set(xlabel="t", ylabel="vb term (bits/dim)", yscale="log",
           title=f"Bound terms per t, test set, mean over {len(merged['training_seeds'])} training seeds")
    ax.legend(fontsize=7)
    paths.append(out / "claims_bpd_per_t.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    T = merged["num_timesteps"]
    keys = [str(s or T) for s in STEPS]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax in zip(("fd_domain", "fid_inception"), axes):
        for row, by_seed in merged["rows"].items():
            vals = np.array([[r["samples"][k][metric] for k in keys] for r in by_seed.values()])
            err = vals.std(0, ddof=1) if len(vals) > 1 else None
            ax.errorbar([int(k) for k in keys], vals.mean(0), yerr=err, marker="o", capsize=3, label=row)
        ax.set(xscale="log", yscale="log", xlabel="DDPM ancestral steps", ylabel=metric,
               title=f"{metric} (mean ± std over seeds)")
    axes[0].legend(fontsize=7)
    paths.append(out / "claims_fd_vs_steps.png")
    with atomic_path(paths[-1]) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/claims-study"), help="study folder (resumable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--num", type=int, default=359, help="samples per point (default: the test split's size)")
    ap.add_argument("--jobs", type=int, default=2, help="models trained and measured side by side, one thread each")
    ap.add_argument("--measure-one", nargs=2, metavar=("MODEL", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--add-clipped", action="store_true",
                    help="only add the clipped-x0 bound to the finished results measured without it")
    args = ap.parse_args(argv)
    study = args.dir.resolve()
    if args.add_clipped:
        for model in MODELS:
            for seed in args.seeds:
                if (study / "results" / f"{model}-s{seed}.json").exists():
                    add_clipped_bounds(study, model, seed)
        return 0
    if args.measure_one:
        from diffusion_core.io import atomic_write_json

        model, seed = args.measure_one[0], int(args.measure_one[1])
        atomic_write_json(study / "results" / f"{model}-s{seed}.json", measure(study, model, seed, args.num))
        return 0
    prepare(study)
    jobs = [(m, s) for s in args.seeds for m in MODELS]
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(_job, study, m, s, args.num) for m, s in jobs]:
            f.result()
    from diffusion_core.io import atomic_write_json

    merged = merge(study, args.seeds)
    atomic_write_json(OUT / "claims_study.json", merged)
    plots(merged, OUT)
    print(table(merged))
    print()
    print(claims(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
