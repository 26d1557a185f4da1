"""Quality at the default budget, side by side with diffusers: a slow benchmark, not part of `--quick`.

    python -m bench.quality --run DIR            # DIR: a folder where the default `dvc repro` finished

Two peers, trained here on the same train split and scored with the same feature net and reference statistics as
our `evaluate` stage (fd_domain, kd_domain, precision/recall_domain, class_accuracy at the same sample count, DDIM-50,
classes cycled 0..K-1), each sampled at CFG scale 2 (the issue's setting) and at our evaluate stage's scale, so the
comparison holds at equal settings too:

- pixel: diffusers' `UNet2DModel` (block_out_channels 32,64,64, attention at the 7x7 level, class-conditional with a
  null class, label dropout 0.1) trained with `DDPMScheduler` (its default linear schedule) for the wall-clock time of
  our training stages together (train_autoencoder + train_diffusion + train_classifier, whole stages as bench.e2e
  timed them in DIR, else their training loops from DIR/metrics), then sampled
  with `DDIMScheduler` (50 steps, eta 0);
- latent: diffusers' `UNet2DModel` (64,128 channels, attention at 4x4, class-conditional) trained for
  `--latent-seconds` on the same 8x8x4 latents our diffusion uses (DIR/data/latents, our autoencoder from
  DIR/models/autoencoder, scaled to unit variance), sampled with DDIM-50 (eta 0 and 1) and decoded by that autoencoder.

The peers' trained (EMA) weights are kept in `--cache` (default DIR/bench_peers); `--reuse` samples them again
without retraining. Each peer counts at its best setting (lowest fd_domain over eta and scale).

Both use our training hyper-parameters (AdamW, lr 5e-4, 100 warm-up steps, grad clip 1, EMA 0.995 for sampling) so
the comparison is of the networks and libraries, not of tuning. Writes `bench/quality.json` (atomically) and
`bench/quality_grid.png` (rows: ours, pixel peer, latent peer; each column one requested class).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from bench.common import atomic_write_json, machine

OUT_JSON, OUT_GRID = Path("bench/quality.json"), Path("bench/quality_grid.png")
PIXEL_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8, attention_head_dim=16,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
LATENT_UNET = dict(block_out_channels=(64, 128), layers_per_block=2, norm_num_groups=16, attention_head_dim=32,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
TRAINING_STAGES = ("train_autoencoder", "train_diffusion", "train_classifier")


def _stage_seconds(run: Path) -> dict[str, float]:
    """Our training stages' wall times: whole stages (Ray start-up included) as `python -m bench.e2e` timed them in
    this run folder, else the training loops' own seconds from RUN/metrics (shorter: a smaller budget for the peer)."""
    results = Path(__file__).with_name("results.json")
    e2e = json.loads(results.read_text()).get("groups", {}).get("e2e", {}) if results.exists() else {}
    if Path(e2e.get("dir", "")).resolve() == run and all(s in e2e.get("stages_s", {}) for s in TRAINING_STAGES):
        return {s: float(e2e["stages_s"][s]) for s in TRAINING_STAGES}
    out = {}
    for stage in TRAINING_STAGES:
        m = json.loads((run / "metrics" / f"{stage}.json").read_text())
        out[stage] = float(m.get("wall_seconds", m.get("train_seconds")))
    return out


def train_peer(unet, x: torch.Tensor, y: torch.Tensor, num_classes: int, seconds: float, batch: int,
               label: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Train `unet` with DDPMScheduler noise and an MSE on eps until `seconds` of wall clock pass; EMA model back."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)
    warmup = 100
    lr_at = lambda step: min(1.0, (step + 1) / warmup)  # noqa: E731
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train()
    t0, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        x0, yb = x[idx], y[idx].clone()
        yb[torch.rand(batch, generator=g) < 0.1] = num_classes  # null class
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, class_labels=yb).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched_lr.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - 0.995)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            el = time.perf_counter() - t0
            print(f"  {label}: step {step} loss {np.mean(losses[-100:]):.4f} {step * batch / el:.0f} img/s "
                  f"{el:.0f}/{seconds:.0f} s", flush=True)
    el = time.perf_counter() - t0
    return ema, {"steps": step, "batch_size": batch, "seconds": round(el, 1),
                 "samples_per_s": round(step * batch / el, 1),
                 "final_loss": float(np.mean(losses[-100:])), "params": sum(p.numel() for p in unet.parameters())}


