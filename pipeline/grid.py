"""The sweep's grid: params.yaml `sweep.sampling` blocks -> trials with seed sets, their names and seeds, and the
rows of a short-trained model under each sampling setting. The short training runs themselves:
`short_training.py`; the metrics of one sample set: `diffusion_core.evaluation`.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterable

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
                       "num_samples": n, "spacing": spacing, "options": options,
                       **({"model": "student"} if getattr(block, "model", "diffusion") == "student" else {})}
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
    student = "student-" if trial.get("model") == "student" else ""
    return f"{student}{trial['sampler']}-{trial['steps']}{eta}{grid}{opts}-{g}-n{trial['num_samples']}"


CROSS_AXIS = "training_x_sampling"  # sweep.csv's axis of a short-trained model under one sampling setting


def cross_rows(train_row: dict, cross_json: str | None) -> list[dict]:
    """Trial rows of a finished training trial's `sweep.training.samplers` points (reported as JSON, a list of
    metrics in the order of the cross trials it ran; `train_row` holds them as `cross`): each named
    `<training trial>/<sampling trial>`, setting `<training setting>/<sampling setting>`; none if it was pruned."""
    if not cross_json or train_row.get("status") != "completed":
        return []
    points = json.loads(cross_json)
    if len(points) != len(train_row["cross"]):
        raise ValueError(f"{train_row['trial']}: {len(points)} sampler points reported for {len(train_row['cross'])}")
    keep = ("schedule", "parameterization", "train_steps", "loss")
    return [{**{k: train_row.get(k) for k in keep}, **sub, **metrics, "axis": CROSS_AXIS, "status": "completed",
             "training": train_row["setting"], "trial": f"{train_row['trial']}/{trial_name(sub)}",
             "setting": f"{train_row['setting']}/{setting_name(sub)}"}
            for sub, metrics in zip(train_row["cross"], points)]


def trial_name(trial: dict) -> str:
    """`setting_name` plus the seed set, e.g. `ddim-20-eta0-cfg2-n250-s1`."""
    return setting_name(trial) + (f"-s{trial['seed_set']}" if "seed_set" in trial else "")


__all__ = ["CROSS_AXIS", "cross_rows", "sampling_trials", "setting_name", "trial_name", "trial_seed"]
