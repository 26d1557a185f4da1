"""One shape for the Ray Train stages (train_diffusion, train_classifier): a stage says only what differs.

A stage is a `TrainingStage` subclass: its name, params sections and outputs, `inputs(params)` (run on the driver
before Ray starts, so missing data fails at once), `run_key(params)` (what makes its checkpoints interchangeable;
None: the stage does not resume) and `train(worker)` (every worker's body: build the model and objective from
params, run the library's `train_loop`, and on rank 0 `worker.finish(...)`). `main(stage, argv)` does the rest:

    driver:  params -> stage.inputs -> checkpoints of other params set aside -> workspace (shared storage) ->
             WorkerConfig -> Ray Train (num_workers, restarts) -> outputs back from rank 0 -> Ray's run removed
    worker:  workspace entered -> params validated -> stage.train(Worker)
             Worker.resume (Ray's, the store's or the local checkpoint), Worker.checkpoint_hook,
             Worker.finish (provenance + card in the model folder, metrics, publish, MLflow model)
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from diffusion_core.checkpoint import CheckpointError, find_last_good_checkpoint, read_config
from diffusion_core.data import DataError
from diffusion_core.io import OutputError
from diffusion_core.storage import join
from diffusion_core.training import NumericalError, Trainer, prune_checkpoints
from pipeline.config import ConfigError, load_params, validate_params
from pipeline.provenance import data_checksums, input_model, model_files, provenance
from pipeline.publish import finish_model
from pipeline.tracking import TrackingError, start_run

from . import workspace
from ._ray import latest_ray_checkpoint, remove_run, report, run_torch_trainer, worker_context
from ._stage import run_stage, storage_root, worker_params


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What crosses the Ray boundary to every worker: plain data, resolved on the driver."""

    params: dict  # the stage's sections as JSON, project.storage_root resolved (a worker sees no driver env)
    ws: dict  # the workspace (pipeline/workspace.py): where the worker reads data and input models
    data_checksums: dict  # sha256 of the shards the stage reads, for provenance
    input_models: dict | None  # {folder: its config's sha256 and training run} of the models the stage reads
    ray_storage: str  # where Ray keeps this run's checkpoints (the storage root's ray_results, or a local folder)
    ray_run: str  # Ray's name of this run
    run_key: str | None = None  # resumable stages: the hash checkpoints must carry to be resumed from
    store_resume: bool = False  # a storage root: resume from the newest checkpoint of run_key found there


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the driver found before Ray starts: the shards the workers read and the model folders they use."""

    shard_dir: Path
    models: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train", "test")  # shard splits the stage reads (their checksums go in provenance)


class TrainingStage(abc.ABC):
    """What one Ray Train stage holds that another does not (module doc)."""

    name: str
    sections: tuple[str, ...]  # params sections the workers validate ("project", "tracking" first)
    extra_sections: tuple[str, ...] = ()  # read on the driver only (e.g. a check against another stage's)
    out: Path  # the model folder rank 0 writes
    metrics: Path
    reports: tuple[Path, ...] = ()  # other files rank 0 writes
    description: str
    errors: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointError, OutputError, TrackingError,
                                               NumericalError)  # raised on the driver as themselves

    @property
    def ckpt_root(self) -> Path:
        return Path("checkpoints") / self.name

    def config(self, params):
        """The stage's own params section."""
        return getattr(params, self.name)

    @abc.abstractmethod
    def inputs(self, params) -> Inputs:
        """The driver's check, before Ray starts: the shards and input model folders the workers will read."""

    def run_key(self, params) -> str | None:
        return None

    @abc.abstractmethod
    def train(self, worker: Worker) -> None:
        """Every worker's body: model and objective from params, the library's train_loop, rank 0's finish."""


