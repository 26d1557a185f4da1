"""Classifiers: a time-conditioned p(y | x_t, t) for classifier guidance, and a clean-image CNN for domain FID."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditionEmbedding, group_norm, model_config
from .unet import UNetEncoder


class NoisyClassifier(nn.Module):
    """U-Net encoder half + GroupNorm/SiLU + global average pool + linear: (x_t [B,C,H,W], t [B]) -> logits [B,K]."""

    kind = "noisy_classifier"

    def __init__(self, in_channels: int, image_size: int, num_classes: int, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attention_resolutions: Sequence[int] = (), num_heads: int = 4, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, num_groups: int = 8, mid_attention: bool = True):
        super().__init__()
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        self.config = model_config(
            self.kind, in_channels=in_channels, image_size=image_size, num_classes=num_classes,
            base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, num_heads=num_heads, dropout=dropout,
            use_scale_shift_norm=use_scale_shift_norm, num_groups=num_groups, mid_attention=mid_attention)
        self.num_classes = num_classes
        emb_dim = 4 * base_channels
        self.embed = ConditionEmbedding(base_channels, emb_dim)
        self.encoder = UNetEncoder(in_channels, image_size, base_channels, channel_mult, num_res_blocks,
                                   attention_resolutions, num_heads, dropout, emb_dim, use_scale_shift_norm,
                                   num_groups, mid_attention)
        ch = self.encoder.out_channels
        self.norm = group_norm(ch, num_groups)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, _ = self.encoder(x_t, F.silu(self.embed(t, batch_size=x_t.shape[0])))
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))


class FeatureNet(nn.Module):
    """Plain CNN classifier of clean images in [-1,1]: x [B,C,H,W] -> logits [B,K]; features(x) -> [B,feature_dim]."""

    kind = "feature_net"

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32, feature_dim: int = 128,
                 num_groups: int = 8):
        super().__init__()
        self.config = model_config(self.kind, in_channels=in_channels, image_size=image_size,
                                   num_classes=num_classes, width=width, feature_dim=feature_dim,
                                   num_groups=num_groups)
        layers, ch = [], in_channels
        for i, out_ch in enumerate((width, 2 * width, 4 * width)):
            # stride 2 from the second stage on: 28 -> 28 -> 14 -> 7 (8 -> 8 -> 4 -> 2)
            layers += [nn.Conv2d(ch, out_ch, 3, stride=1 if i == 0 else 2, padding=1), group_norm(out_ch, num_groups),
                       nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1), group_norm(out_ch, num_groups), nn.SiLU()]
            ch = out_ch
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(ch, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B,feature_dim] (the head's input), used as the domain FID embedding."""
        return F.silu(self.fc(self.body(x).mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
