"""Stage `distill`: few-step students of `models/diffusion` (Ray Train, DDP) -> `models/student/`,
`metrics/distill.json`, `reports/distill_loss.json`.

`method: progressive` (Salimans & Ho 2022): round k trains a student to take in one DDIM step what its teacher takes
in two, the teacher model at 2 * rounds[0] steps first, then each round's student for the next; `models/student/`
keeps every round's student (a StudentFamily). `method: consistency` (Song et al. 2023): one student made
consistent along the teacher's `consistency_grid`-step DDIM, sampled by multistep consistency sampling at any of
`rounds` steps. With `scale_range`, the guidance scale w is the student's input and the teacher is classifier-free
guided at w (Meng et al. 2023), so a student step is one network call with guidance. The folder carries the
teacher's diffusion, data and latent blocks: `diffusion sample --model models/student --steps 4 --guidance cfg
--scale 2`. The driver, resume, checkpoints and the rank-0 finish are the shared skeleton's (training_stage.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffusion_core.checkpoint import CheckpointError, read_config, save_model_dir
from diffusion_core.data import read_meta
from diffusion_core.distillation import ProgressiveDistillation, check_rounds, student_from_teacher
from diffusion_core.io import atomic_write_json
from diffusion_core.model_folders import load_diffusion_dir
from diffusion_core.objectives import ConsistencyObjective, progressive_objective
from diffusion_core.precision import resolve_bf16
from diffusion_core.rank_data import load_rank_data
from diffusion_core.resample import make_timestep_sampler
from diffusion_core.training import LoopHooks, Trainer, train_loop
from pipeline.config import ConfigError, params_hash
from pipeline.provenance import input_model, registered_name

from . import training_stage
from .training_stage import Inputs, TrainingStage, Worker

TEACHER, AUTOENCODER = "models/diffusion", "models/autoencoder"
SAMPLER, SPACING = "ddim", "trailing"  # a progressive student's sampler and grid (distillation.student_grid)


def _teacher_config(space: str | None) -> dict:
    """The teacher folder's config.json, checked against distill.space (None: the teacher's)."""
    path = Path(TEACHER) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"distill needs the teacher {TEACHER}/ (no {path}): run train_diffusion first")
    config = read_config(TEACHER)  # one-line CheckpointError when unreadable
    if space is not None and config.get("data", {}).get("space") != space:
        raise ConfigError(f"distill.space is {space!r} but {TEACHER} was trained in "
                          f"{config.get('data', {}).get('space')!r} space: set distill.space to match")
    return config


class Distill(TrainingStage):
    name = "distill"
    sections = ("project", "tracking", "data", "distill")
    out, metrics = Path("models/student"), Path("metrics/distill.json")
    curve = Path("reports/distill_loss.json")
    reports = (curve,)
    description = "Distil the diffusion model into few-step students (progressive distillation, Ray Train)."

    def inputs(self, params) -> Inputs:
        cfg = params.distill
        teacher = _teacher_config(cfg.space)
        if cfg.scale_range is not None and teacher["data"].get("num_classes") is None:
            raise ConfigError(f"distill.scale_range makes the guidance scale a student input, but {TEACHER} is "
                              f"unconditional: set distill.scale_range: null")
        T = int(teacher["diffusion"]["num_timesteps"])
        try:
            if cfg.method == "progressive":
                check_rounds(cfg.rounds, T)
            else:
                ConsistencyObjective._check_steps(T, cfg.consistency_grid)
        except ValueError as e:
            what = "rounds" if cfg.method == "progressive" else "consistency_grid"
            raise ConfigError(f"distill.{what} with {TEACHER}'s schedule: {e}") from None
        latent = teacher["data"].get("space") == "latent"
        shard_dir = Path("data/latents" if latent else "data/shards")
        read_meta(shard_dir)
        return Inputs(shard_dir, (TEACHER, AUTOENCODER) if latent else (TEACHER,), splits=("train",))

    def run_key(self, params) -> str:
        """What makes checkpoints interchangeable: the section but its step budget and cadences, and the teacher
        (progressive: the steps per round too, where the rounds change)."""
        cfg = params.distill.model_dump(mode="json")
        for k in ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "scaling"):
            cfg.pop(k)
        per_round = params.distill.steps // len(params.distill.rounds) if cfg["method"] == "progressive" else None
        return params_hash({"cfg": cfg, "teacher": input_model(TEACHER)["config_sha256"], "per_round": per_round})

    def train(self, w: Worker) -> None:
        params, cfg = w.params, w.cfg
        teacher = load_diffusion_dir(TEACHER, map_location=w.device)
        latent = teacher.config.get("latent")
        data = load_rank_data(w.config.ws["data"], w.rank, w.world, scale=latent["scale_factor"] if latent else 1.0,
                              verify_checksums=params.data.verify_checksums, on_bad_shard=params.data.on_bad_shard)
        options = cfg.train_options()
        bf16 = resolve_bf16(options.bf16, torch.device(w.device))  # the teachers' calls too
        torch.manual_seed(cfg.seed)  # the w-embedding's initial weights, the same on every rank
        run = Run(w, teacher, data, options, bf16)
        if cfg.method == "progressive":
            run.progressive()
        else:
            run.consistency()


class Run:
    """One distill run on a worker: the teacher bundle, this rank's data, the trainer's options; `progressive` or
    `consistency` trains and (rank 0) writes models/student."""

    def __init__(self, w: Worker, teacher, data, options, bf16: bool):
        self.w, self.cfg, self.teacher, self.data, self.options, self.bf16 = w, w.cfg, teacher, data, options, bf16
        self.guided = self.cfg.scale_range is not None

    def _loop(self, trainer: Trainer, run, end: int, line) -> None:
        cfg = self.cfg
        hooks = LoopHooks(log=self.w.log_hook(run, line),
                          checkpoint=self.w.checkpoint_hook(run, {"distill": {"method": cfg.method}},
                                                            cfg.keep_checkpoints))
        train_loop(trainer, self.data, end, cfg.batch_size // self.w.world, log_every=cfg.log_every,
                   checkpoint_every=cfg.checkpoint_every, hooks=hooks)

    def progressive(self) -> None:
        cfg, teacher = self.cfg, self.teacher
        d, T, rounds = teacher.diffusion, teacher.diffusion.num_timesteps, tuple(cfg.rounds)
        state = ProgressiveDistillation(teacher.model, rounds, T, guidance_input=self.guided)
        per_round = cfg.steps // len(rounds)

        def objective(k: int):
            return progressive_objective(state, k, d, teacher.num_classes, cfg.scale_range, cfg.label_dropout,
                                         teacher_bf16=self.bf16)

        trainer = Trainer(state, objective(0), "uniform", self.options, self.w.device)
        continues = self.w.resume(trainer)
        with self.w.start_run(continues) as run:
            def line(tr, m):
                return (f"(round of {rounds[min(tr.step - 1, cfg.steps - 1) // per_round]} steps) loss "
                        f"{m.get('loss', float('nan')):.4f} {m['samples_per_second']:.0f} samples/s")

            for k in range(len(rounds)):
                end = (k + 1) * per_round
                if trainer.step >= end:
                    continue
                state.close_rounds(k)
                trainer.objective = objective(k)
                trainer.sampler = make_timestep_sampler("uniform", T, trainer.objective.timestep_probs())
                self._loop(trainer, run, end, line)
            state.close_rounds(len(rounds))
            if self.w.rank == 0:
                final = {}
                for h in trainer.history:  # the last logged loss of each round
                    final[rounds[min(h["step"] - 1, cfg.steps - 1) // per_round]] = h["loss"]
                self._finish(run, trainer, state.family,
                             {"sampler": SAMPLER, "teacher_steps": 2 * rounds[0], "steps_per_round": per_round},
                             {"steps_per_round": per_round, **{f"final_loss_{n}_steps": final.get(n) for n in rounds}},
                             f"progressive distillation (Salimans & Ho 2022): {per_round} steps per round, from the "
                             f"teacher's {2 * rounds[0]}-step DDIM to students of {', '.join(map(str, rounds))} DDIM "
                             f"steps (trailing grid), one network call per step")

    def consistency(self) -> None:
        cfg, teacher = self.cfg, self.teacher
        student = student_from_teacher(teacher.model, self.guided)
        objective = ConsistencyObjective(teacher.model, teacher.diffusion, cfg.consistency_grid, teacher.num_classes,
                                         cfg.scale_range, cfg.label_dropout, teacher_bf16=self.bf16)
        trainer = Trainer(student, objective, "uniform", self.options, self.w.device)
        continues = self.w.resume(trainer)
        with self.w.start_run(continues) as run:
            self._loop(trainer, run, cfg.steps, lambda tr, m: f"loss {m.get('loss', float('nan')):.4f} "
                                                             f"{m['samples_per_second']:.0f} samples/s")
            if self.w.rank == 0:
                last = trainer.history[-1]["loss"] if trainer.history else None
                self._finish(run, trainer, student, {"sampler": "consistency", "grid_steps": cfg.consistency_grid},
                             {"final_loss": last},
                             f"consistency distillation (Song et al. 2023; the target without gradient, Song & "
                             f"Dhariwal 2023) along the teacher's {cfg.consistency_grid}-step DDIM: one network for "
                             f"{', '.join(map(str, cfg.rounds))} steps of multistep consistency sampling, one call "
                             f"per step")

    def _finish(self, run, trainer: Trainer, model, student: dict, metrics: dict, how: str) -> None:
        """Rank 0 after training: the loss curve, then the skeleton's finish (the students' folder with the
        teacher's diffusion, data and latent blocks, metrics, publishing, MLflow's registered model)."""
        w, cfg, teacher = self.w, self.cfg, self.teacher.config
        stage = w.stage
        rounds = list(cfg.rounds)
        metrics = {"method": cfg.method, "rounds": rounds, "steps": trainer.step, **metrics,
                   "wall_seconds": round(trainer.train_seconds, 2),
                   "samples_per_second": round(trainer.samples_seen / max(trainer.train_seconds, 1e-9), 1)}
        atomic_write_json(stage.curve, trainer.history)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "steps"})
        block = {"method": cfg.method, "steps": rounds, "spacing": SPACING, "guidance_input": self.guided,
                 "scale_range": list(cfg.scale_range) if self.guided else None, "teacher": TEACHER, **student}
        data, latent = teacher["data"], teacher.get("latent")
        what = (f"Few-step students of `{TEACHER}` ({data['dataset']}, {data['space']} space) by {how}"
                + (f"; the classifier-free guidance scale w in [{cfg.scale_range[0]:g}, {cfg.scale_range[1]:g}] is "
                   f"the student's input (Meng et al. 2023): `diffusion sample --model {stage.out} --steps "
                   f"{rounds[-1]} --guidance cfg --scale 2`." if self.guided else "."))
        w.finish(run, metrics, trainer.train_seconds,
                 lambda files: save_model_dir(stage.out, model, {"diffusion": teacher["diffusion"], "data": data,
                                                                 "latent": latent, "student": block},
                                              extra_files=files),
                 f"Distilled students: {data['dataset']} ({data['space']})", what,
                 register_as=registered_name(w.params.project.experiment, "student"), diffusion=True,
                 autoencoder=AUTOENCODER if latent else None)
        print(f"{stage.name}: {cfg.method} students of {rounds} steps -> {stage.out}/", flush=True)


STAGE = Distill()


def main(argv=None) -> int:
    return training_stage.main(STAGE, argv)


if __name__ == "__main__":  # the importable module's stage, so that Ray pickles it by name
    from pipeline.distill import main as _main

    sys.exit(_main())
