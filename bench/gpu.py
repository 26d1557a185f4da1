"""`python -m bench.gpu [--device auto|cuda|cpu] [--quick] [--compile]`: training and sampling throughput and peak
memory on one device (the figures of bench/README.md's GPU table; `bench/gpu_check.sh` runs it).

Three networks: the default model of params.yaml (train_diffusion.unet on 8x8x4 latents, class-conditional) and the
equal-FLOP pair of bench/models.py (ours, diffusers' UNet2DModel; 28x28x1). Each is timed at fp32 and under bf16
autocast (on CUDA always; on a CPU only where bf16 is native), optionally torch.compile'd: training samples/s at
batch 64 (forward, loss, backward, AdamW) and DDIM-50 samples/s at batch 256 (--quick: DDIM-10 on 16), with
`torch.cuda.synchronize()` around the timed region on CUDA. Peak memory: `torch.cuda.max_memory_allocated` on
CUDA, the process's peak RSS so far on a CPU (cumulative over the rows).
Writes bench/gpu_results.json atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusion_core.precision import bf16_is_fast
from diffusion_core.samplers import SamplingSpec, sample

from .common import atomic_write_json, machine
from .models import IMAGE, diffusers_unet, diffusion, n_params, our_unet

RESULTS = Path(__file__).with_name("gpu_results.json")
TRAIN_BATCH, SAMPLE_BATCH = 64, 256
LATENT = (4, 8, 8)
MODELS = ("default", "ours", "diffusers")


def default_model() -> torch.nn.Module:
    """params.yaml's train_diffusion.unet at its latent shape, 10 classes (what `make repro` trains)."""
    import yaml

    from diffusion_core.builders import build_denoiser
    from diffusion_core.options import NetOptions, options_from

    unet = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["train_diffusion"]["unet"]
    torch.manual_seed(0)
    return build_denoiser(options_from(NetOptions, argparse.Namespace(**unet)), LATENT, 10, False)


class Net:
    """One contender on a device: model(x, t, y) -> eps (diffusers' output unwrapped), its input shape."""

    def __init__(self, name: str, device: torch.device, compile: bool):
        model = {"default": default_model, "ours": our_unet, "diffusers": diffusers_unet}[name]()
        self.name, self.model = name, model.to(device)
        self.shape = LATENT if name == "default" else IMAGE
        self.classes = 10 if name == "default" else None
        self.fwd = torch.compile(self._forward) if compile else self._forward

    def _forward(self, x, t, y=None):
        out = self.model(x, t) if self.name == "diffusers" else self.model(x, t, y)
        return out.sample if self.name == "diffusers" else out


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_second(fn, device: torch.device, repeats: int, items: int) -> float:
    fn()  # warm-up (and the compile, with --compile)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return round(items * repeats / (time.perf_counter() - t0), 1)


def train_rate(net: Net, device: torch.device, bf16: bool, repeats: int) -> float:
    """Training samples/s: noise, forward, MSE on eps, backward, AdamW."""
    d = diffusion()
    opt = torch.optim.AdamW(net.model.parameters(), lr=1e-4)
    x0 = torch.randn(TRAIN_BATCH, *net.shape, device=device).clamp(-1, 1)
    y = torch.randint(0, net.classes, (TRAIN_BATCH,), device=device) if net.classes else None

    def step():
        t = torch.randint(0, d.num_timesteps, (TRAIN_BATCH,), device=device)
        noise = torch.randn_like(x0)
        with _autocast(device, bf16):
            pred = net.fwd(d.q_sample(x0, t, noise), t, y)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _per_second(step, device, repeats, TRAIN_BATCH)


def sample_rate(net: Net, device: torch.device, bf16: bool, batch: int, steps: int) -> float:
    """DDIM samples/s (our sampler loop for all three, so the network is what differs)."""
    d = diffusion()
    y = torch.arange(batch, device=device) % net.classes if net.classes else None

    @torch.no_grad()
    def model(x, t, y=None):
        with _autocast(device, bf16):
            return net.fwd(x, t, y).float()

    def run():
        sample(d, model, (batch, *net.shape), SamplingSpec("ddim", steps=steps), y=y, device=device,
               generator=torch.Generator(device).manual_seed(0), clip_denoised=net.name != "default")

    return _per_second(run, device, 1, batch)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def run(device: torch.device, quick: bool, compile: bool, models=MODELS) -> dict:
    precisions = [False] + ([True] if device.type == "cuda" or bf16_is_fast() else [])
    repeats, batch, steps = (3, 16, 10) if quick else (20, SAMPLE_BATCH, 50)
    rows = []
    for name in models:
        for bf16 in precisions:
            net = Net(name, device, compile)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = {"model": name, "params": n_params(net.model), "precision": "bf16" if bf16 else "fp32",
                   "compile": compile, "train_samples_per_s": train_rate(net, device, bf16, repeats),
                   f"ddim{steps}_samples_per_s": sample_rate(net, device, bf16, batch, steps),
                   "peak_memory_mib": peak_memory_mib(device)}
            rows.append(row)
            print(f"{name:9s} {row['precision']}{'+compile' if compile else ''}: train {row['train_samples_per_s']} "
                  f"samples/s, DDIM-{steps} {row[f'ddim{steps}_samples_per_s']} samples/s, peak "
                  f"{row['peak_memory_mib']} MiB", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": device.type, "gpu": gpu, "quick": quick, "train_batch": TRAIN_BATCH, "sample_batch": batch,
            "sample_steps": steps,
            "machine": machine(), "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cuda:N or cpu")
    p.add_argument("--quick", action="store_true", help="3 training steps and DDIM-10 on 16 samples per setting")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which networks (default: all)")
    p.add_argument("--compile", action="store_true", help="torch.compile each network")
    p.add_argument("--out", default=str(RESULTS), help="results JSON (default: bench/gpu_results.json)")
    args = p.parse_args(argv)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {name}: torch sees no CUDA device here; use --device cpu or auto", file=sys.stderr)
        return 2
    results = run(torch.device(name), args.quick, args.compile, args.models)
    atomic_write_json(args.out, results)
    print(f"bench.gpu: {json.dumps({k: results[k] for k in ('device', 'gpu', 'quick')})} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
