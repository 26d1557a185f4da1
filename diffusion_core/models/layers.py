"""Shared building blocks: time and guidance-scale embeddings, ResBlock, attention, down/upsampling, config helper."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def model_config(kind: str, **kwargs: Any) -> dict:
    """JSON-ready constructor kwargs plus "kind"; tuples become lists so the dict equals its JSON round trip."""
    return {"kind": kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch (or the network output) starts as the identity (zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that takes the contiguous-layout kernel for a channels_last input on CPU.

    PyTorch's CPU kernel for channels_last GroupNorm is far slower than its contiguous one; copying the input to
    contiguous and the output back costs less (bench/README.md). Same parameters and state_dict as nn.GroupNorm;
    other devices and layouts run the plain kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last)):
            y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
            return y.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, num_groups: int) -> GroupNorm:
    """GroupNorm with the largest group count <= num_groups that divides `channels`."""
    return GroupNorm(math.gcd(num_groups, channels), channels, eps=1e-6)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (float32) of timesteps t [B] (int or float), Vaswani et al. 2017 / DDPM."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ConditionEmbedding(nn.Module):
    """(t [B], y [B] or None) -> [B, emb_dim]: MLP(sinusoid(t)) + class embedding (row num_classes = null class)."""

    def __init__(self, freq_dim: int, emb_dim: int, num_classes: int | None = None):
        super().__init__()
        self.freq_dim, self.num_classes = freq_dim, num_classes
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = None if num_classes is None else nn.Embedding(num_classes + 1, emb_dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
        batch_size = batch_size or t.shape[0]
        if t.ndim == 0:  # one timestep for the whole batch
            t = t.expand(batch_size)
        emb = self.mlp(timestep_embedding(t, self.freq_dim))
        if self.class_embed is not None:
            if y is None:  # unconditional call of a conditional model = the null class
                y = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=emb.device)
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError("class labels y were given to an unconditional model (num_classes=None)")
        return emb


class GuidanceEmbedding(nn.Module):
    """w [B] (a guidance scale) -> [B, emb_dim]: MLP(sinusoid(w)) with a zero last layer (Meng et al. 2023, sec. 4).

    Added to the time embedding, it starts at exactly zero, so a student built from a teacher's weights (only these
    keys missing) outputs the teacher's values until training moves it.
    """

    def __init__(self, freq_dim: int, emb_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, emb_dim), nn.SiLU(), zero_module(nn.Linear(emb_dim, emb_dim)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(w, self.freq_dim))


def condition_embedding(embed: ConditionEmbedding, guidance: GuidanceEmbedding | None, t: torch.Tensor,
                        y: torch.Tensor | None, w: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """embed(t, y) + guidance(w): a guidance_input model needs w [B]; any other refuses one."""
    emb = embed(t, y, batch_size)
    if guidance is None:
        if w is not None:
            raise ValueError("a guidance scale w was given to a model built without guidance_input")
        return emb
    if w is None:
        raise ValueError("a model built with guidance_input needs the guidance scale w [B]")
    w = torch.as_tensor(w, device=emb.device)
    return emb + guidance(w.expand(batch_size) if w.ndim == 0 else w)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block [B,Cin,H,W] -> [B,Cout,H,W], optionally conditioned on emb [B,E].

    `emb` must already be SiLU-activated (the owner computes SiLU(emb) once for all blocks).
    With use_scale_shift_norm the embedding modulates the second norm as h*(1+scale)+shift (ADM, Dhariwal & Nichol).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None = None, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, num_groups: int = 8):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = None if emb_dim is None else nn.Linear(emb_dim, out_ch * (2 if use_scale_shift_norm else 1))
        self.norm2 = group_norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))  # block starts as the identity
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb_proj is None:
            h = self.norm2(h)
        else:
            e = self.emb_proj(emb)[:, :, None, None]
            if self.use_scale_shift_norm:
                scale, shift = e.chunk(2, dim=1)
                h = torch.addcmul(shift, self.norm2(h), scale + 1)
            else:
                h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of [B,C,H,W], residual, via F.scaled_dot_product_attention."""

    def __init__(self, channels: int, num_heads: int = 4, num_groups: int = 8):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        # [B,C,H,W] -> tokens [B,HW,C]; a free view when x is channels_last
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).view(b, hgt * wid, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B,heads,HW,d]
        out = self.proj(out.transpose(1, 2).reshape(b, hgt * wid, c))
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class Downsample(nn.Module):
    """Stride-2 3x3 conv: [B,C,H,W] -> [B,C,ceil(H/2),ceil(W/2)]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to `size` (default 2x) then 3x3 conv; an explicit size undoes odd downsampling (7->4->7)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Runs its layers in order, giving ResBlocks the embedding and Upsample its target size."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x
