"""Sample-set evaluation for `sweep` and `evaluate`: cached reference statistics, the sampling grid, metrics of
one sample set, and a short training run that reports validation metrics as it goes.

Engine-free (no ray, no mlflow): the stages wire these into Ray Tune / Ray tasks and MLflow.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .metrics import class_accuracy
from .metrics.errors import MetricsError
from .pretrained import DiffusionBundle, diffusion_spec

REFERENCE_FILE = "reference-{}.npz"  # same name as fidelity_scores(cache_dir=...) uses
DOMAIN, INCEPTION = "domain", "inception"


# ----------------------------------------------------------------------------------------------- reference stats


def reference_path(ref_dir: str | Path, name: str) -> Path:
    return Path(ref_dir) / REFERENCE_FILE.format(name)


def load_reference(ref_dir: str | Path, name: str, required: bool = True):
    """ReferenceStats of extractor `name` (domain | inception) from the reference_stats stage's folder."""
    from .metrics.fidelity import ReferenceStats

    path = reference_path(ref_dir, name)
    if not path.is_file():
        if required:
            raise MetricsError(f"reference statistics {path} not found: run the reference_stats stage "
                               f"(dvc repro reference_stats)")
        return None
    return ReferenceStats.load(path)


# ----------------------------------------------------------------------------------------------- sampling grid