@dataclasses.dataclass
class Worker:
    """One Ray Train worker of a stage: its params, rank and the driver's WorkerConfig, with the steps every stage
    shares."""

    stage: TrainingStage
    params: Any
    config: WorkerConfig
    rank: int
    world: int
    tracking_root: str

    @property
    def cfg(self):
        return self.stage.config(self.params)

    @property
    def device(self) -> str:
        import torch

        return f"cuda:{torch.cuda.current_device()}" if self.cfg.scaling.use_gpu else "cpu"

    def tracked_params(self) -> dict:
        """The sections the run logs and provenance records: all but tracking's."""
        return self.params.to_dict(*(s for s in self.stage.sections if s != "tracking"))

    def start_run(self, continues: str | None = None):
        return start_run(self.stage.name, self.tracked_params(), self.params.tracking, rank=self.rank,
                         experiment=self.params.project.experiment, root=self.tracking_root, continues=continues)

    def resume(self, trainer: Trainer) -> str | None:
        """Load the newest checkpoint of this run_key: Ray's (set after FailureConfig restarted the workers: the
        one to use off-node), one on the store, or the local one; returns the MLflow run id of the run that wrote
        it (None: from scratch)."""
        name, cfg = self.stage.name, self.config
        ray_ckpt = latest_ray_checkpoint()
        stored = self._fetch_stored()
        with ray_ckpt.as_directory() if ray_ckpt is not None else contextlib.nullcontext(None) as from_ray:
            found = [Path(c) for c in (from_ray, find_last_good_checkpoint(self.stage.ckpt_root)) if c is not None]
            found = [c for c in found if read_config(c).get("run_key") == cfg.run_key]
            if not found:
                return None
            newest = max(found, key=lambda c: read_config(c)["training_step"])
            trainer.load_checkpoint(newest)
            own = stored is not None and newest == stored[1] and f"/{cfg.ray_run}/" in stored[0]
            if self.rank == 0 and (own or (from_ray is not None and newest == Path(from_ray))):
                print(f"{name}: workers restarted by Ray; resuming from its checkpoint at step {trainer.step} "
                      f"({cfg.ray_storage})", flush=True)
            elif self.rank == 0 and stored is not None and newest == stored[1]:
                print(f"{name}: resuming from {stored[0]} (step {trainer.step} of {cfg.params[name]['steps']})",
                      flush=True)
            return read_config(newest).get("mlflow_run_id")

    def _fetch_stored(self) -> tuple[str, Path] | None:
        """With a storage root: the newest verifying checkpoint of this run_key on the store, fetched into the
        checkpoint folder (pipeline/workspace.py). An earlier job's, or this run's own: Ray registers a checkpoint
        only when its controller next polls the workers, so a group it restarts may get none from Ray although the
        lost group had uploaded some (the newest three are tried)."""
        if not self.config.store_resume:
            return None
        found = workspace.checkpoints_on_store(self.config.ray_storage, self.stage.name, self.config.run_key)
        return workspace.fetch_checkpoint([url for url, _, _ in found[:3]], self.stage.ckpt_root) if found else None

    def checkpoint_hook(self, run, extra: dict, keep: int) -> Callable[[Trainer], None]:
        """The loop's checkpoint hook: rank 0 writes (config.json gets `extra`, the step, run_key and MLflow run)
        and keeps the newest `keep`; every rank reports to Ray."""
        def checkpoint(tr: Trainer) -> None:
            path = None
            if self.rank == 0:
                path = tr.save_checkpoint(self.stage.ckpt_root, {**extra, "run_key": self.config.run_key,
                                                                 "training_step": tr.step,
                                                                 "mlflow_run_id": run.run_id})
                prune_checkpoints(self.stage.ckpt_root, keep)
            report({"step": tr.step, "loss": tr.history[-1]["loss"] if tr.history else None}, path)

        return checkpoint

    def log_hook(self, run, line: Callable[[Trainer, dict], str]) -> Callable[[Trainer, dict], None]:
        """The loop's log hook: metrics to MLflow, `line(trainer, metrics)` printed by rank 0."""
        def log(tr: Trainer, m: dict) -> None:
            run.log_metrics(m, step=tr.step)
            if self.rank == 0:
                print(f"{self.stage.name}: step {tr.step}/{self.cfg.steps} {line(tr, m)}", flush=True)

        return log

    def finish(self, run, metrics: dict, seconds: float, save: Callable[[dict], None], title: str, what: str,
               register_as: str | None = None, **log_model: object) -> None:
        """Rank 0 after the last step: `save(extra_files)` writes the model folder with its provenance and card
        (`title`, `what`), then the metrics file, publishing (storage root) and MLflow's model; the outputs go
        back to the driver."""
        stage = self.stage
        prov = provenance(stage.name, stage.out, self.tracked_params(), self.config.data_checksums, run, metrics,
                          seconds, self.config.input_models, register_as)
        save(model_files(prov, title, what))
        finish_model(run, stage.out, stage.metrics, metrics, self.params.project,
                     **({"register_as": register_as} if register_as else {}), **log_model)
        workspace.send_outputs(self.config.ws, tuple(str(p) for p in (stage.out, stage.metrics, *stage.reports)))


