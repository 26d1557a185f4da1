"""The sweep's training axis: a fresh denoiser trained a few hundred steps in one process (the library's
`Trainer`), evaluated every `eval_every` steps so that ASHA can stop a setting that is behind."""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusion_core.model_folders import DiffusionBundle, diffusion_spec


def short_training(train_cfg: Any, schedule_cfg: Any, diffusion_cfg: Any, data, data_block: dict,
                   decoder: Callable | None, *, steps: int, batch_size: int, eval_every: int,
                   on_eval: Callable[[int, DiffusionBundle, float | None], None],
                   device: str = "cpu") -> DiffusionBundle:
    """Train a fresh denoiser for `steps` steps with the library's `Trainer` (one process) on `data` (a RankData);
    every `eval_every` steps and at the end call `on_eval(step, bundle, loss)`.

    The bundle wraps the raw weights, not the EMA: at a few hundred steps an EMA of decay 0.995 is still half the
    initialisation, which would rank schedules by how fast the EMA warms up rather than by what they learnt.
    """
    from diffusion_core.builders import build_denoiser, build_diffusion_from_options
    from diffusion_core.objectives import DiffusionObjective
    from diffusion_core.training import LoopHooks, Trainer, train_loop

    cfg = train_cfg.model_copy(update={"steps": steps, "batch_size": batch_size})
    diffusion = build_diffusion_from_options(schedule_cfg.to_options(), diffusion_cfg.to_options())
    shape, num_classes = tuple(data_block["shape"]), data_block["num_classes"]
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.net_options(), shape, num_classes, diffusion.learn_sigma)
    objective = DiffusionObjective(diffusion, num_classes, cfg.label_dropout)
    trainer = Trainer(model, objective, diffusion_cfg.timestep_sampler, cfg.train_options(), device)
    config = {"diffusion": diffusion_spec(schedule_cfg.to_options(), diffusion_cfg.to_options()), "data": data_block}
    bundle = DiffusionBundle(trainer.model, diffusion, config, decoder)

    def evaluate(tr) -> None:
        loss = tr.history[-1].get("loss") if tr.history else None
        on_eval(tr.step, bundle, loss)

    train_loop(trainer, data, steps, batch_size, log_every=eval_every, checkpoint_every=eval_every,
               hooks=LoopHooks(checkpoint=evaluate))
    return bundle
