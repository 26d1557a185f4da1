"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) with the guidance scale as a student input (Meng et al.
2023, "On distillation of guided diffusion models").

A student takes N deterministic DDIM steps where its teacher takes 2N: one student step t -> t_next must land where
the teacher's two steps t -> t_mid -> t_next land. On the discrete VP process z_t = alpha_t x0 + sigma_t eps with
alpha_t = sqrt(ab_t), sigma_t = sqrt(1 - ab_t), and t = -1 the end (ab = 1: alpha 1, sigma 0), the DDIM step (Song et
al. 2021 eq. 12, eta 0) from an x0 estimate x is z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from .diffusion import GaussianDiffusion, extract
from .models import StudentFamily, build_model, unwrap_model
from .models.layers import model_config
from .samplers.common import NoiseSource
from .schedules import spaced_timesteps


def _check_student_steps(num_timesteps: int, student_steps: int) -> None:
    T, N = int(num_timesteps), int(student_steps)
    if not 1 <= N <= T // 2:
        raise ValueError(f"student_steps must be in 1..{T // 2} (the teacher takes 2 * student_steps of the "
                         f"schedule's {T} timesteps), got student_steps={N}")


def student_grid(num_timesteps: int, student_steps: int) -> torch.Tensor:
    """The student's N timesteps, ascending: the samplers' `trailing` N-step grid, round(T - k T/N) - 1 for k < N.

    A student step goes from one grid point to the next lower one (-1 after the last: the data); the teacher's
    2N-step trailing grid holds every student point (round(T - 2k T/(2N)) is the same float) and one midpoint between
    each two, so a student of N/2 steps distils this one in turn, whether or not N divides T. 2N <= T.
    """
    _check_student_steps(num_timesteps, student_steps)
    return spaced_timesteps(int(num_timesteps), int(student_steps), "trailing")


def teacher_steps(t: torch.Tensor, num_timesteps: int, student_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_mid, t_next) [B] for student timesteps t [B] on `student_grid`: the teacher's grid point below t, and the
    student's next (-1: the end)."""
    grid = student_grid(num_timesteps, student_steps).to(t.device)
    k = torch.searchsorted(grid, t).clamp(max=len(grid) - 1)
    if not torch.equal(grid[k], t):
        raise ValueError(f"timesteps {t[grid[k] != t][:3].tolist()} are not on the {len(grid)}-step student grid")
    teacher = spaced_timesteps(int(num_timesteps), 2 * len(grid), "trailing").to(t.device)
    below = torch.cat([torch.full((1,), -1, dtype=grid.dtype, device=grid.device), grid[:-1]])
    return teacher[2 * k], below[k]


def _alpha_sigma(diffusion: GaussianDiffusion, t: torch.Tensor, x: torch.Tensor):
    """(alpha_t, sigma_t) in x's dtype, shaped to broadcast against x; t = -1 gives (1, 0). Computed in float64."""
    ab = torch.cat([torch.ones(1, dtype=torch.float64), diffusion.schedule.alphas_cumprod])
    return extract(ab.sqrt(), t + 1, x), extract((1.0 - ab).sqrt(), t + 1, x)


def ddim_step(diffusion: GaussianDiffusion, z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
              t_next: torch.Tensor) -> torch.Tensor:
    """z_next = alpha_next x0 + sigma_next (z_t - alpha_t x0) / sigma_t: DDIM with eta 0 (Song et al. eq. 12)."""
    a, s = _alpha_sigma(diffusion, t, z_t)
    a_next, s_next = _alpha_sigma(diffusion, t_next, z_t)
    return a_next * x0 + s_next * (z_t - a * x0) / s


