"""Samplers x grids x NFE on trained model folders, 1,000 samples per point, several disjoint seed sets.

    python -m bench.sampler_study --run RUN_DIR --models diffusion [diffusion_v ...] [--sets 3] [--num 1000]
                                  [--inception N]

Sets already in the JSON are kept (a rerun measures only what is missing); `--only-set K --out F` runs one set
per process (merge the files' lists by hand). RUN_DIR is a repo checkout after `dvc repro` (models/<name>/,
models/feature_net/, data/reference/). Every point is CFG at evaluate's scale, channels_last, bf16 where the CPU
computes it natively (`bf16="auto"`, as evaluate), seed set k = seeds base + k * num .. (disjoint from the
sweep's and evaluate's). Writes
RUN_DIR/reports/sampler_study.json after every point (a crash keeps what was measured) and prints a table:
fd_domain mean +- std over the sets, class_accuracy, NFE per sample; with `--inception N`, fid_inception and
kid_inception of each set's first N samples against RUN_DIR's Inception reference too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

POINTS = [  # (sampler, steps, spacing, options)
    ("ddpm", 20, "trailing", {}), ("ddpm", 50, "trailing", {}),
    ("ddim", 20, "trailing", {}), ("ddim", 50, "trailing", {}), ("ddim", 50, "leading", {}),
    ("dpmpp2m", 20, "trailing", {}), ("dpmpp2m", 20, "logsnr", {}), ("dpmpp3m", 20, "logsnr", {}),
    ("heun", 10, "karras", {}), ("dpmpp2m_sde", 20, "logsnr", {}),
    ("dpmpp2m", 10, "logsnr", {}), ("dpmpp3m", 10, "logsnr", {}), ("ddim", 50, "logsnr", {}),
    ("ddpm", 1000, "trailing", {}),  # the converged reference: 2,000 NFE with CFG, ~30 min a set on one core
    # the grids of distill's students (models/student: --models student --points ddim-1-trailing ...), and the
    # teacher's own DDIM on them
    ("ddim", 1, "trailing", {}), ("ddim", 2, "trailing", {}), ("ddim", 4, "trailing", {}), ("ddim", 8, "trailing", {}),
    ("consistency", 1, "trailing", {}), ("consistency", 2, "trailing", {}), ("consistency", 4, "trailing", {}),
    ("consistency", 8, "trailing", {}),  # a consistency student's (distill.method: consistency)
]


def study_context(run: Path, out: Path | None, default_name: str):
    """(out_path, results so far, domain reference, domain extractor) of a bench study on a repro folder; one
    torch thread per process (sets run side by side)."""
    import torch

    from diffusion_core.evaluation import DOMAIN, load_reference
    from diffusion_core.metrics.fidelity import domain_extractor

    torch.set_num_threads(1)
    out_path = out or run / "reports" / default_name
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    return (out_path, results, load_reference(run / "data" / "reference", DOMAIN),
            domain_extractor(str(run / "models" / "feature_net")))


def _key(p) -> str:
    opts = ",".join(f"{k}={v:g}" for k, v in sorted(p[3].items()))
    return f"{p[0]}-{p[1]}-{p[2]}" + (f"-{opts}" if opts else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="repo checkout with models/ and data/reference/")
    ap.add_argument("--models", nargs="+", default=["diffusion"], help="folders under RUN/models/")
    ap.add_argument("--sets", type=int, default=3, help="disjoint seed sets per point")
    ap.add_argument("--num", type=int, default=1000, help="samples per set")
    ap.add_argument("--scale", type=float, default=1.5, help="CFG scale (evaluate's)")
    ap.add_argument("--seed", type=int, default=2_000_000, help="first seed of set 0")
    ap.add_argument("--only-set", type=int, default=None, metavar="K",
                    help="run seed set K only (several processes, one set each, with their own --out)")
    ap.add_argument("--points", nargs="*", default=None, help="sampler-steps-spacing keys to run (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default RUN/reports/sampler_study.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: sets run side by side)")
    ap.add_argument("--inception", type=int, default=0, metavar="N",
                    help="fid_inception/kid_inception on each set's first N samples (0: none)")
    args = ap.parse_args(argv)

    from diffusion_core.evaluation import INCEPTION, load_reference, sample_metrics
    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.io import atomic_write_json
    from diffusion_core.model_folders import load_diffusion_dir
    from diffusion_core.precision import bf16_is_fast

    out_path, results, ref, extractor = study_context(args.run, args.out, "sampler_study.json")
    import torch

    torch.set_num_threads(args.threads)
    points = [p for p in POINTS if args.points is None or _key(p) in args.points]
    inception = inception_ref = None
    if args.inception:
        from diffusion_core.metrics.fidelity import inception_extractor

        inception, inception_ref = inception_extractor(), load_reference(args.run / "data" / "reference", INCEPTION)
    for name in args.models:
        bundle = load_diffusion_dir(args.run / "models" / name)
        for p in points:
            rows = results.setdefault(name, {}).setdefault(_key(p), [])
            done = {r["set"] for r in rows}
            for k in [args.only_set] if args.only_set is not None else range(args.sets):
                if k in done:
                    continue
                t0 = time.perf_counter()
                spec = SamplingSpec(p[0], p[1], p[2], p[3], guidance="cfg", scale=args.scale)
                o = generate(bundle, args.num, spec, seed=args.seed + k * args.num, batch_size=250, bf16="auto",
                             channels_last=True)
                m = sample_metrics(o["images"], o["labels"], ref, extractor, inception, inception_ref,
                                   inception_samples=args.inception or None)
                rows.append({"set": k, "fd_domain": m["fd_domain"], "kd_domain": m["kd_domain"],
                             "class_accuracy": m["class_accuracy"], "nfe": o["nfe"], "bf16": bf16_is_fast("cpu"),
                             "seconds": round(time.perf_counter() - t0, 1),
                             **{key: m[key] for key in ("fid_inception", "kid_inception", "inception_samples")
                                if key in m}})
                atomic_write_json(out_path, results)
                print(f"{name} {_key(p)} set {k}: fd_domain {m['fd_domain']:.3f} acc {m['class_accuracy']:.3f} "
                      f"nfe {o['nfe']:g} ({rows[-1]['seconds']} s)", flush=True)
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| model | point | NFE | fd_domain (mean ± std, sets) | fid_inception (mean ± std, sets, N) | "
             "class_accuracy |", "|---|---|---|---|---|---|"]
    for name, pts in results.items():
        for key, rows in pts.items():
            acc = statistics.mean(r["class_accuracy"] for r in rows)
            inc = [r for r in rows if "fid_inception" in r]
            fid = (f"{_spread([r['fid_inception'] for r in inc])}, N={min(r['inception_samples'] for r in inc)}"
                   if inc else "")
            lines.append(f"| {name} | {key} | {rows[0]['nfe']:g} | {_spread([r['fd_domain'] for r in rows])} "
                         f"| {fid} | {acc:.3f} |")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({len(values)})"


if __name__ == "__main__":
    raise SystemExit(main())
