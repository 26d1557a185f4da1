"""Our samplers against diffusers' schedulers on the same trained network, same seeds, side by side.

    python -m bench.diffusers_samplers --run RUN_DIR [--model diffusion] [--sets 1] [--num 1000]

For each pair, both draw the same x_T (our per-sample seeds), the same labels (classes cycled) and the same CFG
(scale 1.5, as evaluate); the network runs under bf16 + channels_last (FastDenoiser) for both; latents are
decoded by the model's autoencoder. diffusers' schedulers get our betas (`trained_betas`) and our prediction
type, `timestep_spacing="trailing"`; DPMSolverMultistep also `lambda_min_clipped=-5.1`, diffusers' setting for
cosine schedules (ours: the same start guard, `sample(lambda_min=-5.1)`). Euler/Heun/UniPC have no guard in
diffusers: ours runs those without it too (`lambda_min=None`), so each pair walks the same grid; a last row runs
our Heun with the guard (cosine's t=999 is log-SNR about -20: Heun's first correction multiplies the network's
error by sigma_0 / sigma_1 there, in both implementations). Writes
RUN_DIR/reports/diffusers_samplers.json after every point and prints a table (fd_domain mean +- std over sets).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

# (label, diffusers class, its kwargs, steps, our sampler, our lambda_min)
PAIRS = [
    ("DPM-Solver++(2M)", "DPMSolverMultistepScheduler", {"solver_order": 2, "lambda_min_clipped": -5.1,
                                                         "final_sigmas_type": "zero"}, 10, "dpmpp2m", -5.1),
    ("DPM-Solver++(3M)", "DPMSolverMultistepScheduler", {"solver_order": 3, "lambda_min_clipped": -5.1,
                                                         "final_sigmas_type": "zero"}, 10, "dpmpp3m", -5.1),
    ("Euler", "EulerDiscreteScheduler", {}, 20, "euler", None),
    ("Heun", "HeunDiscreteScheduler", {}, 10, "heun", None),
    ("UniPC (bh2)", "UniPCMultistepScheduler", {"solver_order": 2, "final_sigmas_type": "zero"}, 10, None, None),
    ("Heun, start guarded", None, {}, 10, "heun", -5.1),  # ours only: diffusers' Heun has no start guard
    # ours on diffusers' guarded grid (below): traces the DPM-Solver++ rows' gap to the grid, not the solver
    ("DPM-Solver++(2M), diffusers' guarded grid", None, {}, 10, "dpmpp2m", -5.1),
    ("DPM-Solver++(3M), diffusers' guarded grid", None, {}, 10, "dpmpp3m", -5.1),
]
DIFFUSERS_GRID = "diffusers' guarded grid"


def diffusers_guarded_trailing(schedule, steps, spacing="trailing", lambda_min=None):
    """diffusers' DPMSolverMultistep `trailing` grid under `lambda_min_clipped`: T/steps apart, counted down from the
    last timestep the guard keeps (995, 895, .., 95 on the default cosine model). Ours (`grids.grid_timesteps`)
    spaces T/steps apart from T-1 and moves the steps above the guard down to it: 995, 899, 799, .., 99."""
    import numpy as np
    import torch

    lam = 0.5 * torch.log(schedule.snr)
    last = int(torch.nonzero(lam >= lambda_min).flatten().max()) + 1
    t = np.arange(last, 0, -schedule.num_timesteps / steps).round().astype(np.int64) - 1
    return torch.as_tensor(sorted(set(t.tolist())), dtype=torch.int64)
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def diffusers_loop(scheduler, model, x_T, labels):
    """The standard diffusers sampling loop: x = x_T * init_noise_sigma, scale_model_input, step. Returns x0."""
    import torch

    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        ti = torch.full((x.shape[0],), int(round(float(t))), dtype=torch.long)
        x = scheduler.step(model(scheduler.scale_model_input(x, t), ti, labels), t, x).prev_sample
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="repo checkout after dvc repro (models/, data/reference/)")
    ap.add_argument("--model", default="diffusion", help="folder under RUN/models/")
    ap.add_argument("--sets", type=int, default=1, help="disjoint seed sets per point")
    ap.add_argument("--num", type=int, default=1000, help="samples per set")
    ap.add_argument("--scale", type=float, default=1.5, help="CFG scale")
    ap.add_argument("--seed", type=int, default=3_000_000, help="first seed of set 0")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default RUN/reports/diffusers_samplers.json)")
    args = ap.parse_args(argv)

    import diffusers
    import torch

    from diffusion_core.evaluation import sample_metrics
    from diffusion_core.generation import FastDenoiser, sample_labels, to_uint8
    from diffusion_core.guidance import ClassifierFreeGuidance
    from diffusion_core.io import atomic_write_json
    from diffusion_core.model_folders import load_diffusion_dir
    from diffusion_core.samplers import SamplingSpec, sample
    from diffusion_core.samplers.common import NoiseSource

    from .sampler_study import study_context

    out_path, results, ref, extractor = study_context(args.run, args.out, "diffusers_samplers.json")
    bundle = load_diffusion_dir(args.run / "models" / args.model)
    d = bundle.diffusion
    spec = bundle.config["diffusion"]
    fast = FastDenoiser(bundle.model.eval(), bf16=True, channels_last=True)
    guided = ClassifierFreeGuidance(args.scale, null_class=bundle.num_classes).wrap(fast)
    betas = d.schedule.betas.double().numpy()
    batch = 250

    def run(kind, label, cls, kw, steps, ours, lam, seeds, labels):
        chunks = []
        for lo in range(0, len(seeds), batch):
            s, y = seeds[lo:lo + batch], torch.as_tensor(labels[lo:lo + batch])
            with torch.no_grad(), _grid(label):
                if kind == "ours":
                    x0 = sample(d, guided, (len(s), *bundle.shape), SamplingSpec(ours, steps=steps, spacing="trailing"),
                                seeds=s, y=y, clip_denoised=not bundle.is_latent, lambda_min=lam)
                else:
                    sch = getattr(diffusers, cls)(num_train_timesteps=d.num_timesteps, trained_betas=betas,
                                                  prediction_type=PREDICTION[spec["parameterization"]],
                                                  timestep_spacing="trailing", **kw)
                    sch.set_timesteps(steps)
                    x_T = NoiseSource((len(s), *bundle.shape), "cpu", seeds=s)()
                    x0 = diffusers_loop(sch, guided, x_T, y)
                    if not bundle.is_latent:
                        x0 = x0.clamp(-1, 1)
                chunks.append(bundle.to_images(x0).float())
        return to_uint8(torch.cat(chunks))

    for label, cls, kw, steps, ours, lam in PAIRS:
        for kind in [k for k, have in (("diffusers", cls), ("ours", ours)) if have]:
            rows = results.setdefault(f"{label} {steps} steps", {}).setdefault(kind, [])
            for k in range(len(rows), args.sets):
                seeds = list(range(args.seed + k * args.num, args.seed + (k + 1) * args.num))
                labels = sample_labels(args.num, range(bundle.num_classes))
                calls = {"n": 0}
                inner = fast.forward

                def counting(x, t, y=None, _inner=inner):
                    calls["n"] += x.shape[0]
                    return _inner(x, t, y)

                fast.forward = counting
                t0 = time.perf_counter()
                images = run(kind, label, cls, kw, steps, ours, lam, seeds, labels)
                fast.forward = inner
                m = sample_metrics(images, labels, ref, extractor)
                rows.append({"set": k, "fd_domain": m["fd_domain"], "class_accuracy": m["class_accuracy"],
                             "nfe": calls["n"] / args.num, "seconds": round(time.perf_counter() - t0, 1)})
                atomic_write_json(out_path, results)
                print(f"{label} {steps} {kind} set {k}: fd_domain {m['fd_domain']:.3f} "
                      f"acc {m['class_accuracy']:.3f} nfe {rows[-1]['nfe']:g}", flush=True)
    fast.restore()
    print(table(results))
    return 0


def _grid(label: str):
    """Ours on diffusers' guarded grid for the rows that say so; the project's own grid otherwise."""
    import contextlib
    from unittest import mock

    if DIFFUSERS_GRID not in label:
        return contextlib.nullcontext()
    return mock.patch("diffusion_core.samplers.common.grid_timesteps", diffusers_guarded_trailing)


def table(results: dict) -> str:
    def cell(rows):
        if not rows:
            return "-"
        fds = [r["fd_domain"] for r in rows]
        sd = f" ± {statistics.stdev(fds):.3f}" if len(fds) > 1 else ""
        return f"{statistics.mean(fds):.3f}{sd} ({len(fds)}), NFE {rows[0]['nfe']:g}"

    lines = ["| sampler | diffusers | ours |", "|---|---|---|"]
    for key, kinds in results.items():
        lines.append(f"| {key} | {cell(kinds.get('diffusers'))} | {cell(kinds.get('ours'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
