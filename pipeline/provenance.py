"""What a model folder says about itself: `provenance.json` and a model card `README.md`, written by the training
stages inside the folder's atomic save (`save_model_dir(..., extra_files=model_files(...))`).

provenance.json::

    {"stage": "train_diffusion", "model_dir": "models/diffusion",
     "git_commit": "<sha>[-dirty]",            # of the code that ran (pipeline.tracking.git_commit)
     "params": {"project": {...}, "train_diffusion": {...}, ...},   # the resolved sections the stage read
     "params_hash": "<16 hex>",
     "data": {"dir": "data/shards", "meta": "data/shards/meta.json", "meta_sha256": "...",
              "shards": {"data/shards/train-000000.tar": "<sha256>", ...}},   # the files the stage read
     "inputs": {"models/autoencoder": {"config_sha256": "...", "mlflow_run_id": "..."}},   # other models it used
     "metrics": {...},                          # the stage's metrics/<stage>.json but its timings:
     "wall_seconds": 12.3, "samples_per_second": 950.0,   # top-level (the only keys two equal runs differ in)
     "mlflow": {"run_id": "...", "experiment": "...", "model_uri": "runs:/<run_id>/model",
                "registered_model": "<name>" | null} | null}   # null: tracking disabled

Paths are relative to the folder the stage ran in (the repo root), never absolute.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from diffusion_core.checkpoint import sha256_file
from diffusion_core.data import read_meta
from diffusion_core.data.shards import find_meta

from .config import params_hash
from .tracking import git_commit

PROVENANCE_FILE, CARD_FILE = "provenance.json", "README.md"
CODE_ROOT = Path(__file__).resolve().parents[1]  # the commit recorded is the one of the code that ran
MODEL_ARTIFACT = "model"  # the MLflow model's name inside its run: runs:/<run_id>/model
# figures that differ between two equal runs: top-level keys of provenance.json, kept out of `metrics` and the card
# (so two runs of the same params and code write the same card and the same provenance but for these keys)
TIMING_KEYS = ("wall_seconds", "train_seconds", "samples_per_second")


def registered_name(experiment: str, kind: str = "diffusion") -> str:
    """Name of a model in MLflow's model registry: `<project.experiment>-diffusion` (train_diffusion),
    `<project.experiment>-student` (distill)."""
    return f"{experiment}-{kind}"


def rel(path: str | os.PathLike) -> str:
    """`path` relative to the current folder (the repo root, where stages run); never an absolute path."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.relative_to(Path.cwd().resolve())
        except ValueError:
            p = Path(p.name)
    return p.as_posix()


def data_checksums(shard_dir: str | os.PathLike, splits: tuple[str, ...] = ("train", "test")) -> dict:
    """sha256 of `shard_dir`'s meta.json and of each shard file of `splits`, hashed now from the files themselves."""
    shard_dir = Path(shard_dir)
    meta_path = find_meta(shard_dir)
    meta = read_meta(meta_path)
    shards = {rel(shard_dir / r["name"]): sha256_file(shard_dir / r["name"])
              for split in splits for r in meta["shards"].get(split, [])}
    return {"dir": rel(shard_dir), "meta": rel(meta_path), "meta_sha256": sha256_file(meta_path), "shards": shards}


def input_model(path: str | os.PathLike) -> dict:
    """What identifies another model folder a stage used: its config.json's sha256 and its training run."""
    config = Path(path) / "config.json"
    return {"config_sha256": sha256_file(config) if config.is_file() else None,
            "mlflow_run_id": training_run_id(path)}


