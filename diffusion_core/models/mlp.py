"""Residual MLP denoiser for low-dimensional data (the 2-D Swiss roll)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditionEmbedding, model_config, zero_module


class MLPDenoiser(nn.Module):
    """model(x_t [B,dim], t [B], y [B] or None) -> [B, dim * (2 if learn_sigma else 1)].

    Each residual layer sees h + emb, emb = time embedding (+ class embedding; index num_classes is the null class).
    """

    kind = "mlp"

    def __init__(self, dim: int = 2, hidden: int = 128, num_layers: int = 3, num_classes: int | None = None,
                 learn_sigma: bool = False):
        super().__init__()
        self.config = model_config(self.kind, dim=dim, hidden=hidden, num_layers=num_layers,
                                   num_classes=num_classes, learn_sigma=learn_sigma)
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.embed = ConditionEmbedding(hidden, hidden, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        self.out = zero_module(nn.Linear(hidden, dim * (2 if learn_sigma else 1)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(t, y, x_t.shape[0])
        h = self.inp(x_t)
        for layer in self.layers:
            h = h + layer(F.silu(h + emb))
        return self.out(F.silu(h))
