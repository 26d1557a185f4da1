"""The Ray edge shared by the training stages: join or start Ray, run a TorchTrainer, turn failures into one line.

    init_ray()                       # RAY_ADDRESS unset: local Ray sized to this machine; set: join that cluster
    result = run_torch_trainer(loop, {"params": ...}, params.train_diffusion.scaling, "train_diffusion",
                               storage_path=Path("ray_results").resolve())

`scaling` is any object with num_workers, use_gpu, cpus_per_worker, max_failures and use_ray (false: the loop
runs in this process with rank 0 of 1, same code path minus Ray). Inside the loop use `worker_context()` for
(rank, world_size) and `report()` for metrics/checkpoints; both work with and without Ray.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0
VERBOSE_ENV = "PIPELINE_VERBOSE"  # set by a stage's --verbose: Ray's own messages as Ray prints them
# Ray Train's placement-group cleaner polls the State API, which lives in the dashboard; a local Ray here runs
# without one, so it warns every few seconds for the whole run (546 lines in one default train_diffusion)
# The Train controller also asks an autoscaler for the workers' resources; a local node has none to ask, and on a
# busy CPU the request times out with a traceback that Ray itself calls "safe to ignore"
_POLLING_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client")
_CLEANER_THREAD = "PlacementGroupCleanerMonitor"
# ray.train.report logs every report of every rank at INFO ("Reporting training result ..."), on any cluster; its
# logger is named by the module's file path
_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


class RayError(RuntimeError):
    """Ray could not start, could not be reached, or a training worker failed; the message is one line."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_reachable(address: str) -> None:
    """TCP-connect to host:port of RAY_ADDRESS within seconds (ray.init would retry for a long time)."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise RayError(f"RAY_ADDRESS={address!r} is not host:port (e.g. 127.0.0.1:6379) or auto; fix or unset it")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise RayError(f"Ray cluster at RAY_ADDRESS={address} is unreachable ({e.strerror or e}); start it "
                       f"(`ray start --head`) or unset RAY_ADDRESS to run on a local Ray") from None


def init_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray (RAY_ADDRESS unset; no dashboard; all CPUs unless num_cpus) or join RAY_ADDRESS's cluster.

    Under `ray job submit` RAY_ADDRESS is set by Ray, so the job joins the cluster it was submitted to. An
    unreachable address fails within CONNECT_TIMEOUT_S (ray.init itself would retry for a minute). ray.init runs
    in the main thread on purpose: Ray ties its GCS/raylet to the starting thread (PR_SET_PDEATHSIG), so a
    helper thread that ends kills the local cluster with it.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from an offline machine
    # Train's print patch tees a worker's print to its logger and to the (redirected) stdout: every line twice
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    quiet = os.environ.get(VERBOSE_ENV) != "1"
    try:
        if address:
            _check_reachable(address)
            ray.init(logging_level="WARNING")
        else:
            if quiet:  # nothing drains a local node, and its watcher's set-up error is noise here
                os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # the stage's own Ray: its workers do the stage's work while the driver waits, so they run at the
            # driver's priority. Ray's default (nice 15) hands a busy machine's cores to every other process first.
            os.environ.setdefault("RAY_worker_niceness", "0")
            hook = {"worker_process_setup_hook": "pipeline._ray.quiet_worker_logging"} if quiet else {}
            # address="local": a new Ray of our own, even where a `ray start` cluster runs on this machine
            # (ray.init() without an address would join the latest one, which then refuses num_cpus)
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     logging_level="WARNING", runtime_env=hook or None)
    except RayError:
        raise
    except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, RaySystemError ...
        where = f"join the Ray cluster at RAY_ADDRESS={address}" if address else "start a local Ray"
        raise RayError(f"cannot {where}: {_one_line(e)}") from None


# ----------------------------------------------------------------------------------------------- inside workers


def _below_critical(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.CRITICAL


def quiet_worker_logging() -> None:
    """worker_process_setup_hook of a local Ray: drop the local-node noise of _POLLING_LOGGERS (errors and above
    of other loggers still show).

    With two local Rays on one machine (two stages at once, parallel tests) the cleaner's State API client cannot
    tell which cluster is its own and its monitor thread dies with a ConnectionError traceback; on a local node,
    torn down with the stage, there is nothing for it to clean, so that thread's death is kept off the console.
    """
    import threading

    for name in _POLLING_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.CRITICAL)
        if _below_critical not in logger.filters:  # Train's controller and workers dictConfig "ray.train" after this
            logger.addFilter(_below_critical)       # hook, which resets its child loggers' levels, not their filters
    previous = threading.excepthook

    def excepthook(args) -> None:
        if args.thread is not None and args.thread.name == _CLEANER_THREAD:
            logging.getLogger(__name__).debug("placement-group cleaner stopped: %s", args.exc_value)
            return
        previous(args)

    threading.excepthook = excepthook
    install_sigterm_redelivery()


def install_sigterm_redelivery() -> None:
    """Make a SIGTERM that lands inside a weakref callback or __del__ still end the process.

    Ray's workers turn SIGTERM into SystemExit; raised inside such a callback, Python ignores it ("Exception ignored
    in: <function WeakSet...>" and a traceback on the console, seen when the sweep's Ray stopped its trial actors)
    and the worker lives on until Ray kills it. This hook sends the signal again 50 ms later from a thread (sent
    at once, it would be handled inside the hook, and ignored again), so it is handled outside the callback and the
    worker exits as Ray asked, quietly; every other unraisable exception goes to the old hook.
    """
    import signal
    import sys
    import threading

    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        tb, from_sigterm = unraisable.exc_traceback, False
        while tb is not None and not from_sigterm:
            from_sigterm = tb.tb_frame.f_code.co_name == "sigterm_handler"
            tb = tb.tb_next
        if isinstance(unraisable.exc_value, SystemExit) and from_sigterm:
            resend = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM))
            resend.daemon = True
            resend.start()
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _quiet_train_reports() -> None:
    """In a Train worker: Ray's per-report INFO line off (the stage prints its own progress); warnings stay."""
    import importlib.util

    spec = importlib.util.find_spec(_REPORT_LOGGER_MODULE)
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def remove_run(storage_path: str | os.PathLike, name: str) -> None:
    """Delete Ray's folder of run `name` under `storage_path` (a path or a storage URL); missing is fine."""
    from diffusion_core.storage import join, remove

    remove(join(str(storage_path), name))