def training_run_id(model_dir: str | os.PathLike) -> str | None:
    """MLflow run id recorded in `model_dir/provenance.json`; None when absent or tracking was off."""
    try:
        prov = json.loads((Path(model_dir) / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return (prov.get("mlflow") or {}).get("run_id")


def run_links(tags: Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """{tag: training run id of the model folder} for the folders that record one (tags to set on a run that
    used those models, so the training runs can be followed from it)."""
    ids = {tag: training_run_id(folder) for tag, folder in tags.items()}
    return {tag: run_id for tag, run_id in ids.items() if run_id}


def provenance(stage: str, model_dir: str | os.PathLike, params: Mapping[str, Any], data: dict, run: Any,
               metrics: Mapping[str, Any], wall_seconds: float, inputs: Mapping[str, dict] | None = None,
               registered_model: str | None = None) -> dict:
    """The provenance.json dict (module doc); `run`: the stage's tracking run (a NullRun when tracking is off)."""
    mlflow_block = None
    if getattr(run, "active", False) and run.run_id:
        project = params.get("project", {})
        mlflow_block = {"run_id": run.run_id, "experiment": project.get("experiment"),
                        "model_uri": f"runs:/{run.run_id}/{MODEL_ARTIFACT}", "registered_model": registered_model}
    timings = {k: metrics[k] for k in TIMING_KEYS if metrics.get(k) is not None}
    return {"stage": stage, "model_dir": rel(model_dir), "git_commit": git_commit(CODE_ROOT),
            "params": json.loads(json.dumps(dict(params))), "params_hash": params_hash(dict(params)), "data": data,
            "inputs": dict(inputs or {}), "metrics": {k: v for k, v in metrics.items() if k not in TIMING_KEYS},
            **timings, "wall_seconds": round(float(wall_seconds), 2), "mlflow": mlflow_block}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


_MLFLOW_USE = """From MLflow (the folder logged as a pyfunc model; see pipeline/mlflow_models.py for the input):

    import mlflow
    m = mlflow.pyfunc.load_model("{uri}")
"""
USAGE = {
    "train_diffusion": """Sample with the CLI (the folder is all it needs):

    diffusion sample --model {model_dir} --sampler ddim --steps 50 --num 16 --seed 0 --out samples/
    diffusion sample --model {model_dir} --guidance cfg --scale 2 --class 3 --out three.png   # class-conditional

In Python (sample i uses seed + i):

    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.model_folders import load_diffusion_dir
    images = generate(load_diffusion_dir("{model_dir}"), 16, SamplingSpec("ddim", steps=50), seed=0)["images"]

""" + _MLFLOW_USE + """    images = m.predict({{"num_samples": 16, "seed": 0, "sampler": "ddim", "steps": 50}})
""",
    "distill": """Sample a student with the CLI: one network call per step, the guidance scale its input:

    diffusion sample --model {model_dir} --steps 1 --guidance cfg --scale 2 --num 16 --seed 0 --out samples/
    diffusion sample --model {model_dir} --steps 4 --guidance cfg --scale 2 --class 3 --out three.png

In Python (sample i uses seed + i; the sampler and grid are the folder's: ddim, trailing):

    from diffusion_core.generation import SamplingSpec, generate
    from diffusion_core.model_folders import load_diffusion_dir
    spec = SamplingSpec("ddim", steps=1, guidance="cfg", scale=2.0)
    images = generate(load_diffusion_dir("{model_dir}"), 16, spec)["images"]

""" + _MLFLOW_USE + """    images = m.predict({{"num_samples": 16, "steps": 1, "guidance": "cfg", "scale": 2.0}})
""",
    "train_autoencoder": """    from diffusion_core.checkpoint import load_model_dir
    ae, config = load_model_dir("{model_dir}")
    z = ae.encode(x).mode()            # x: images in [-1, 1], N x C x H x W
    x_rec = ae.decode(z).clamp(-1, 1)

""" + _MLFLOW_USE + """    x_rec = m.predict(x.numpy())
""",
    "train_classifier": """Guide a diffusion model of the same schedule with it:

    diffusion sample --model models/diffusion --guidance classifier --classifier {model_dir} --scale 2 --out g.png

In Python: `diffusion_core.generation.load_classifier_dir("{model_dir}")`; `model(x_t, t)` gives logits.

""" + _MLFLOW_USE + """    logits = m.predict({{"x_t": x_t.numpy(), "t": t.numpy()}})
""",
    "train_feature_net": """    from diffusion_core.checkpoint import load_model_dir
    net, config = load_model_dir("{model_dir}")
    features = net.features(x)         # x: images in [-1, 1]; the domain FID/KID embedding
    logits = net(x)

""" + _MLFLOW_USE + """    logits = m.predict(x.numpy())
""",
}


def model_card(prov: dict, title: str, what: str, usage: str) -> str:
    """README.md of a model folder: what it is, how it was trained, how to use it, the training stage's figures."""
    stage, mlf, data = prov["stage"], prov["mlflow"], prov["data"]
    section = prov["params"].get(stage, {})
    lines = [f"# {title}", "", what, "", "## How it was trained", "",
             f"- stage `{stage}` (`python -m pipeline.{stage}`, `dvc repro {stage}`), code at git commit "
             f"`{prov['git_commit']}`",
             f"- data: `{data['dir']}` ({len(data['shards'])} shard files; their sha256 and that of `{data['meta']}` "
             f"are in `{PROVENANCE_FILE}`)",
             f"- training wall time and throughput: `wall_seconds`"
             f"{', `samples_per_second`' if 'samples_per_second' in prov else ''} in `{PROVENANCE_FILE}`",
             f"- params (hash `{prov['params_hash']}`; every section the stage read is in `{PROVENANCE_FILE}`):"]
    lines += [f"  - `{stage}.{k}`: `{_fmt(v)}`" for k, v in section.items() if not isinstance(v, dict)]
    lines += [f"  - `{stage}.{k}`: `{_fmt(v)}`" for k, v in section.items() if isinstance(v, dict)]
    for name, info in prov["inputs"].items():
        lines.append(f"- used `{name}` (config.json sha256 `{info['config_sha256']}`, MLflow run "
                     f"`{info['mlflow_run_id']}`)")
    if mlf:
        reg = f"; registered as `{mlf['registered_model']}`" if mlf.get("registered_model") else ""
        lines.append(f"- MLflow: experiment `{mlf['experiment']}`, run `{mlf['run_id']}`, model "
                     f"`{mlf['model_uri']}`{reg}")
    else:
        lines.append("- MLflow: tracking was disabled for this run")
    lines += ["", "## How to use it", "", usage.strip("\n"), "", "## Evaluation figures", "",
              f"Measured by `{stage}` at the end of training (`metrics/{stage}.json`; timings in "
              f"`{PROVENANCE_FILE}`):", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in prov["metrics"].items() if v is not None]
    return "\n".join(lines) + "\n"


def model_files(prov: dict, title: str, what: str) -> dict[str, str]:
    """{README.md, provenance.json} for `save_model_dir(..., extra_files=...)`; the card's usage is the stage's."""
    uri = (prov["mlflow"] or {}).get("model_uri") or "runs:/<run_id>/model (tracking was off for this run)"
    usage = USAGE[prov["stage"]].format(model_dir=prov["model_dir"], uri=uri)
    return {PROVENANCE_FILE: json.dumps(prov, indent=2) + "\n", CARD_FILE: model_card(prov, title, what, usage)}
