"""Sampling: images/s of DDIM-50 and DPM-Solver++(2M)-20 at batch 256, ours against diffusers' UNet2DModel with
DDIMScheduler / DPMSolverMultistepScheduler, and our sampler's overhead (time outside network calls / total).

Each model runs at the setting (fp32 / bf16 autocast / channels_last) whose forward pass at batch 256 is fastest.
"""

from __future__ import annotations

import time

import torch

from diffusion_core.generation import FastDenoiser
from diffusion_core.samplers import SamplingSpec, sample

from .common import interleaved, load
from .models import BASE_SETTINGS, IMAGE, Setting, diffusers_unet, diffusion, our_unet

BATCH = 256
RUNS = {"ddim50": ("ddim", 50), "dpmpp20": ("dpmpp2m", 20)}
# torch.compile: bf16 + channels_last was the fastest compiled forward for both models here (2026-11-30, b256:
# ours 941 img/s, diffusers 694; bf16 without channels_last 589 / 561); ~40 s to compile each on 2 cores
SETTINGS = [*BASE_SETTINGS, Setting(True, True, True)]


class TimedModel:
    """model(x, t[, y]) under a setting, returning float32 contiguous output; accumulates seconds spent inside.

    Ours runs through the library's FastDenoiser (what `generate(bf16=..., channels_last=...)` uses); the peer
    gets the same treatment by hand. With setting.compile the whole wrapped call is torch.compile'd.
    """

    def __init__(self, model, setting: Setting, diffusers: bool = False):
        self.setting, self.diffusers = setting, diffusers
        if diffusers:
            net = setting.model(model.eval())

            def fwd(x, t, y=None):
                with setting.autocast():
                    return net(setting.input(x), t).sample.float().contiguous()
        else:
            fwd = FastDenoiser(model.eval(), bf16=setting.bf16, channels_last=setting.channels_last)
        self.fwd = torch.compile(fwd) if setting.compile else fwd
        self.seconds, self.calls = 0.0, 0

    def __call__(self, x, t, y=None):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.fwd(x, t, y)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def our_sampler(name: str, net: TimedModel, steps: int | None = None):
    sampler, steps = RUNS[name][0], steps or RUNS[name][1]
    d = diffusion()

    def run():
        return sample(d, net, (BATCH, *IMAGE), SamplingSpec(sampler, steps=steps, spacing="trailing"),
                      generator=torch.Generator().manual_seed(0), device="cpu")
    return run


def diffusers_sampler(name: str, net: TimedModel, steps: int | None = None):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    kw = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing")
    if name == "ddim50":
        sched = DDIMScheduler(clip_sample=True, set_alpha_to_one=True, **kw)
    else:
        sched = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lambda_min_clipped=-5.1,
                                            **kw)
    steps = steps or RUNS[name][1]

    @torch.no_grad()
    def run():
        sched.set_timesteps(steps)
        x = torch.randn(BATCH, *IMAGE, generator=torch.Generator().manual_seed(0))
        for t in sched.timesteps:
            x = sched.step(net(x, t), t, x).prev_sample
        return x
    return run


def pick_settings(quick: bool) -> dict:
    """Fastest forward-pass setting at batch 256 for each model, timed round-robin."""
    x = torch.randn(BATCH, *IMAGE)
    t = torch.full((BATCH,), 500, dtype=torch.long)
    fns, compile_s, models = {}, {}, {}
    for s in SETTINGS:
        for who, make in (("ours", lambda: TimedModel(our_unet(), s)),
                          ("diffusers", lambda: TimedModel(diffusers_unet(), s, diffusers=True))):
            t0 = time.perf_counter()
            m = make()
            if s.compile:
                m(x, t)  # compiles
                compile_s[f"{who}/{s.name}"] = round(time.perf_counter() - t0, 1)
            fns[f"{who}/{s.name}"] = lambda m=m: m(x, t)
            models[f"{who}/{s.name}"] = m
    timed = interleaved(fns, repeats=2 if quick else 5, warmup=1)
    forward = {k: {"images_per_s": round(BATCH / v["median_s"], 1), **v} for k, v in timed.items()}
    best = {}
    for who in ("ours", "diffusers"):
        k = max((k for k in forward if k.startswith(who + "/")), key=lambda k: forward[k]["images_per_s"])
        best[who] = next(s for s in SETTINGS if s.name == k.split("/", 1)[1])
    return {"forward_b256": forward, "best": best, "compile_s": compile_s,
            "models": {who: models[f"{who}/{s.name}"] for who, s in best.items()}}


def run(quick: bool = False) -> dict:
    picked = pick_settings(quick)
    best = picked["best"]
    nets = picked["models"]
    out: dict = {"batch": BATCH, "settings": {k: v.name for k, v in best.items()},
                 "forward_b256": picked["forward_b256"], "compile_s": picked["compile_s"]}
    for name in RUNS:
        fns = {"ours": our_sampler(name, nets["ours"]), "diffusers": diffusers_sampler(name, nets["diffusers"])}
        our_sampler(name, nets["ours"], steps=2)()  # the loop's own call pattern: a compiled model may
        diffusers_sampler(name, nets["diffusers"], steps=2)()  # recompile for it (a 0-d t), not while timed
        net_s = {k: [] for k in fns}

        def timed(who):
            def f():
                nets[who].reset()
                fns[who]()
                net_s[who].append((nets[who].seconds, nets[who].calls))
            return f
        t = interleaved({k: timed(k) for k in fns}, repeats=1 if quick else 3, warmup=0)
        res = {}
        for who, v in t.items():
            totals = v["times_s"]
            fracs = [(tot - ns) / tot for tot, (ns, _) in zip(totals, net_s[who])]
            res[who] = {"images_per_s": round(BATCH / v["median_s"], 2), "nfe": net_s[who][-1][1],
                        "overhead_fraction": round(sorted(fracs)[len(fracs) // 2], 5), **v}
        res["speedup"] = round(res["ours"]["images_per_s"] / res["diffusers"]["images_per_s"], 3)
        out[name] = res
    out["load_after"] = load()
    return out
