"""The two contenders at equal FLOPs per image: our UNet (library defaults) and diffusers' UNet2DModel.

Ours: base 32, channel_mult (1,2,2), one ResBlock per level, attention at 7x7 + middle block (1.19M params).
Peer: UNet2DModel block_out_channels (32,64,64), layers_per_block 1, attention at the 7x7 level + middle
block, 8 groups (1.11M params). Both count ~1.13 GFLOP per image per training step (checked in train.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.models.unet import UNet
from diffusion_core.schedules import NoiseSchedule

IMAGE = (1, 28, 28)
OUR_CONFIG = dict(in_channels=1, image_size=28, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(7,), num_heads=4)
DIFFUSERS_CONFIG = dict(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                        layers_per_block=1, norm_num_groups=8, attention_head_dim=16,
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


@dataclass(frozen=True)
class Setting:
    """One way of running a model: bf16 autocast, channels_last memory format, torch.compile."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        parts = ["bf16" if self.bf16 else "fp32"]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compile")
        return "+".join(parts)

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def model(self, m: torch.nn.Module) -> torch.nn.Module:
        return m.to(memory_format=torch.channels_last) if self.channels_last else m


BASE_SETTINGS = [Setting(False, False), Setting(True, False), Setting(False, True), Setting(True, True)]


def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))


def our_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(**OUR_CONFIG)


def diffusers_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**DIFFUSERS_CONFIG)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