def two_step_target(diffusion: GaussianDiffusion, teacher_x0: Callable, z_t: torch.Tensor, t: torch.Tensor,
                    t_mid: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """x~ [B, ...]: the x0 for which ONE DDIM step t -> t_next lands on the teacher's two (Algorithm 2).

    z_mid = DDIM(z_t, x^(z_t, t); t -> t_mid), z_next = DDIM(z_mid, x^(z_mid, t_mid); t_mid -> t_next) and
    x~ = (z_next - (sigma_next / sigma_t) z_t) / (alpha_next - (sigma_next / sigma_t) alpha_t), the solution of
    alpha_next x~ + sigma_next (z_t - alpha_t x~) / sigma_t = z_next; t_next = -1 gives x~ = z_next.
    `teacher_x0(z, t)` is the (guided) teacher's x0 estimate; t, t_mid, t_next are schedule indices [B].
    """
    z_mid = ddim_step(diffusion, z_t, teacher_x0(z_t, t), t, t_mid)
    z_next = ddim_step(diffusion, z_mid, teacher_x0(z_mid, t_mid), t_mid, t_next)
    a, s = _alpha_sigma(diffusion, t, z_t)
    a_next, s_next = _alpha_sigma(diffusion, t_next, z_t)
    ratio = s_next / s
    return (z_next - ratio * z_t) / (a_next - ratio * a)


def model_x0(net: Callable, diffusion: GaussianDiffusion, z_t: torch.Tensor, t: torch.Tensor, y=None,
             w: torch.Tensor | None = None) -> torch.Tensor:
    """A network's x0 estimate at schedule indices t: net(model input, model timestep, y[, w]) read through the
    diffusion's parameterization (mean channels only)."""
    args = (y,) if w is None else (y, w)
    out = net(diffusion.model_input(z_t, t), diffusion.model_timesteps(t), *args)
    return diffusion.x0_from_output(z_t, t, diffusion.split_output(out.to(z_t.dtype))[0])


def check_rounds(rounds: Sequence[int], num_timesteps: int) -> tuple[int, ...]:
    """The student step counts of progressive rounds, each half the one before (8, 4, 2, 1); ValueError otherwise.
    The first round's teacher takes 2 * rounds[0] DDIM steps."""
    rounds = tuple(int(n) for n in rounds)
    if not rounds or any(b * 2 != a for a, b in zip(rounds, rounds[1:])):
        raise ValueError(f"progressive rounds must halve the step count each round (e.g. [8, 4, 2, 1]), got "
                         f"{list(rounds)}")
    for n in rounds:
        _check_student_steps(num_timesteps, n)
    return rounds


def student_from_teacher(teacher: nn.Module, guidance_input: bool) -> nn.Module:
    """A new network of the teacher's architecture (with guidance_input: the guidance scale an input, its
    embedding zero-initialised) holding the teacher's weights: at start it computes what the teacher computes."""
    config = {**unwrap_model(teacher).config, **({"guidance_input": True} if guidance_input else {})}
    student = build_model(config)
    missing = student.load_state_dict(unwrap_model(teacher).state_dict(), strict=False).missing_keys
    if any(not k.startswith("guidance_embed.") for k in missing):
        raise ValueError(f"the student does not take the teacher's weights: missing {missing[:3]}")
    return student


class ProgressiveDistillation(nn.Module):
    """What a progressive-distillation run trains and checkpoints (Salimans & Ho 2022, Algorithm 2, all rounds).

    `student`: the network being trained (the teacher's architecture, with guidance_input when the guidance scale is
    its input), initialised from the teacher's weights; `original`: the frozen teacher model; `family`: the frozen
    students of the finished rounds (StudentFamily, one per entry of `rounds`); `round`: a buffer, the index of the
    round in progress (restored with a checkpoint, so a resumed run neither repeats nor skips a round change).
    Round k distils `teacher(k)` at 2 * rounds[k] steps into the student at rounds[k]; round 0's teacher is the
    original (guided by two calls), round k's is the family member of round k-1 (the guidance scale as its input).
    `forward` is the student's, so the trainer (and DDP) train the student alone.
    """

    kind = "progressive_distillation"

    def __init__(self, original: nn.Module, rounds: Sequence[int], num_timesteps: int, guidance_input: bool):
        super().__init__()
        base = unwrap_model(original).config
        self.rounds = check_rounds(rounds, num_timesteps)
        self.original = copy.deepcopy(unwrap_model(original)).eval().requires_grad_(False)
        self.student = student_from_teacher(self.original, guidance_input)
        net = self.student.config
        self.config = model_config(self.kind, net=net, rounds=list(self.rounds), teacher=base)
        self.family = StudentFamily(net, self.rounds).eval().requires_grad_(False)
        self.register_buffer("round", torch.zeros((), dtype=torch.int64))

    def forward(self, x_t, t, y=None, w=None):
        return self.student(x_t, t, y, w)

    def train(self, mode: bool = True):
        """Only the student trains: the teachers stay in eval mode (no dropout in the targets)."""
        super().train(mode)
        self.original.eval()
        self.family.eval()
        return self

    def teacher(self, k: int) -> tuple[nn.Module, bool]:
        """(round k's teacher, whether it takes w itself)."""
        if k == 0:
            return self.original, False
        return self.family.member(self.rounds[k - 1]), "guidance_input" in self.config["net"]

    @torch.no_grad()
    def close_rounds(self, k: int) -> None:
        """Enter round k (k = len(rounds): all done): each finished round's student joins the family, once. Call
        it on every rank before round k's first step and after the last round."""
        while int(self.round) < k:
            done = int(self.round)
            self.family.member(self.rounds[done]).load_state_dict(self.student.state_dict())
            self.round.fill_(done + 1)


@torch.no_grad()
def sample_student(net: Callable, diffusion: GaussianDiffusion, shape: Sequence[int], student_steps: int, y=None,
                   w: float | torch.Tensor | None = None, generator: torch.Generator | None = None,
                   x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Samples [B, ...] from N deterministic DDIM steps over `student_grid`, one call of `net` per step.

    x_T: the start (float64 keeps the loop in float64), else drawn from `generator` as `samplers.sample` draws it;
    w: the guidance scale (a float or [B]) of a student built with guidance_input.
    """
    if x_T is None:
        params = net.parameters() if isinstance(net, nn.Module) else iter(())
        device = next(params, torch.empty(0)).device
        x_T = NoiseSource(shape, device, torch.float32, generator)()
    z = x_T
    if w is not None:
        w = torch.as_tensor(w, dtype=z.dtype, device=z.device).expand(z.shape[0])
    if y is not None:
        y = torch.as_tensor(y, dtype=torch.long, device=z.device)
    for i in student_grid(diffusion.num_timesteps, student_steps).flip(0).tolist():
        t = torch.full((z.shape[0],), i, dtype=torch.long, device=z.device)
        t_next = teacher_steps(t, diffusion.num_timesteps, student_steps)[1]
        z = ddim_step(diffusion, z, model_x0(net, diffusion, z, t, y, w), t, t_next)
    return z


__all__ = ["ProgressiveDistillation", "check_rounds", "ddim_step", "model_x0", "sample_student", "student_from_teacher",
           "student_grid", "teacher_steps", "two_step_target"]
