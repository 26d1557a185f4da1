"""Exponential moving average of a model's parameters (buffers are copied, not averaged)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after each update; `.module` is the averaged model (eval mode)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(model parameters, shadow parameters), checked to match one to one."""
        params = [p.detach() for p in unwrap_model(model).parameters()]
        shadow = [p.detach() for p in self.module.parameters()]
        if len(params) != len(shadow) or any(a.shape != b.shape for a, b in zip(params, shadow)):
            raise ValueError("EMA got a model whose parameters do not match the EMA copy")
        return params, shadow

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from `model`'s current parameters; buffers (e.g. norm statistics) are copied as-is."""
        params, shadow = self._pairs(model)
        # lerp(shadow, p, 1-d) = d*shadow + (1-d)*p; one fused multi-tensor kernel instead of a Python loop
        torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), unwrap_model(model).buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the EMA parameters and buffers into `model`."""
        params, shadow = self._pairs(model)
        torch._foreach_copy_(params, shadow)
        for b_ema, b in zip(self.module.buffers(), unwrap_model(model).buffers()):
            b.copy_(b_ema)

    def to(self, *args, **kwargs) -> "EMA":
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, Any]:
        """{"decay", "num_updates", "shadow": module state dict}; loadable with torch.load(weights_only=True)."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["shadow"])
