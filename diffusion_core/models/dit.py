"""Diffusion transformer (DiT; Peebles & Xie 2023): a denoiser over patches with adaLN-Zero conditioning.

x_t [B, C, H, W] is cut into (H/p)(W/p) patches of p x p, each a token (linear embedding + fixed 2-D sin-cos
positions); `depth` transformer blocks read the condition c = embed(t, y) (+ the guidance scale's embedding)
through adaptive LayerNorm: each block regresses shift, scale and a gate for its attention and MLP branches from
c, the gates initialised to zero so every block starts as the identity (adaLN-Zero, their sec. 3.2). A final
adaptive LayerNorm and a zero-initialised linear layer map tokens back to patches. Same call and conditioning as
the U-Net: model(x_t, t, y=None, w=None), null class num_classes, learned-range variances with learn_sigma.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditionEmbedding, GuidanceEmbedding, condition_embedding, model_config, zero_module


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid * grid, dim] (MAE / DiT): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(yy), axis(xx)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by c and whose branches are gated by it."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(mlp, hidden))
        self.ada = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(hidden, 6 * hidden)))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(h.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Denoiser model(x_t [B,C,H,W], t [B], y [B] or None, w [B] with guidance_input) -> [B,C_out,H,W] (module doc).

    `image_size` must be a multiple of `patch_size`; tokens = (image_size / patch_size)^2.
    """

    kind = "dit"

    def __init__(self, in_channels: int = 4, out_channels: int | None = None, image_size: int = 8,
                 patch_size: int = 2, hidden_size: int = 256, depth: int = 6, num_heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, num_classes: int | None = None,
                 learn_sigma: bool = False, guidance_input: bool = False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        out_channels = in_channels if out_channels is None else out_channels
        self.config = model_config(
            self.kind, in_channels=in_channels, out_channels=out_channels, image_size=image_size,
            patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            dropout=dropout, num_classes=num_classes, learn_sigma=learn_sigma,
            **({"guidance_input": True} if guidance_input else {}))
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.out_ch = out_channels * (2 if learn_sigma else 1)
        self.grid = image_size // patch_size
        self.patch = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_positions(self.grid, hidden_size)[None], persistent=False)
        self.embed = ConditionEmbedding(hidden_size, hidden_size, num_classes)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(hidden_size, 2 * hidden_size)))
        self.out = zero_module(nn.Linear(hidden_size, patch_size * patch_size * self.out_ch))
        # built last, as in the U-Net: the other layers draw the same initial weights as without guidance_input
        self.guidance_embed = GuidanceEmbedding(hidden_size, hidden_size) if guidance_input else None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        b = x_t.shape[0]
        c = condition_embedding(self.embed, self.guidance_embed, t, y, w, b)
        h = self.patch(x_t).flatten(2).transpose(1, 2) + self.pos  # [B, tokens, hidden]
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=1)
        h = self.out(modulate(self.norm_out(h), shift, scale))  # [B, tokens, p * p * out]
        p, g = self.patch_size, self.grid
        h = h.reshape(b, g, g, p, p, self.out_ch).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, self.out_ch, g * p, g * p)