def worker_context() -> tuple[int, int]:
    """(world rank, world size) inside a Ray Train worker, else (0, 1)."""
    if os.environ.get("_PIPELINE_IN_RAY_TRAIN") == "1":
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    return 0, 1


def latest_ray_checkpoint() -> Any:
    """The checkpoint Ray restores after a worker-group restart (None outside Ray or before the first one)."""
    if os.environ.get("_PIPELINE_IN_RAY_TRAIN") == "1":
        import ray.train

        return ray.train.get_checkpoint()
    return None


def report(metrics: Mapping[str, Any], checkpoint_dir: str | os.PathLike | None = None) -> None:
    """ray.train.report on every rank (a barrier); rank 0 passes checkpoint_dir. No-op outside Ray."""
    if os.environ.get("_PIPELINE_IN_RAY_TRAIN") != "1":
        return
    import ray.train

    ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    ray.train.report(dict(metrics), checkpoint=ckpt, checkpoint_dir_name=Path(checkpoint_dir).name if ckpt else None)


def _worker_entry(loop: Callable[[dict], Any], no_retry: tuple[type[BaseException], ...], config: dict) -> None:
    """Runs in every Ray Train worker: thread count = CPUs per worker, non-retryable errors handed to the driver."""
    threads = int(config["_cpus_per_worker"])
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ["_PIPELINE_IN_RAY_TRAIN"] = "1"
    if not config.get("_verbose"):
        _quiet_train_reports()
    import torch

    torch.set_num_threads(threads)
    try:
        loop(config)
    except no_retry as e:
        # deterministic errors (every rank raises them at the same step): retrying from a checkpoint would only
        # repeat them, so hand them to the driver instead of letting FailureConfig restart the workers
        rank, _ = worker_context()
        if rank == 0:
            path = Path(config["_error_file"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"type": type(e).__name__, "message": str(e)}))


