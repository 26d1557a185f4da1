"""A family of distilled students: one denoiser per step count, in one model folder (distillation.py trains them).

Progressive distillation ends each round with a student that samples well at its own step count only (8, then 4,
then 2, then 1 step); the family keeps every round's student so that `diffusion sample --model models/student
--steps 4` and `--steps 1` read one folder. `member(steps)` is the denoiser of that many steps.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import model_config
from .registry import build_model


class StudentFamily(nn.Module):
    """Denoisers of the same architecture (`net`: a model config) keyed by the step count each was distilled for."""

    kind = "student_family"

    def __init__(self, net: dict, steps: Sequence[int]):
        super().__init__()
        steps = [int(s) for s in steps]
        if not steps or len(set(steps)) != len(steps) or min(steps) < 1:
            raise ValueError(f"a student family needs distinct step counts >= 1, got {steps}")
        self.config = model_config(self.kind, net=dict(net), steps=steps)
        self.steps = tuple(steps)
        self.members = nn.ModuleDict({str(s): build_model(dict(net)) for s in steps})

    def member(self, steps: int) -> nn.Module:
        if int(steps) not in self.steps:
            raise ValueError(f"this student family samples with {', '.join(map(str, self.steps))} steps, not "
                             f"{steps}: choose one of those")
        return self.members[str(int(steps))]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                w: torch.Tensor | None = None) -> torch.Tensor:
        """The fewest-step member (each member is a denoiser of its own step count: prefer `member(steps)`)."""
        return self.member(min(self.steps))(x_t, t, y, w)