@torch.no_grad()
def sample_peer(unet, shape: tuple, labels: np.ndarray, num_classes: int, scheduler: str, steps: int, scale: float,
                clip: bool, batch: int, seed: int, eta: float = 0.0) -> tuple[torch.Tensor, float]:
    """CFG sampling with a diffusers scheduler loop: eps = eps(x, null) + scale * (eps(x, y) - eps(x, null))."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    base = DDPMScheduler(num_train_timesteps=1000, clip_sample=clip).config
    make = {"ddim": lambda: DDIMScheduler.from_config(base, clip_sample=clip),
            "dpmpp2m": lambda: DPMSolverMultistepScheduler.from_config(base, algorithm_type="dpmsolver++",
                                                                       solver_order=2)}[scheduler]
    out, t0 = [], time.perf_counter()
    for lo in range(0, len(labels), batch):
        y = torch.as_tensor(labels[lo:lo + batch])
        n = len(y)
        s = make()
        s.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed + lo)
        x = torch.randn((n, *shape), generator=g) * s.init_noise_sigma
        null = torch.full_like(y, num_classes)
        for t in s.timesteps:
            xin = s.scale_model_input(torch.cat([x, x]), t)
            e = unet(xin, t, class_labels=torch.cat([y, null])).sample
            e_c, e_u = e.chunk(2)
            kw = {"eta": eta, "generator": g} if scheduler == "ddim" else {}
            x = s.step(e_u + scale * (e_c - e_u), t, x, **kw).prev_sample
        out.append(x)
    return torch.cat(out), time.perf_counter() - t0


def our_grid_samples(run: Path, num: int) -> np.ndarray:
    """The first `num` samples of our evaluate stage's set, drawn again with the run's own evaluate params."""
    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.model_folders import load_diffusion_dir
    from pipeline.config import load_params

    ev = load_params(run / "params.yaml", sections=("evaluate",)).evaluate
    spec = SamplingSpec.from_setting(ev.model_dump())
    return generate(load_diffusion_dir(run / "models" / "diffusion"), num, spec, seed=ev.seed)["images"]


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    from diffusion_core.generation import to_uint8

    return to_uint8(x.clamp(-1, 1))


def _peer(unet, label: str, cache: Path, reuse: bool, train) -> tuple[torch.nn.Module, dict]:
    """The trained peer (its EMA weights): loaded from `cache` with --reuse, else trained and saved there."""
    from safetensors.torch import load_file, save_file

    weights, info_path = cache / f"{label}.safetensors", cache / f"{label}.json"
    if reuse and weights.is_file() and info_path.is_file():
        unet.load_state_dict(load_file(weights))
        print(f"{label} peer: weights from {weights} (trained earlier, not retrained)", flush=True)
        return unet.eval().requires_grad_(False), json.loads(info_path.read_text())
    ema, info = train()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    atomic_write_json(info_path, info)
    return ema, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="folder where the default `dvc repro` finished")
    ap.add_argument("--pixel-seconds", type=float, default=None,
                    help="pixel peer's training budget (default: our training stages' wall time from RUN/metrics)")
    ap.add_argument("--latent-seconds", type=float, default=900.0, help="latent peer's training budget (15 min)")
    ap.add_argument("--num", type=int, default=None, help="samples per model (default: as our evaluate stage)")
    ap.add_argument("--scales", type=float, nargs="+", default=None,
                    help="CFG scales the peers are sampled at (default: 2 and our evaluate scale)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="folder for the peers' trained weights (default: RUN/bench_peers)")
    ap.add_argument("--reuse", action="store_true", help="load peers trained earlier from --cache instead of training")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", choices=["pixel", "latent"], default=["pixel", "latent"])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DModel

    from diffusion_core.data import load_split, read_meta
    from diffusion_core.data.preview import save_image_grid
    from diffusion_core.evaluation import DOMAIN, load_reference, sample_metrics
    from diffusion_core.metrics.fidelity import domain_extractor
    from diffusion_core.model_folders import load_autoencoder_decoder

    run = args.run.resolve()
    cache = args.cache or run / "bench_peers"
    ours = json.loads((run / "reports" / "metrics.json").read_text())
    our_scale = float(yaml.safe_load((run / "params.yaml").read_text())["evaluate"]["scale"])
    scales = sorted(set(args.scales or [2.0, our_scale]), reverse=True)
    num = args.num or int(ours["num_samples"])
    stage_s = _stage_seconds(run)
    pixel_budget = args.pixel_seconds or sum(stage_s.values())
    meta = read_meta(run / "data" / "shards")
    k = int(meta["num_classes"])
    labels = np.arange(num) % k
    ref, extractor = (load_reference(run / "data" / "reference", DOMAIN),
                      domain_extractor(run / "models" / "feature_net"))
    previous = json.loads(OUT_JSON.read_text()) if OUT_JSON.exists() else {}
    res = {"machine": machine(), "run": str(run), "num_samples": num, "our_stage_seconds": stage_s,
           "our_scale": our_scale,
           "ours": {k2: ours[k2] for k2 in ("fd_domain", "kd_domain", "precision_domain", "recall_domain",
                                            "class_accuracy", "nfe") if k2 in ours},
           # a peer kind not rerun keeps its earlier figures (same sample count only)
           "peers": {n: p for n, p in previous.get("peers", {}).items()
                     if n.split("_")[0] not in args.only and p.get("num_samples", num) == num}}
    rows = {}

    def score(name: str, imgs: np.ndarray, extra: dict) -> None:
        m = sample_metrics(imgs, labels, ref, extractor)
        res["peers"][name] = {**{k2: v for k2, v in m.items() if v is not None}, **extra, "num_samples": num}
        if name.endswith(f"_s{our_scale:g}"):  # the grid shows every model at our scale
            rows[name] = imgs
        print(f"{name}: fd_domain {m['fd_domain']:.3f} class_accuracy {m['class_accuracy']:.3f}", flush=True)
        atomic_write_json(OUT_JSON, res)  # each score kept as soon as it is measured (a killed run loses no figure)

    if "pixel" in args.only:
        x, y = load_split(run / "data" / "shards", "train", meta=meta)
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=x.shape[-1], in_channels=x.shape[1], out_channels=x.shape[1],
                           num_class_embeds=k + 1, **PIXEL_UNET)
        print(f"pixel peer: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, {pixel_budget:.0f} s",
              flush=True)
        ema, info = _peer(unet, "pixel", cache, args.reuse,
                          lambda: train_peer(unet, x, y, k, pixel_budget, 64, "pixel"))
        for scale in scales:  # DDIM-50 eta 0 only: each 1,000-sample set at 28x28 takes minutes here
            imgs, secs = sample_peer(ema, tuple(x.shape[1:]), labels, k, "ddim", 50, scale, True, 250, 1_000_000)
            score(f"pixel_ddim50_eta0_s{scale:g}", _to_uint8(imgs),
                  {"train": info, "scale": scale, "sampling_seconds": round(secs, 1), "nfe": 100})
    if "latent" in args.only:
        lat_meta = read_meta(run / "data" / "latents")
        z, y = load_split(run / "data" / "latents", "train", meta=lat_meta)
        sf = float(lat_meta["scale_factor"])
        z = z * sf
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=z.shape[-1], in_channels=z.shape[1], out_channels=z.shape[1],
                           num_class_embeds=k + 1, **LATENT_UNET)
        print(f"latent peer: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
              f"{args.latent_seconds:.0f} s", flush=True)
        ema, info = _peer(unet, "latent", cache, args.reuse,
                          lambda: train_peer(unet, z, y, k, args.latent_seconds, 128, "latent"))
        decode = load_autoencoder_decoder(run / "models" / "autoencoder", sf)
        for scale in scales:
            for eta in (0.0, 1.0):
                zs, secs = sample_peer(ema, tuple(z.shape[1:]), labels, k, "ddim", 50, scale, False, 250, 1_000_000,
                                       eta)
                with torch.no_grad():
                    imgs = torch.cat([decode(zs[i:i + 250]) for i in range(0, len(zs), 250)])
                score(f"latent_ddim50_eta{eta:g}_s{scale:g}", _to_uint8(imgs),
                      {"train": info, "scale": scale, "sampling_seconds": round(secs, 1), "nfe": 100})

    # each peer at its best DDIM-50 (any eta, any scale tried): ours must have the lower fd_domain at equal N
    best = {}
    for n, p in res["peers"].items():
        if "_ddim50" in n:
            kind = n.split("_")[0]
            best[kind] = min(best.get(kind, math.inf), p["fd_domain"])
    res["peer_best_ddim50_fd_domain"] = best
    res["ours_beats_every_peer_on_fd_domain"] = bool(best) and all(ours["fd_domain"] < v for v in best.values())
    atomic_write_json(OUT_JSON, res)
    if rows:
        # one pair of rows per model, column j asks for class j (sample i asks for class i % k): ours first
        mine = our_grid_samples(run, 2 * k)
        grid = np.concatenate([mine, *[rows[n][:2 * k] for n in rows]])
        save_image_grid(grid, OUT_GRID, nrow=k, scale=2)
        print(f"wrote {OUT_JSON}, {OUT_GRID} (row pairs: ours, {', '.join(rows)})")
    table = [("model", "fd_domain", "kd_domain", "precision", "recall", "class_acc")]
    for name, m in [("ours (evaluate)", res["ours"]), *res["peers"].items()]:
        table.append((name, f"{m['fd_domain']:.3f}", f"{m['kd_domain']:.4f}", f"{m['precision_domain']:.3f}",
                      f"{m['recall_domain']:.3f}", f"{m.get('class_accuracy', math.nan):.3f}"))
    for r in table:
        print(f"{r[0]:<20}" + "".join(f"{c:>12}" for c in r[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