def _root_cause(e: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (WorkerGroupError -> worker failure -> RayTaskError -> cause)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        failures = getattr(e, "worker_failures", None)
        if failures:
            e = failures[min(failures)]
            continue
        nxt = getattr(e, "cause", None) or getattr(e, "controller_failure", None) or e.__cause__
        if isinstance(nxt, BaseException):
            e = nxt
            continue
        break
    return e


def run_torch_trainer(train_loop_per_worker: Callable[[dict], Any], loop_config: Mapping[str, Any], scaling: Any,
                      name: str, storage_path: str | os.PathLike, *, keep_checkpoints: int | None = None,
                      no_retry: tuple[type[BaseException], ...] = (),
                      reraise: tuple[type[BaseException], ...] = ()) -> Any:
    """Run `train_loop_per_worker(config)` on `scaling.num_workers` workers (DDP process group set up by Ray).

    Returns Ray's Result (None with use_ray false). A worker failure that outlives max_failures raises its root
    cause if it is one of `reraise` (e.g. ConfigError, DataError), else a one-line RayError. Errors in
    `no_retry` are raised at once, without restarts.
    """
    config = {**loop_config, "_cpus_per_worker": int(scaling.cpus_per_worker),
              "_verbose": os.environ.get(VERBOSE_ENV) == "1"}
    if not getattr(scaling, "use_ray", True):
        return _run_in_process(train_loop_per_worker, config, int(scaling.cpus_per_worker))
    init_ray()
    from diffusion_core.storage import is_url

    remote = is_url(storage_path)  # s3://...: Ray persists checkpoints there (pyarrow reads AWS_* from the env)
    # the non-retryable error hand-over is a local file (the driver reads it after fit): beside a local storage
    # path, else under ./ray_results
    local = Path("ray_results" if remote else storage_path).resolve()
    error_file = local / name / "errors" / f"{uuid.uuid4().hex}.json"
    config["_error_file"] = str(error_file)
    trainer = _torch_trainer(functools.partial(_worker_entry, train_loop_per_worker, tuple(no_retry)), config,
                             scaling, name, str(storage_path) if remote else str(local), keep_checkpoints)
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - TrainingFailedError and friends
        _raise_worker_error(e, name, (*reraise, *no_retry))
    if getattr(result, "error", None) is not None:
        _raise_worker_error(result.error, name, (*reraise, *no_retry))
    if error_file.exists():
        info = json.loads(error_file.read_text())
        error_file.unlink()
        for cls in no_retry:
            if cls.__name__ == info["type"]:
                raise cls(info["message"])
        raise RayError(f"{name} failed in a Ray worker: {info['type']}: {info['message']}")
    return result


def _torch_trainer(entry: Callable[[dict], Any], config: dict, scaling: Any, name: str, storage: str,
                   keep_checkpoints: int | None) -> Any:
    """Ray's TorchTrainer: the scaling section's workers, CPUs and GPU per worker and restarts, checkpoints kept
    under `storage`/`name`, Train's own logging at WARNING."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": int(scaling.cpus_per_worker), **({"GPU": 1} if scaling.use_gpu else {})}
    return TorchTrainer(
        entry,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=int(scaling.num_workers), use_gpu=bool(scaling.use_gpu),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=int(scaling.max_failures)),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )


def _run_in_process(loop: Callable[[dict], Any], config: dict, threads: int) -> None:
    """scaling.use_ray false: the loop in this process as rank 0 of 1, with the worker's thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loop(config)
    finally:
        torch.set_num_threads(before)


def _raise_worker_error(e: BaseException, name: str, passthrough: tuple[type[BaseException], ...]) -> None:
    """Raise the root cause of a failed run when it is one of `passthrough`, else one RayError line naming it."""
    cause = _root_cause(e)
    if isinstance(cause, passthrough):
        raise cause from None
    raise RayError(f"{name} failed in a Ray worker: {type(cause).__name__}: {_one_line(cause)}") from None

