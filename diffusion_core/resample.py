"""Timestep samplers for training: uniform and loss-aware importance sampling (Improved DDPM, sec. 3.3).

`sample` returns timesteps and importance weights 1 / (T p_t), so that E[w_t L_t] is the uniform-t loss.
"""

from __future__ import annotations

import torch

TIMESTEP_SAMPLERS = ("uniform", "loss_aware")


class UniformSampler:
    """t ~ U{0..T-1}, weights 1."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def probs(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: torch.Generator | None = None, device="cpu"):
        """(t [B] int64, weights [B] float32)."""
        p = self.probs()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), w.float().to(device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling ignores losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last `history` losses per t, mixed with `uniform_prob` uniform.

    Uniform until every t has `history` losses recorded (improved-diffusion's LossSecondMomentResampler).
    In DDP, gather (t, loss) from all ranks before `update` so every rank keeps the same history.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_len = history
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history_len).all())

    def probs(self) -> torch.Tensor:
        if not self.warmed_up():
            return super().probs()
        w = self.history.pow(2).mean(1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses at their timesteps (a ring buffer of the newest `history` per t)."""
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            c = int(self.counts[ti])
            if c < self.history_len:
                self.history[ti, c] = li
            else:
                self.history[ti] = torch.roll(self.history[ti], -1)
                self.history[ti, -1] = li
            self.counts[ti] = c + 1

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].to(torch.float64).clone()
        self.counts = state["counts"].to(torch.int64).clone()
        self.history_len = self.history.shape[1]


class ObjectiveSampler(UniformSampler):
    """t ~ probs with weights 1: a timestep distribution that is part of the objective (EDM's log-normal)."""

    def __init__(self, probs: torch.Tensor):
        super().__init__(probs.numel())
        self._probs = (probs / probs.sum()).to(torch.float64)

    def probs(self) -> torch.Tensor:
        return self._probs

    def sample(self, batch_size: int, generator: torch.Generator | None = None, device="cpu"):
        t = torch.multinomial(self._probs, batch_size, replacement=True, generator=generator)
        return t.to(device), torch.ones(batch_size, device=device)


def make_timestep_sampler(name: str, num_timesteps: int, objective_probs: torch.Tensor | None = None) -> UniformSampler:
    """Build `uniform` or `loss_aware`; `objective_probs` (a formulation's own distribution) replaces uniform."""
    if objective_probs is not None:
        if name != "uniform":
            raise ValueError(f"timestep_sampler {name!r} cannot be combined with a parameterization that brings its "
                             f"own noise-level distribution (edm): set diffusion.timestep_sampler to uniform")
        return ObjectiveSampler(objective_probs)
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss_aware":
        return LossAwareSampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}; accepted: {', '.join(TIMESTEP_SAMPLERS)}")
