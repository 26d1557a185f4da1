"""Training objectives, one small class each, all called by the one `training.Trainer` as
`objective(net, x0, y, t, generator) -> (per-sample loss [B], per-sample logs)` with `timestep_probs()` (a
distribution over timesteps of its own, or None for the configured sampler):

- `DiffusionObjective`: the denoising loss of a `GaussianDiffusion` (its formulation's target and weighting) with
  classifier-free label dropout;
- `NoisyClassifierObjective`: cross-entropy of the noisy classifier p(y | x_t, t) for classifier guidance;
- `DistillationObjective`: progressive distillation (Salimans & Ho 2022), the guidance scale a student input
  (Meng et al. 2023); `ConsistencyObjective`: consistency distillation (Song et al. 2023).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

from .classifiers import noisy_classifier_losses
from .diffusion import GaussianDiffusion
from .distillation import (
    ProgressiveDistillation,
    _check_student_steps,
    ddim_step,
    model_x0,
    student_grid,
    teacher_steps,
    two_step_target,
)
from .guidance import cfg_label_dropout
from .losses import mean_flat


class DiffusionObjective:
    """The denoising loss of `diffusion` (its parameterization's target and weight) on x_t = q_sample(x0, t, eps),
    with classifier-free label dropout (num_classes: None for unconditional; index num_classes is the null class).
    The network runs under the trainer's autocast; the losses are computed in float32."""

    def __init__(self, diffusion: GaussianDiffusion, num_classes: int | None, label_dropout: float = 0.0):
        self.diffusion, self.num_classes, self.label_dropout = diffusion, num_classes, label_dropout

    def timestep_probs(self) -> torch.Tensor | None:
        return self.diffusion.formulation.timestep_probs(self.diffusion.schedule)

    def __call__(self, net: Callable, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.diffusion
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        if self.num_classes is not None:
            if y is None:
                raise ValueError("a class-conditional model needs labels y")
            y = cfg_label_dropout(y.to(x0.device), self.num_classes, self.label_dropout, generator=g)
        else:
            y = None
        x_t = d.q_sample(x0, t, noise)
        out = d.call_model(net, x_t, t, y)
        return d.losses_from_output(out.float(), x0, x_t, t, noise)["loss"], {}


class NoisyClassifierObjective:
    """The noisy classifier's objective for `training.Trainer`: cross-entropy of p(y | x_t, t) on x_t =
    q_sample(x0, t, eps), the same forward process the diffusion model is trained on; logs train accuracy."""

    def __init__(self, diffusion: GaussianDiffusion):
        self.diffusion = diffusion

    def timestep_probs(self) -> None:
        return None

    def __call__(self, net: Callable, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
        y = y.to(x0.device)
        out = noisy_classifier_losses(net, self.diffusion, x0, y, t, noise)
        return out["loss"], {"train_accuracy": out["logits"].detach().argmax(dim=1) == y}


class DistillationObjective:
    """Progressive distillation's loss for `Trainer`: the student learns in one DDIM step the frozen teacher's two.

    t is uniform on `student_grid`, z_t = alpha_t x0 + sigma_t eps, x~ = two_step_target of the teacher and the
    per-sample loss is the paper's truncated-SNR weighting of the student's x0 error,
        L = max(SNR(t), 1) mean_dims (x^_student(z_t) - x~)^2,
    an x0 loss at low SNR and an eps loss at high SNR. With `scale_range` (lo, hi) a guidance scale w ~ U[lo, hi] is
    drawn per sample, the teacher is classifier-free guided at w (eps = eps(z, null) + w (eps(z, y) - eps(z, null)),
    null = num_classes) and the student, built with guidance_input, is called net(x, t, y, w) (Meng et al. 2023).
    Without it the teacher is conditional on y (unconditional without classes). `label_dropout` turns labels into the
    null class, for which the guided teacher is the unconditional one at every w. `teacher_diffusion`: the teacher's
    parameterization when it differs from `diffusion`'s (the student's); the schedule must be the same.
    `teacher_guidance_input`: the teacher is itself a w-input student (progressive rounds after the first) and is
    called net(x, t, y, w) once instead of guided; `teacher_bf16`: the teacher's calls under bf16 autocast.
    """

    def __init__(self, teacher: Callable, diffusion: GaussianDiffusion, student_steps: int,
                 num_classes: int | None = None, scale_range: Sequence[float] | None = None,
                 label_dropout: float = 0.0, teacher_diffusion: GaussianDiffusion | None = None,
                 teacher_guidance_input: bool = False, teacher_bf16: bool = False):
        self._check_steps(diffusion.num_timesteps, student_steps)
        if scale_range is not None and (num_classes is None or not 0 <= scale_range[0] <= scale_range[1]):
            raise ValueError(f"scale_range needs a class-conditional teacher (num_classes) and 0 <= lo <= hi, got "
                             f"{scale_range} with num_classes={num_classes}")
        self.teacher_diffusion = teacher_diffusion or diffusion
        if not torch.equal(self.teacher_diffusion.schedule.alphas_cumprod, diffusion.schedule.alphas_cumprod):
            raise ValueError("the teacher's and the student's diffusion must share one schedule")
        self.teacher, self.diffusion, self.student_steps = teacher, diffusion, int(student_steps)
        self.num_classes, self.label_dropout = num_classes, label_dropout
        self.teacher_guidance_input, self.teacher_bf16 = bool(teacher_guidance_input), bool(teacher_bf16)
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        if isinstance(teacher, nn.Module):
            teacher.eval().requires_grad_(False)

    @staticmethod
    def _check_steps(num_timesteps: int, student_steps: int) -> None:
        _check_student_steps(num_timesteps, student_steps)

    def grid(self) -> torch.Tensor:
        """The timesteps the student is trained at, ascending."""
        return student_grid(self.diffusion.num_timesteps, self.student_steps)

    def timestep_probs(self) -> torch.Tensor:
        """Mass 1/N on each of the grid's N timesteps, 0 elsewhere."""
        grid = self.grid()
        probs = torch.zeros(self.diffusion.num_timesteps, dtype=torch.float64)
        probs[grid] = 1.0 / len(grid)
        return probs

    def teacher_x0(self, z_t: torch.Tensor, t: torch.Tensor, y=None, w: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's x0 estimate; with w [B], guided. Mixing eps, v or x0 is the same: at fixed z_t each is an
        affine function of the others, and the mix's weights (1 - w, w) sum to one."""
        d = self.teacher_diffusion
        if w is None or self.teacher_guidance_input:  # a student of an earlier round takes w itself
            return model_x0(self.teacher, d, z_t, t, y, w if self.teacher_guidance_input else None)
        null = torch.full_like(y, self.num_classes)
        zz, tt = torch.cat([z_t, z_t]), torch.cat([t, t])
        cond, uncond = model_x0(self.teacher, d, zz, tt, torch.cat([y, null])).chunk(2)
        return uncond + w.view(-1, *([1] * (z_t.dim() - 1))) * (cond - uncond)

    def _draw(self, x0: torch.Tensor, y: torch.Tensor | None, g: torch.Generator):
        """(noise, labels after dropout or None, guidance scales w [B] or None), all from `g`."""
        noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
        if self.num_classes is None:
            y = None
        elif y is None:
            raise ValueError("a class-conditional distillation needs labels y")
        else:
            y = cfg_label_dropout(y.to(x0.device), self.num_classes, self.label_dropout, generator=g)
        w = None
        if self.scale_range is not None:
            lo, hi = self.scale_range
            w = (lo + (hi - lo) * torch.rand(x0.shape[0], generator=g, dtype=torch.float64)).to(x0.device, x0.dtype)
        return noise, y, w

    @contextlib.contextmanager
    def _teacher_mode(self, x: torch.Tensor):
        """No gradients, and bf16 autocast with teacher_bf16."""
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if self.teacher_bf16 else \
            contextlib.nullcontext()
        with torch.no_grad(), autocast:
            yield

    def __call__(self, net: Callable, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.diffusion
        noise, y, w = self._draw(x0, y, g)
        z_t = d.q_sample(x0, t, noise)
        t_mid, t_next = teacher_steps(t, d.num_timesteps, self.student_steps)
        with self._teacher_mode(x0):
            target = two_step_target(d, lambda z, s: self.teacher_x0(z, s, y, w), z_t, t, t_mid, t_next)
        error = mean_flat((model_x0(net, d, z_t, t, y, w) - target) ** 2)
        return d.snr(t).clamp(min=1.0).to(error.dtype) * error, {}


class ConsistencyObjective(DistillationObjective):
    """Consistency distillation (Song et al. 2023, Algorithm 2) for `Trainer`, in the discrete VP form: one network
    f(z_t, t) = x^ maps any point of the teacher's probability-flow trajectory to its end, so it samples in any
    number of steps (sampler `consistency`).

    The grid is N timesteps t_k = k T/N - 1 (k = 1..N) and t_0 = -1 (the data). t = t_k is uniform on it, z_t =
    alpha_t x0 + sigma_t eps, the teacher takes one DDIM step z_t -> z_prev at t_{k-1} (guided at w as in
    DistillationObjective) and the target is the student's own x0 estimate there without gradient (iCT's target,
    Song & Dhariwal 2023: EMA decay 0), or z_prev itself at t_0 (the boundary condition f(z, -1) = z). Per-sample
    loss: max(SNR(t), 1) mean_dims (f(z_t, t) - target)^2. N must divide T.
    """

    @staticmethod
    def _check_steps(num_timesteps: int, student_steps: int) -> None:
        if int(student_steps) < 1 or int(num_timesteps) % int(student_steps):
            raise ValueError(f"the consistency grid's {student_steps} steps must divide the schedule's "
                             f"{num_timesteps} timesteps")

    def grid(self) -> torch.Tensor:
        stride = self.diffusion.num_timesteps // self.student_steps
        return torch.arange(1, self.student_steps + 1, dtype=torch.int64) * stride - 1

    def __call__(self, net: Callable, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.diffusion
        noise, y, w = self._draw(x0, y, g)
        z_t = d.q_sample(x0, t, noise)
        t_prev = t - d.num_timesteps // self.student_steps
        with self._teacher_mode(x0):
            z_prev = ddim_step(d, z_t, self.teacher_x0(z_t, t, y, w), t, t_prev)
        with torch.no_grad():
            end = (t_prev < 0).view(-1, *([1] * (x0.dim() - 1)))
            target = torch.where(end, z_prev, model_x0(net, d, z_prev, t_prev.clamp(min=0), y, w))
        error = mean_flat((model_x0(net, d, z_t, t, y, w) - target) ** 2)
        return d.snr(t).clamp(min=1.0).to(error.dtype) * error, {}


def progressive_objective(state: ProgressiveDistillation, k: int, diffusion: GaussianDiffusion,
                          num_classes: int | None, scale_range: Sequence[float] | None, label_dropout: float = 0.0,
                          teacher_bf16: bool = False) -> DistillationObjective:
    """Round k's objective: `state.teacher(k)` at 2 * rounds[k] steps -> the student at rounds[k]."""
    teacher, takes_w = state.teacher(k)
    return DistillationObjective(teacher, diffusion, state.rounds[k], num_classes, scale_range, label_dropout,
                                 teacher_guidance_input=takes_w, teacher_bf16=teacher_bf16)
