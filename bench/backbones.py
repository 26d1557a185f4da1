"""train_diffusion's two backbones side by side: the U-Net and the DiT of params.yaml on the default latents.

One training step each through the library's Trainer (the stage's step: L_simple, AdamW, clipping, EMA) at
batch 64 on 4x8x8 latents with 10 classes, fp32 and bf16 autocast, timed round-robin with a 2048^3 bf16 matmul
(the peak) in the same run: images/s, counted GFLOP per image, achieved GFLOP/s and its fraction of the peak.
The DiT is matmul-bound where the small U-Net is convolution-bound; equal FLOPs per image are checked here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import count_flops, interleaved, load

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
LATENT = (4, 8, 8)
BATCH = 64
PEAK_N = 2048


def _trainer(backbone: str, bf16: bool):
    """params.yaml's train_diffusion with `backbone`, in-process, on fixed random latents."""
    from diffusion_core.builders import build_denoiser
    from diffusion_core.model_folders import build_diffusion
    from diffusion_core.objectives import DiffusionObjective
    from diffusion_core.training import Trainer
    from pipeline.config import merged, read_yaml, validate_params

    over = {"train_diffusion": {"backbone": backbone, "bf16": bf16, "batch_size": BATCH,
                                "scaling": {"num_workers": 1, "use_ray": False}}}
    cfg = validate_params(merged(read_yaml(PARAMS), over), ["train_diffusion"]).train_diffusion
    diff = build_diffusion({"schedule": "cosine", "num_timesteps": 1000, "parameterization": "v",
                            "variance": "fixed_small"})
    torch.manual_seed(0)
    model = build_denoiser(cfg.net_options(), LATENT, 10, False)
    tr = Trainer(model, DiffusionObjective(diff, 10, cfg.label_dropout), "uniform", cfg.train_options())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, *LATENT, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    return (lambda: tr.train_step(x, y)), model


def run(quick: bool = False) -> dict:
    a, b = torch.randn(PEAK_N, PEAK_N).bfloat16(), torch.randn(PEAK_N, PEAK_N).bfloat16()
    fns, flops, params = {"peak_bf16_matmul": lambda: torch.mm(a, b)}, {}, {}
    for backbone in ("unet", "dit"):
        step, model = _trainer(backbone, bf16=False)
        flops[backbone] = count_flops(step)  # fwd + bwd of the network, one step
        params[backbone] = sum(p.numel() for p in model.parameters())
        for bf16 in (False, True):
            fns[f"{backbone}/{'bf16' if bf16 else 'fp32'}"] = _trainer(backbone, bf16)[0] if bf16 else step
    timed = interleaved(fns, repeats=3 if quick else 8, warmup=1 if quick else 2)
    peak = 2 * PEAK_N ** 3 / timed.pop("peak_bf16_matmul")["min_s"] / 1e9
    out: dict = {"batch": BATCH, "latent": list(LATENT), "threads": torch.get_num_threads(), "load_after": load(),
                 "peak_bf16_gflops": round(peak, 1), "params": params,
                 "gflop_per_image": {k: round(v / BATCH / 1e9, 4) for k, v in flops.items()}, "settings": {}}
    for name, t in timed.items():
        backbone = name.split("/")[0]
        gflops = flops[backbone] / t["median_s"] / 1e9
        out["settings"][name] = {"images_per_s": round(BATCH / t["median_s"], 1), "gflops": round(gflops, 1),
                                 "fraction_of_bf16_peak": round(gflops / peak, 4), **t}
    for backbone in ("unet", "dit"):
        best = max((k for k in out["settings"] if k.startswith(backbone + "/")),
                   key=lambda k: out["settings"][k]["images_per_s"])
        out[f"{backbone}_best"] = {"setting": best.split("/", 1)[1], **{
            k: out["settings"][best][k] for k in ("images_per_s", "gflops", "fraction_of_bf16_peak")}}
    out["flop_ratio_dit_over_unet"] = round(flops["dit"] / flops["unet"], 3)
    out["images_per_s_ratio_dit_over_unet"] = round(out["dit_best"]["images_per_s"] / out["unet_best"]["images_per_s"],
                                                    3)
    return out


if __name__ == "__main__":
    import json

    torch.set_num_threads(1)
    print(json.dumps(run(), indent=1))
