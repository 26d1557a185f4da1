"""ADM-style U-Net denoiser (Ho et al. 2020; Dhariwal & Nichol 2021) and its encoder/decoder halves."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    AttentionBlock,
    ConditionEmbedding,
    Downsample,
    EmbedSequential,
    GuidanceEmbedding,
    ResBlock,
    Upsample,
    condition_embedding,
    group_norm,
    model_config,
    zero_module,
)


def middle_block(ch: int, emb_dim: int | None, dropout: float, use_scale_shift_norm: bool, num_groups: int,
                 num_heads: int, attention: bool = True) -> EmbedSequential:
    """ResBlock -> self-attention -> ResBlock at the lowest resolution."""
    def res():
        return ResBlock(ch, ch, emb_dim, dropout, use_scale_shift_norm, num_groups)
    return EmbedSequential(res(), AttentionBlock(ch, num_heads, num_groups), res()) if attention \
        else EmbedSequential(res(), res())


class UNetEncoder(nn.Module):
    """conv_in + down levels + middle block: x [B,Cin,H,W] -> (h [B,C,h,w], skips list of feature maps)."""

    def __init__(self, in_channels: int, image_size: int, base_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, attention_resolutions: Sequence[int] = (), num_heads: int = 4,
                 dropout: float = 0.0, emb_dim: int | None = None, use_scale_shift_norm: bool = True,
                 num_groups: int = 8, mid_attention: bool = True):
        super().__init__()
        kw = dict(emb_dim=emb_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, num_groups=num_groups)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        ch, res = base_channels, image_size
        self.skip_channels, self.level_resolutions, blocks = [ch], [], []
        for level, mult in enumerate(channel_mult):
            self.level_resolutions.append(res)
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mult * base_channels, **kw)]
                ch = mult * base_channels
                if res in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads, num_groups))
                blocks.append(EmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                blocks.append(EmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                res = (res + 1) // 2  # stride-2 conv with padding 1 rounds up (7 -> 4)
        self.down = nn.ModuleList(blocks)
        self.mid = middle_block(ch, emb_dim, dropout, use_scale_shift_norm, num_groups, num_heads, mid_attention)
        self.out_channels = ch

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        return self.mid(h, emb), skips


class UNetDecoder(nn.Module):
    """Up levels (concatenating encoder skips when skip_channels is given) + GroupNorm/SiLU/conv_out head.

    h [B,C,h,w] -> [B,out_channels,H,W]; with skips, each Upsample targets the next skip's size so odd sizes match.
    """

    def __init__(self, in_ch: int, out_channels: int, base_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, level_resolutions: Sequence[int] = (), attention_resolutions: Sequence[int] = (),
                 num_heads: int = 4, dropout: float = 0.0, emb_dim: int | None = None,
                 use_scale_shift_norm: bool = True, num_groups: int = 8, skip_channels: Sequence[int] | None = None,
                 zero_out: bool = True):
        super().__init__()
        kw = dict(emb_dim=emb_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm, num_groups=num_groups)
        self.use_skips = skip_channels is not None
        skips, ch, blocks = list(skip_channels or []), in_ch, []
        for level in reversed(range(len(channel_mult))):
            out_ch = channel_mult[level] * base_channels
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + (skips.pop() if self.use_skips else 0), out_ch, **kw)]
                ch = out_ch
                if level < len(level_resolutions) and level_resolutions[level] in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads, num_groups))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                blocks.append(EmbedSequential(*layers))
        self.up = nn.ModuleList(blocks)
        conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.out = nn.Sequential(group_norm(ch, num_groups), nn.SiLU(), zero_module(conv_out) if zero_out else conv_out)

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None,
                skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        skips = list(skips or [])
        for block in self.up:
            if self.use_skips:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, skips[-1].shape[-2:] if skips else None)
        return self.out(h)


class UNet(nn.Module):
    """Denoiser model(x_t [B,C,H,W], t [B] original timestep indices, y [B] labels or None) -> [B,C_out,H,W].

    Class-conditional models embed num_classes + 1 classes; index num_classes (or y=None) is the null class used
    by classifier-free guidance. Output channels are doubled with learn_sigma (Improved DDPM's learned range).
    With guidance_input, forward takes a guidance scale w [B] whose embedding is added to the time embedding (a
    distilled student's input, see distillation.py).
    """

    kind = "unet"

    def __init__(self, in_channels: int = 1, out_channels: int | None = None, image_size: int = 28,
                 base_channels: int = 32, channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attention_resolutions: Sequence[int] = (7,), num_heads: int = 4, dropout: float = 0.0,
                 num_classes: int | None = None, learn_sigma: bool = False, use_scale_shift_norm: bool = True,
                 num_groups: int = 8, mid_attention: bool = True, guidance_input: bool = False):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        self.config = model_config(
            self.kind, in_channels=in_channels, out_channels=out_channels, image_size=image_size,
            base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, num_heads=num_heads, dropout=dropout,
            num_classes=num_classes, learn_sigma=learn_sigma, use_scale_shift_norm=use_scale_shift_norm,
            num_groups=num_groups, mid_attention=mid_attention,
            **({"guidance_input": True} if guidance_input else {}))  # only when set: existing configs unchanged
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.in_channels, self.image_size = in_channels, image_size
        emb_dim = 4 * base_channels
        self.embed = ConditionEmbedding(base_channels, emb_dim, num_classes)
        kw = dict(num_heads=num_heads, dropout=dropout, emb_dim=emb_dim, use_scale_shift_norm=use_scale_shift_norm,
                  num_groups=num_groups)
        self.encoder = UNetEncoder(in_channels, image_size, base_channels, channel_mult, num_res_blocks,
                                   attention_resolutions, mid_attention=mid_attention, **kw)
        self.decoder = UNetDecoder(self.encoder.out_channels, out_channels * (2 if learn_sigma else 1), base_channels,
                                   channel_mult, num_res_blocks, self.encoder.level_resolutions, attention_resolutions,
                                   skip_channels=self.encoder.skip_channels, **kw)
        # built last: the other layers draw the same initial weights as without guidance_input
        self.guidance_embed = GuidanceEmbedding(base_channels, emb_dim) if guidance_input else None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        emb = condition_embedding(self.embed, self.guidance_embed, t, y, w, x_t.shape[0])
        emb = F.silu(emb)  # SiLU once here instead of in every ResBlock
        h, skips = self.encoder(x_t, emb)
        return self.decoder(h, emb, skips)