def _worker_main(stage: TrainingStage, loop_config: dict) -> None:
    """Every worker's entry (Ray Train or in-process)."""
    config: WorkerConfig = loop_config["stage"]
    tracking_root = workspace.enter(config.ws)
    rank, world = worker_context()
    params = validate_params(config.params, stage.sections)
    stage.train(Worker(stage, params, config, rank, world, tracking_root))


def _set_aside_stale(stage: TrainingStage, run_key: str) -> Path | None:
    """The last good checkpoint of these params; checkpoints of other params are moved to <root>.previous/."""
    root = stage.ckpt_root
    last = find_last_good_checkpoint(root)
    if last is not None and read_config(last).get("run_key") != run_key:
        aside = root.with_name(root.name + ".previous")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(root, aside)
        print(f"{stage.name}: checkpoints in {root}/ were written with other params; moved to {aside}/, "
              f"starting from step 0")
        return None
    return last


def launch(stage: TrainingStage, params) -> None:
    """The driver: check the inputs, set up the workspace and Ray Train, run the workers, take the outputs back."""
    cfg = stage.config(params)
    found = stage.inputs(params)  # fails here, before Ray starts, if the data or an input model is missing
    run_key = stage.run_key(params)
    root = storage_root(params.project)
    # Ray's copies of the checkpoints (what a restarted worker group resumes from, on any node): on the storage
    # root when there is one (where an earlier job's are found too), else beside the workspace
    storage = join(root, "ray_results") if root else Path("ray_results").resolve()
    earlier = []
    if run_key is not None:
        last = _set_aside_stale(stage, run_key)
        earlier = workspace.checkpoints_on_store(storage, stage.name, run_key) if root and last is None else []
        if last is not None:
            print(f"{stage.name}: resuming from {last} (step {int(last.name.split('-')[1])} of {cfg.steps})",
                  flush=True)
        elif earlier:
            print(f"{stage.name}: checkpoints of these params from an earlier run are on the store (newest: step "
                  f"{earlier[0][1]}); the workers resume from the newest that verifies", flush=True)
    # a fresh Ray run name each time: resuming is ours (from checkpoints/), not Ray's restore-by-name
    name = f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    config = WorkerConfig(
        params=worker_params(params, stage.sections), ws=workspace.open_run(name, params.project, found.shard_dir,
                                                                            found.models),
        data_checksums=data_checksums(found.shard_dir, found.splits),
        input_models={rel: input_model(rel) for rel in found.models} or None, ray_storage=str(storage),
        ray_run=name, run_key=run_key, store_resume=bool(root) and run_key is not None)
    run_torch_trainer(functools.partial(_worker_main, stage), {"stage": config}, cfg.scaling, name, storage,
                      keep_checkpoints=getattr(cfg, "keep_checkpoints", None) if run_key else None,
                      no_retry=(NumericalError,), reraise=stage.errors)
    workspace.receive_outputs(config.ws)
    remove_run(storage, name)  # kept only after a failure
    for run in {run for _, _, run in earlier}:  # the failed runs this one went on from: superseded
        remove_run(storage, run)
    print(f"{stage.name}: wrote {stage.out}/ and {stage.metrics}: {json.dumps(json.loads(stage.metrics.read_text()))}")


def main(stage: TrainingStage, argv=None) -> int:
    """The stage's command line (`python -m pipeline.<stage>`): --params, --debug, --verbose; one-line errors."""
    def run(args) -> None:
        launch(stage, load_params(args.params, sections=(*stage.sections, *stage.extra_sections)))

    return run_stage(stage.name, run, argv, description=stage.description)