def sampling_trials(grid_blocks: Iterable[Any], default_num_samples: int, num_timesteps: int,
                    default_spacing: str = "trailing", default_seed_sets: int = 1) -> list[dict]:
    """Expand `sweep.sampling` blocks into trial configs (sampler, steps, eta, guidance, scale, num_samples,
    spacing, options, seed_set): every distinct setting once per seed set k = 0..seed_sets-1.

    eta only matters to DDIM (set to 0 elsewhere); scale is None without guidance. Duplicate settings across
    blocks are dropped, keeping the first. Steps beyond the model's T raise ValueError naming the block.
    """
    seen, out = set(), []
    for i, block in enumerate(grid_blocks):
        bad = [s for s in block.steps if s > num_timesteps]
        if bad:
            raise ValueError(f"sweep.sampling[{i}].steps has {bad[0]} > schedule.num_timesteps {num_timesteps}")
        n = block.num_samples or default_num_samples
        sets = getattr(block, "seed_sets", None) or default_seed_sets
        spacings = getattr(block, "spacings", None) or (default_spacing,)
        options = dict(getattr(block, "options", None) or {})
        for sampler, steps, eta, guidance, scale, spacing in itertools.product(
                block.samplers, block.steps, block.etas, block.guidance, block.scales, spacings):
            setting = {"sampler": sampler, "steps": int(steps), "eta": float(eta) if sampler == "ddim" else 0.0,
                       "guidance": guidance, "scale": None if guidance == "none" else float(scale),
                       "num_samples": n, "spacing": spacing, "options": options}
            key = json.dumps(setting, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out += [{**setting, "seed_set": k} for k in range(sets)]
    return out


def trial_seed(trial: dict, base_seed: int) -> int:
    """First seed of a trial: seed set k of a point with n samples draws seeds base + k*n .. base + (k+1)*n - 1."""
    return base_seed + trial.get("seed_set", 0) * trial["num_samples"]


def setting_name(trial: dict) -> str:
    """Short readable id of a setting (seed set left out), e.g. `ddim-20-eta0-cfg2-n250` or `train-cosine-eps`."""
    if "schedule" in trial:
        return f"train-{trial['schedule']}-{trial['parameterization']}"
    g = trial["guidance"] if trial["scale"] is None else f"{trial['guidance']}{trial['scale']:g}"
    eta = f"-eta{trial['eta']:g}" if trial["sampler"] == "ddim" else ""
    grid = f"-{trial['spacing']}" if trial.get("spacing", "trailing") != "trailing" else ""
    opts = "".join(f"-{k}{v:g}" for k, v in sorted((trial.get("options") or {}).items()))
    return f"{trial['sampler']}-{trial['steps']}{eta}{grid}{opts}-{g}-n{trial['num_samples']}"


def trial_name(trial: dict) -> str:
    """`setting_name` plus the seed set, e.g. `ddim-20-eta0-cfg2-n250-s1`."""
    return setting_name(trial) + (f"-s{trial['seed_set']}" if "seed_set" in trial else "")


# ----------------------------------------------------------------------------------------------- metrics


def sample_metrics(images: np.ndarray, labels: np.ndarray, reference, extractor, inception=None,
                   inception_reference=None, batch_size: int = 256) -> dict:
    """DESIGN.md metrics of one sample set (uint8 [N, H, W, C], labels [N], -1 = unconditional).

    fd_domain, kd_domain, kd_domain_std, precision_domain, recall_domain from the domain extractor; class_accuracy
    by its feature net when every sample has a requested class (else None); fid_inception, kid_inception only when
    an Inception extractor and its reference are given (never faked).
    """
    from .metrics.fidelity import fidelity_metrics

    m = fidelity_metrics(images, reference, extractor, batch_size=batch_size)
    out = {"fd_domain": m["fd"], "kd_domain": m["kd"], "kd_domain_std": m["kd_std"],
           "precision_domain": m["precision"], "recall_domain": m["recall"], "class_accuracy": None}
    labels = np.asarray(labels)
    net = extractor.net
    if len(labels) and (labels >= 0).all() and labels.max() < net.config["num_classes"]:
        out["class_accuracy"] = class_accuracy(net, images, labels, batch_size=batch_size)
    if inception is not None and inception_reference is not None:
        mi = fidelity_metrics(images, inception_reference, inception, prc=False, batch_size=batch_size)
        out.update(fid_inception=mi["fd"], kid_inception=mi["kd"], kid_inception_std=mi["kd_std"])
    return out


def nll_on_test(bundle: DiffusionBundle, x_test: torch.Tensor, y_test: torch.Tensor | None, num: int,
                batch_size: int = 64, seed: int = 0) -> tuple[float | None, float | None]:
    """(nll_bpd, standard error) on the first `num` test images for pixel image models; (None, None) otherwise."""
    if num < 2 or bundle.is_latent or bundle.config["data"].get("kind", "image") != "image":
        return None, None
    from .metrics import nll_bpd

    n = min(num, len(x_test))
    labels = None if y_test is None or bundle.num_classes is None else y_test[:n]
    return nll_bpd(bundle, x_test[:n], batch_size=batch_size, generator=torch.Generator().manual_seed(seed),
                   labels=labels)


# ----------------------------------------------------------------------------------------------- short training


def short_training(train_cfg: Any, schedule_cfg: Any, diffusion_cfg: Any, data, data_block: dict,
                   decoder: Callable | None, *, steps: int, batch_size: int, eval_every: int,
                   on_eval: Callable[[int, DiffusionBundle, float | None], None], device: str = "cpu") -> DiffusionBundle:
    """Train a fresh denoiser for `steps` steps with `DiffusionTrainer` (one process) on `data` (a RankData);
    every `eval_every` steps and at the end call `on_eval(step, bundle, loss)`.

    The bundle wraps the raw weights, not the EMA: at a few hundred steps an EMA of decay 0.995 is still half the
    initialisation, which would rank schedules by how fast the EMA warms up rather than by what they learnt.
    """
    from .training import DiffusionTrainer, LoopHooks, build_denoiser, build_diffusion_from_params, train_loop

    cfg = train_cfg.model_copy(update={"steps": steps, "batch_size": batch_size})
    diffusion = build_diffusion_from_params(schedule_cfg, diffusion_cfg)
    shape, num_classes = tuple(data_block["shape"]), data_block["num_classes"]
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.unet, shape, num_classes, diffusion.learn_sigma)
    trainer = DiffusionTrainer(cfg, diffusion, model, diffusion_cfg.timestep_sampler, num_classes, device)
    config = {"diffusion": diffusion_spec(schedule_cfg, diffusion_cfg), "data": data_block}
    bundle = DiffusionBundle(trainer.model, diffusion, config, decoder)

    def evaluate(tr) -> None:
        loss = tr.history[-1].get("loss") if tr.history else None
        on_eval(tr.step, bundle, loss)

    train_loop(trainer, data, steps, batch_size, log_every=eval_every, checkpoint_every=eval_every,
               hooks=LoopHooks(checkpoint=evaluate))
    return bundle


class Stopwatch:
    """Wall seconds since creation (perf_counter)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


__all__ = ["DOMAIN", "INCEPTION", "REFERENCE_FILE", "Stopwatch", "load_reference", "nll_on_test", "reference_path",
           "sample_metrics", "sampling_trials", "short_training", "trial_name"]
