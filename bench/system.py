"""Distributed, memory and latent-vs-pixel figures.

- `ray_2workers_vs_single_process`: the train_diffusion stage (default U-Net, 8x8 images from the digits source,
  global batch 64) with 2 Ray workers x 1 thread against 1 process x 2 threads without Ray. The ratio uses the
  steady rate: the median of the logged windows (a quarter of the steps each) after the first; the whole-loop rate
  from the stage's metrics file is kept beside it (`ratio_whole_loop`). Ray start-up = stage wall time minus loop
  time.
- peak RSS of that single-process training stage and of `diffusion sample` at batch 256 (DDIM-50), each in its own
  process (VmHWM of that process: ru_maxrss would report the bench's own peak, kept across fork + exec).
- latent vs pixel at the default U-Net (params.yaml train_diffusion.unet): training images/s of one step at batch 64
  on 4x8x8 latents against 1x28x28 pixels, and DDIM-50 sampling images/s at batch 256 (latent includes decoding
  with the default autoencoder architecture).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from .common import interleaved, num_threads

ROOT = Path(__file__).resolve().parents[1]


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    venv_bin = str(Path(sys.executable).parent)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{venv_bin}:{env.get('PATH', '')}")
    return env


def _run_rss(args: list[str], cwd: Path, threads: int) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MiB, stdout + stderr) of `python -m ...args` in its own process."""
    code = ("import resource, runpy, sys\n"
            "sys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e:\n    rc = e.code\nelse:\n    rc = 0\n"
            # VmHWM: peak RSS of this process image (ru_maxrss would carry the parent's peak across fork + exec)
            "hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
            "kb = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print('PEAK_RSS_KB', kb, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=_env(threads), capture_output=True,
                         text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {res.stderr.strip().splitlines()[-1:]}")
    kb = next(int(ln.split()[1]) for ln in res.stderr.splitlines() if ln.startswith("PEAK_RSS_KB"))
    return wall, kb // 1024, res.stdout + res.stderr


WINDOW = re.compile(r"step (\d+)/\d+ .* (\d+) samples/s")


def _steady_samples_per_s(stdout: str) -> float | None:
    """Median samples/s of the logged windows after the first: the first holds one-off costs (the first step's
    allocations and oneDNN primitive set-up, and with Ray the wait for the later worker to reach the first
    all-reduce), which a 40-step run would otherwise spread over everything."""
    rates = [int(m.group(2)) for m in WINDOW.finditer(stdout)]
    return float(statistics.median(rates[1:])) if len(rates) >= 2 else None


def _params(tmp: Path, steps: int, workers: int, use_ray: bool) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tracking"]["enabled"] = False
    raw["prepare"]["dataset"] = "digits"
    td = raw["train_diffusion"]
    td.update(space="pixel", steps=steps, checkpoint_every=steps, log_every=max(1, steps // 4), sample_every=0)
    td["scaling"].update(num_workers=workers, cpus_per_worker=1 if use_ray else 2, use_ray=use_ray)
    path = tmp / f"params-{workers}-{int(use_ray)}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def distributed(steps: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        p = _params(tmp, steps, 1, False)
        subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", p.name], cwd=tmp, env=_env(2),
                       check=True, capture_output=True)
        out = {}
        for name, workers, use_ray, threads in (("single_process_2threads", 1, False, 2),
                                                ("ray_2workers_1thread", 2, True, 1)):
            p = _params(tmp, steps, workers, use_ray)
            shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
            wall, rss, stdout = _run_rss(["pipeline.train_diffusion", "--params", p.name], tmp, threads)
            m = json.loads((tmp / "metrics" / "train_diffusion.json").read_text())
            out[name] = {"samples_per_s": m["samples_per_second"], "loop_s": m["wall_seconds"],
                         "stage_s": round(wall, 1),
                         "startup_s": round(wall - m["wall_seconds"], 1), "driver_peak_rss_mib": rss,
                         "steady_samples_per_s": _steady_samples_per_s(stdout)}
        ray, single = out["ray_2workers_1thread"], out["single_process_2threads"]
        out["ratio_whole_loop"] = round(ray["samples_per_s"] / single["samples_per_s"], 3)
        if ray["steady_samples_per_s"] and single["steady_samples_per_s"]:
            out["ratio"] = round(ray["steady_samples_per_s"] / single["steady_samples_per_s"], 3)  # the reported one
        else:
            out["ratio"] = out["ratio_whole_loop"]
        out["steps"], out["global_batch"] = steps, 64
        # sampling memory at batch 256 from the model just trained (in-process stage wrote models/diffusion)
        _, rss, _ = _run_rss(["pipeline.cli", "sample", "--model", "models/diffusion", "--num", "256", "--batch-size",
                           "256", "--steps", "50", "--out", "s.png"], tmp, 2)
        out["sample_b256_peak_rss_mib"] = rss
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def latent_vs_pixel(quick: bool) -> dict:
    from diffusion_core.builders import build_autoencoder, build_denoiser, build_diffusion_from_options
    from diffusion_core.samplers import SamplingSpec, sample
    from pipeline.config import load_params

    params = load_params(ROOT / "params.yaml")
    td = params.train_diffusion
    diff = build_diffusion_from_options(params.schedule.to_options(), params.diffusion.to_options())
    ae = build_autoencoder(params.train_autoencoder.autoencoder.to_options(), 28).eval()
    shapes = {"latent": (params.train_autoencoder.autoencoder.latent_channels, 8, 8), "pixel": (1, 28, 28)}
    nets = {k: build_denoiser(td.unet.to_options(), s, 10, False) for k, s in shapes.items()}

    def train_step(kind):
        net, opt = nets[kind], torch.optim.AdamW(nets[kind].parameters(), lr=1e-4)
        x, y = torch.randn(64, *shapes[kind]), torch.randint(0, 10, (64,))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=td.bf16):
                t = torch.randint(0, diff.num_timesteps, (64,))
                loss = diff.training_losses(net.train(), x, t, y=y)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    def sample_fn(kind, n):
        net = nets[kind].eval()

        @torch.no_grad()
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=td.bf16):
                x = sample(diff, net, (n, *shapes[kind]), SamplingSpec("ddim", steps=50), seeds=list(range(n)),
                           y=torch.arange(n) % 10, clip_denoised=kind == "pixel")
                if kind == "latent":
                    x = ae.decode(x)
        return run

    reps = 3 if quick else 6
    with num_threads(2):
        tr = interleaved({k: train_step(k) for k in shapes}, repeats=reps)
        n = 64 if quick else 256
        sa = interleaved({k: sample_fn(k, n) for k in shapes}, repeats=1 if quick else 2)
    out = {"unet": td.unet.model_dump() if hasattr(td.unet, "model_dump") else str(td.unet), "sample_batch": n}
    for k in shapes:
        out[k] = {"train_images_per_s": round(64 / tr[k]["median_s"], 1),
                  "ddim50_images_per_s": round(n / sa[k]["median_s"], 2)}
    out["train_speedup_latent_over_pixel"] = round(out["latent"]["train_images_per_s"]
                                                   / out["pixel"]["train_images_per_s"], 2)
    out["ddim50_speedup_latent_over_pixel"] = round(out["latent"]["ddim50_images_per_s"]
                                                    / out["pixel"]["ddim50_images_per_s"], 2)
    return out


def run(quick: bool = False) -> dict:
    return {"distributed": distributed(40 if quick else 120), "latent_vs_pixel": latent_vs_pixel(quick)}


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
