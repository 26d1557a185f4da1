"""Training: images/s and FLOP/s of one step (forward, loss, backward, AdamW) at batch 64, 28x28x1.

Ours: UNet through GaussianDiffusion.training_losses. Peer: diffusers UNet2DModel + DDPMScheduler.add_noise + MSE.
Each runs every setting (fp32 / bf16 autocast / channels_last, torch.compile with --compile); all are timed
round-robin and each contender is scored at its fastest setting.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .common import count_flops, interleaved, load
from .models import BASE_SETTINGS, IMAGE, Setting, diffusers_unet, diffusion, n_params, our_unet

BATCH = 64


def our_step(setting: Setting, seed: int = 0):
    """One training step of ours under `setting`; returns (step fn, model)."""
    d = diffusion()
    model = setting.model(our_unet(seed))
    net = torch.compile(model) if setting.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # one kernel, not ~10 ops per tensor
    gen = torch.Generator().manual_seed(seed)
    x0 = setting.input(torch.randn(BATCH, *IMAGE, generator=gen).clamp(-1, 1))

    def step():
        t = torch.randint(0, d.num_timesteps, (BATCH,), generator=gen)
        with setting.autocast():
            loss = d.training_losses(net, x0, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, model


def diffusers_step(setting: Setting, seed: int = 0):
    """One training step of diffusers' UNet2DModel with DDPMScheduler.add_noise and an MSE loss."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    model = setting.model(diffusers_unet(seed))
    net = torch.compile(model) if setting.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # one kernel, not ~10 ops per tensor
    gen = torch.Generator().manual_seed(seed)
    x0 = setting.input(torch.randn(BATCH, *IMAGE, generator=gen).clamp(-1, 1))

    def step():
        t = torch.randint(0, 1000, (BATCH,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = sched.add_noise(x0, noise, t)
        with setting.autocast():
            pred = net(x_t, t).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, model


def flops_per_step(make) -> int:
    step, _ = make(Setting())
    return count_flops(step)


def run(quick: bool = False, compile: bool = False, peak_bf16_gflops: float | None = None) -> dict:
    settings = list(BASE_SETTINGS)
    compile_info = None
    if compile:
        # bf16 with and without channels_last: the two fastest compiled settings seen here (2026-11-30: ours 139 and
        # 102 img/s, diffusers 95 and 134; fp32+channels_last+compile 98 / 80); ~75-130 s to compile each
        settings += [Setting(True, True, True), Setting(True, False, True)]
    fns, models = {}, {}
    flops = {"ours": flops_per_step(our_step), "diffusers": flops_per_step(diffusers_step)}
    for who, make in (("ours", our_step), ("diffusers", diffusers_step)):
        for s in settings:
            t0 = time.perf_counter()
            step, model = make(s)
            if s.compile:
                step()  # compiles forward and backward
                compile_info = dict(compile_info or {},
                                    **{f"{who}/{s.name}_compile_s": round(time.perf_counter() - t0, 1)})
            fns[f"{who}/{s.name}"] = step
            models[who] = model
    timed = interleaved(fns, repeats=3 if quick else 8, warmup=1 if quick else 2)
    out: dict = {"batch": BATCH, "image": list(IMAGE), "load_after": load(), "compile": compile_info,
                 "params": {"ours": n_params(models["ours"]), "diffusers": n_params(models["diffusers"])},
                 "gflop_per_image": {k: round(v / BATCH / 1e9, 4) for k, v in flops.items()},
                 "settings": {}}
    for name, t in timed.items():
        who = name.split("/")[0]
        out["settings"][name] = {"images_per_s": round(BATCH / t["median_s"], 2),
                                 "gflops": round(flops[who] / t["median_s"] / 1e9, 1), **t}
    for who in ("ours", "diffusers"):
        best = max((k for k in out["settings"] if k.startswith(who + "/")),
                   key=lambda k: out["settings"][k]["images_per_s"])
        out[f"{who}_best_setting"] = best.split("/", 1)[1]
        out[f"{who}_images_per_s"] = out["settings"][best]["images_per_s"]
        out[f"{who}_gflops"] = out["settings"][best]["gflops"]
    out["flop_ratio_ours_over_diffusers"] = round(flops["ours"] / flops["diffusers"], 4)
    return out
