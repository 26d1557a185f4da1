"""Stage `distill`: progressive distillation of `models/diffusion` into few-step students (Ray Train, DDP) ->
`models/student/`, `metrics/distill.json`, `reports/distill_loss.json`.

Round k trains a student to take in one DDIM step what its teacher takes in two (Salimans & Ho 2022): the teacher
model at 2 * rounds[0] steps first, then each round's student for the next. With `scale_range`, the guidance scale w
is the student's input and the first teacher is classifier-free guided at w (Meng et al. 2023), so a student step
is one network call with guidance. `models/student/` keeps every round's student (a StudentFamily) with the
teacher's diffusion, data and latent blocks: `diffusion sample --model models/student --steps 4 --guidance cfg
--scale 2`. The driver, resume, checkpoints and the rank-0 finish are the shared skeleton's (training_stage.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffusion_core.checkpoint import CheckpointError, save_model_dir
from diffusion_core.data import read_meta
from diffusion_core.distillation import ProgressiveDistillation, check_rounds, progressive_objective
from diffusion_core.io import atomic_write_json
from diffusion_core.precision import resolve_bf16
from diffusion_core.pretrained import load_diffusion_dir
from diffusion_core.resample import make_timestep_sampler
from diffusion_core.training import LoopHooks, Trainer, load_rank_data, train_loop
from pipeline.config import ConfigError, params_hash
from pipeline.provenance import input_model, registered_name

from . import training_stage
from .training_stage import Inputs, TrainingStage, Worker

TEACHER, AUTOENCODER = "models/diffusion", "models/autoencoder"
SAMPLER, SPACING = "ddim", "trailing"  # the grid a student is distilled on (distillation.student_grid)


def _teacher_config(space: str | None) -> dict:
    """The teacher folder's config.json, checked against distill.space (None: the teacher's)."""
    path = Path(TEACHER) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"distill needs the teacher {TEACHER}/ (no {path}): run train_diffusion first")
    import json

    config = json.loads(path.read_text())
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
        try:
            check_rounds(cfg.rounds, int(teacher["diffusion"]["num_timesteps"]))
        except ValueError as e:
            raise ConfigError(f"distill.rounds with {TEACHER}'s schedule: {e}") from None
        latent = teacher["data"].get("space") == "latent"
        shard_dir = Path("data/latents" if latent else "data/shards")
        read_meta(shard_dir)
        return Inputs(shard_dir, (TEACHER, AUTOENCODER) if latent else (TEACHER,), splits=("train",))

    def run_key(self, params) -> str:
        """What makes checkpoints interchangeable: the section but its step budget and cadences, and the teacher."""
        cfg = params.distill.model_dump(mode="json")
        for k in ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "scaling"):
            cfg.pop(k)
        return params_hash({"cfg": cfg, "teacher": input_model(TEACHER)["config_sha256"],
                            "per_round": params.distill.steps // len(params.distill.rounds)})

    def train(self, w: Worker) -> None:
        params, cfg = w.params, w.cfg
        teacher = load_diffusion_dir(TEACHER, map_location=w.device)
        latent = teacher.config.get("latent")
        data = load_rank_data(w.config.ws["data"], w.rank, w.world, scale=latent["scale_factor"] if latent else 1.0,
                              verify_checksums=params.data.verify_checksums, on_bad_shard=params.data.on_bad_shard)
        d, T, rounds = teacher.diffusion, teacher.diffusion.num_timesteps, tuple(cfg.rounds)
        torch.manual_seed(cfg.seed)  # the w-embedding's initial weights, the same on every rank
        state = ProgressiveDistillation(teacher.model, rounds, T, guidance_input=cfg.scale_range is not None)
        per_round = cfg.steps // len(rounds)
        options = cfg.train_options()
        bf16 = resolve_bf16(options.bf16, torch.device(w.device))  # the teachers' calls too

        def objective(k: int):
            return progressive_objective(state, k, d, teacher.num_classes, cfg.scale_range, cfg.label_dropout,
                                         teacher_bf16=bf16)

        trainer = Trainer(state, objective(0), "uniform", options, w.device)
        continues = w.resume(trainer)
        with w.start_run(continues) as run:
            hooks = LoopHooks(
                log=w.log_hook(run, lambda tr, m: f"(round of {rounds[min(tr.step - 1, cfg.steps - 1) // per_round]}"
                                                  f" steps) loss {m.get('loss', float('nan')):.4f} "
                                                  f"{m['samples_per_second']:.0f} samples/s"),
                checkpoint=w.checkpoint_hook(run, {"distill": {"rounds": list(rounds), "per_round": per_round}},
                                             cfg.keep_checkpoints))
            for k in range(len(rounds)):
                end = (k + 1) * per_round
                if trainer.step >= end:
                    continue
                state.close_rounds(k)
                trainer.objective = objective(k)
                trainer.sampler = make_timestep_sampler("uniform", T, trainer.objective.timestep_probs())
                train_loop(trainer, data, end, cfg.batch_size // w.world, log_every=cfg.log_every,
                           checkpoint_every=cfg.checkpoint_every, hooks=hooks)
            state.close_rounds(len(rounds))
            if w.rank == 0:
                self._finish(w, run, trainer, state, teacher.config, per_round)

    def _finish(self, w: Worker, run, trainer: Trainer, state: ProgressiveDistillation, teacher: dict,
                per_round: int) -> None:
        """Rank 0 after the last round: the loss curve, then the skeleton's finish (the student family's folder,
        metrics, publishing, MLflow's registered model)."""
        params, cfg = w.params, w.cfg
        rounds = list(state.rounds)
        final = {}
        for h in trainer.history:  # the last logged loss of each round
            final[rounds[min(h["step"] - 1, cfg.steps - 1) // per_round]] = h["loss"]
        metrics = {"rounds": rounds, "steps_per_round": per_round, "steps": trainer.step,
                   **{f"final_loss_{n}_steps": final.get(n) for n in rounds},
                   "wall_seconds": round(trainer.train_seconds, 2),
                   "samples_per_second": round(trainer.samples_seen / max(trainer.train_seconds, 1e-9), 1)}
        atomic_write_json(self.curve, trainer.history)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "steps"})
        guided = cfg.scale_range is not None
        student = {"method": cfg.method, "steps": rounds, "sampler": SAMPLER, "spacing": SPACING,
                   "guidance_input": guided, "scale_range": list(cfg.scale_range) if guided else None,
                   "teacher": TEACHER, "teacher_steps": 2 * rounds[0], "steps_per_round": per_round}
        data = teacher["data"]
        what = (f"Few-step students of `{TEACHER}` ({data['dataset']}, {data['space']} space) by progressive "
                f"distillation (Salimans & Ho 2022): {per_round} steps per round, from the teacher's "
                f"{2 * rounds[0]}-step DDIM to students of {', '.join(map(str, rounds))} DDIM steps (trailing grid), "
                f"one network call per step"
                + (f"; the classifier-free guidance scale w in [{cfg.scale_range[0]:g}, {cfg.scale_range[1]:g}] is "
                   f"the student's input (Meng et al. 2023): `diffusion sample --model {self.out} --steps "
                   f"{rounds[-1]} --guidance cfg --scale 2`." if guided else "."))
        latent = teacher.get("latent")
        w.finish(run, metrics, trainer.train_seconds,
                 lambda files: save_model_dir(self.out, state.family, {"diffusion": teacher["diffusion"],
                                                                       "data": data, "latent": latent,
                                                                       "student": student}, extra_files=files),
                 f"Distilled students: {data['dataset']} ({data['space']})", what,
                 register_as=registered_name(params.project.experiment, "student"), diffusion=True,
                 autoencoder=AUTOENCODER if latent else None)
        print(f"{self.name}: students of {rounds} steps -> {self.out}/", flush=True)


STAGE = Distill()


def main(argv=None) -> int:
    return training_stage.main(STAGE, argv)


if __name__ == "__main__":  # the importable module's stage, so that Ray pickles it by name
    from pipeline.distill import main as _main

    sys.exit(_main())
