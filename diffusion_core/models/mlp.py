"""Residual MLP denoiser for low-dimensional data (the 2-D Swiss roll)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditionEmbedding, GuidanceEmbedding, condition_embedding, model_config, zero_module


class MLPDenoiser(nn.Module):
    """model(x_t [B,dim], t [B], y [B] or None[, w [B]]) -> [B, dim * (2 if learn_sigma else 1)].

    Each residual layer sees h + emb, emb = time embedding (+ class embedding; index num_classes is the null class)
    (+ with guidance_input, an embedding of the guidance scale w: a distilled student's input, see distillation.py).
    """

    kind = "mlp"

    def __init__(self, dim: int = 2, hidden: int = 128, num_layers: int = 3, num_classes: int | None = None,
                 learn_sigma: bool = False, guidance_input: bool = False):
        super().__init__()
        # guidance_input joins the config only when set, so existing models' configs (and checkpoints) are unchanged
        self.config = model_config(self.kind, dim=dim, hidden=hidden, num_layers=num_layers,
                                   num_classes=num_classes, learn_sigma=learn_sigma,
                                   **({"guidance_input": True} if guidance_input else {}))
        self.num_classes, self.learn_sigma = num_classes, learn_sigma
        self.embed = ConditionEmbedding(hidden, hidden, num_classes)
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        self.out = zero_module(nn.Linear(hidden, dim * (2 if learn_sigma else 1)))
        # built last: the other layers draw the same initial weights as without guidance_input
        self.guidance_embed = GuidanceEmbedding(hidden, hidden) if guidance_input else None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        emb = condition_embedding(self.embed, self.guidance_embed, t, y, w, x_t.shape[0])
        h = self.inp(x_t)
        for layer in self.layers:
            h = h + layer(F.silu(h + emb))
        return self.out(F.silu(h))
