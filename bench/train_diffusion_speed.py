"""Training throughput of train_diffusion's U-Net on random data: `python -m bench.train_diffusion_speed`.

Prints samples/s per configuration for one worker thread count (what one Ray CPU worker gets).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffusion_core.builders import build_denoiser
from diffusion_core.model_folders import build_diffusion
from diffusion_core.objectives import DiffusionObjective
from diffusion_core.training import Trainer
from pipeline.config import merged, read_yaml, validate_params

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def measure(shape, unet: dict, batch: int, steps: int, bf16: bool = False, channels_last: bool = False) -> float:
    """params.yaml's train_diffusion with this U-Net, batch and precision, in-process."""
    over = {"train_diffusion": {"batch_size": batch, "bf16": bf16, "channels_last": channels_last, "unet": unet,
                                "scaling": {"num_workers": 1, "use_ray": False}}}
    cfg = validate_params(merged(read_yaml(PARAMS), over), ["train_diffusion"]).train_diffusion
    diff = build_diffusion({"schedule": "cosine", "num_timesteps": 1000, "parameterization": "eps",
                            "variance": "fixed_small"})
    torch.manual_seed(0)
    model = build_denoiser(cfg.unet.to_options(), shape, 10, False)
    tr = Trainer(model, DiffusionObjective(diff, 10, cfg.label_dropout), "uniform", cfg.train_options())
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    tr.train_step(x, y)  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step(x, y)
    return batch * steps / (time.perf_counter() - t0), sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--default-only", action="store_true",
                    help="only params.yaml's U-Net, in all four settings (fp32/bf16 x channels_last)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    latent = (4, 8, 8)
    nets = [(64, (1, 2), 2, (4,))] if args.default_only else [(32, (1, 2), 2, (4,)), (64, (1, 2), 2, (4,)),
                                                              (64, (1, 2, 2), 2, (4,)), (96, (1, 2, 2), 2, (4,))]
    for base, mult, nres, attn in nets:
        unet = {"base_channels": base, "channel_mult": list(mult), "num_res_blocks": nres,
                "attention_resolutions": list(attn), "dropout": 0.1}
        for bf16 in (False, True):
            for cl in (False, True) if args.default_only else (False,):
                sps, n = measure(latent, unet, args.batch, args.steps, bf16=bf16, channels_last=cl)
                print(f"latent {latent} base {base} mult {mult} res {nres} attn {attn} bf16 {bf16} channels_last "
                      f"{cl}: {n / 1e6:.2f}M params, {sps:.0f} samples/s/worker ({args.threads} thread)", flush=True)


if __name__ == "__main__":
    main()
