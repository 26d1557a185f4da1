"""MLflow helpers: one run per stage, rank 0 only; mlflow is imported lazily inside functions.

    with start_run("prepare", params.to_dict("project", "prepare"), params.tracking,
                   experiment=params.project.experiment) as run:
        run.log_metrics({"loss": 0.1}, step=10)
        run.log_image(grid_uint8, "samples.png")
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

from .config import params_hash

HEALTH_TIMEOUT_S = 3.0
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.I)
_URI_USERINFO = re.compile(r"(://)[^/@\s]+@")


class TrackingError(RuntimeError):
    """MLflow cannot be reached or used; the message says what to change."""


def _quiet_env() -> None:
    # never let a dead server stall a stage for minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def redact(value: str) -> str:
    """Strip `user:password@` from URIs."""
    return _URI_USERINFO.sub(r"\1***@", value)


def local_store_uri(root: str | os.PathLike | None = None) -> str:
    """`sqlite:////abs/root/mlflow.db` (absolute so Ray workers in other folders reach the same store)."""
    root = Path(root) if root is not None else Path.cwd()
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def resolve_tracking_uri(cfg: Any = None, root: str | os.PathLike | None = None) -> str:
    """`MLFLOW_TRACKING_URI` env, else `cfg.tracking_uri`, else the local SQLite store;
    relative sqlite paths made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (getattr(cfg, "tracking_uri", None) if cfg is not None else None)
    if not uri:
        return local_store_uri(root)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rel = uri[len("sqlite:///") :]
        base = Path(root) if root is not None else Path.cwd()
        return f"sqlite:///{(base / rel).resolve()}"
    return uri


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """GET `<uri>/health`; raise `TrackingError` (one line) if the server does not answer OK in `timeout` s."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http(s) only, checked by caller
            if r.status != 200:
                raise TrackingError(f"MLflow server {redact(uri)} answered /health with HTTP {r.status}")
    except TrackingError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow server {redact(uri)} is unreachable ({reason}); start it, fix tracking.tracking_uri / "
            f"MLFLOW_TRACKING_URI, set tracking.enabled: false, or set tracking.fallback_local: true"
        ) from None


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """Current commit hash (with `-dirty` when the tree has changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True,
                               timeout=5)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """`{"prepare": {"seed": 0}}` -> `{"prepare.seed": "0"}`; secret-looking keys and URI credentials redacted."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
            continue
        if _SECRET_KEY.search(str(k)):
            out[key] = "***"
            continue
        s = redact(str(v)) if v is not None else "null"
        out[key] = s if len(s) <= 6000 else s[:5997] + "..."
    return out


class NullRun:
    """Stands in for a run when tracking is disabled or on ranks other than 0: every call is a no-op."""

    active = False
    run_id: str | None = None
    tracking_uri: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_image(self, image: Any, artifact_file: str) -> None: ...
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...
    def log_dict(self, obj: Mapping[str, Any], artifact_file: str) -> None: ...


class MlflowRun(NullRun):
    """Thin handle on the active MLflow run."""

    active = True

    def __init__(self, mlflow: Any, run: Any, tracking_uri: str):
        self._mlflow, self._run = mlflow, run
        self.run_id = run.info.run_id
        self.tracking_uri = tracking_uri

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self._mlflow.log_metrics(clean, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = flatten_params(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self._mlflow.log_params(dict(items[i : i + 100]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_image(self, image: Any, artifact_file: str) -> None:
        """`image`: a file path, a PIL image, or a uint8 array H x W [x C]."""
        if isinstance(image, (str, os.PathLike)):
            p = Path(image)
            folder = str(Path(artifact_file).parent) if Path(artifact_file).parent != Path(".") else None
            self._mlflow.log_artifact(str(p), artifact_path=folder)
            return
        try:
            import numpy as np

            if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]
        except ImportError:
            pass
        self._mlflow.log_image(image, artifact_file=artifact_file)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_dict(self, obj: Mapping[str, Any], artifact_file: str) -> None:
        self._mlflow.log_dict(dict(obj), artifact_file)


def _detect_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _process_token(pid: int) -> str | None:
    """`<pid>@<start time>` of a live process (its start time tells a reused pid apart), None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # fields 3.. after (comm)
        return None if fields[0] in "ZX" else f"{pid}@{fields[19]}"  # a zombie is gone; field 22 is starttime
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:  # alive, owned by someone else
        pass
    return str(pid)


def owner_tag() -> str:
    """`host:pid@starttime` of this process: tag `owner` of each run, so a later run can tell a dead one."""
    return f"{socket.gethostname()}:{_process_token(os.getpid())}"


def _owner_is_gone(owner: str) -> bool:
    """True when `owner` (an `owner_tag()`) names a process of this host that no longer runs; other hosts'
    processes cannot be checked from here and count as alive."""
    host, _, token = owner.partition(":")
    if host != socket.gethostname() or not token:
        return False
    try:
        pid = int(token.split("@")[0])
    except ValueError:
        return False
    return _process_token(pid) != token


def close_dead_runs(mlflow: Any, experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the RUNNING runs of `stage` whose process (tag `owner`) died without closing them (kill -9, a
    lost node, a Ray worker restart); returns their ids. A live run, or one of another host, is left alone."""
    client = mlflow.MlflowClient()
    filt = f"tags.stage = '{stage}' and attributes.status = 'RUNNING'"
    try:
        running = client.search_runs([experiment_id], filter_string=filt, max_results=100)
    except Exception:  # noqa: BLE001 - housekeeping: a store that cannot search must not stop the stage
        return []
    closed = []
    for r in running:
        owner = r.data.tags.get("owner", "")
        if owner and _owner_is_gone(owner):
            client.set_tag(r.info.run_id, "killed_reason", f"its process ({owner}) ended without closing the run")
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
    return closed


def _experiment_id(mlflow: Any, name: str, uri: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted in {redact(uri)}; "
                                "restore it or set project.experiment")
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # keep artifacts beside the SQLite file, not in whatever folder the stage ran from
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - a concurrent stage may have created it first
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def start_run(
    stage: str,
    params: Mapping[str, Any],
    cfg: Any = None,
    rank: int | None = None,
    *,
    experiment: str | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
    root: str | os.PathLike | None = None,
    continues: str | None = None,
) -> Iterator[NullRun]:
    """Open one MLflow run named `stage` (a `NullRun` when disabled or rank != 0).

    params: the sections the stage read (`{"prepare": {...}}`), logged flattened and hashed into tag
    `params_hash`. cfg: a `TrackingConfig`. experiment: defaults to `params["project"]["experiment"]`.
    An exception inside the block marks the run FAILED (KeyboardInterrupt: KILLED) and propagates. Runs of
    `stage` that a dead process left RUNNING are marked KILLED first (`close_dead_runs`). continues: the id of the
    run this one resumes (e.g. from its checkpoint), tagged `continues_run`.

    One generator owns the whole lifecycle: its try/finally ends the run with the right status.
    """
    rank = _detect_rank() if rank is None else rank
    enabled = getattr(cfg, "enabled", True) if cfg is not None else True
    if not enabled or rank != 0:
        yield NullRun()
        return
    _quiet_env()
    uri = _reachable_uri(cfg, root)
    if experiment is None:
        project = params.get("project", {}) if isinstance(params, Mapping) else {}
        experiment = project.get("experiment") or project.get("name") or "Default"
    try:
        import mlflow
    except ImportError as e:  # pragma: no cover - mlflow is a declared dependency
        raise TrackingError(f"mlflow is not installed ({e}); "
                            "install the project or set tracking.enabled: false") from None
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would make every later run in this process
    # (tests, notebooks, sweeps over folders) follow this store: put the caller's environment back afterwards
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    run, closed = _open_run(mlflow, uri, experiment, stage, nested, env_before)
    handle = MlflowRun(mlflow, run, uri)
    status = "FINISHED"
    try:
        commit = git_commit()
        link = {"continues_run": continues} if continues else {}
        handle.set_tags(
            {"stage": stage, "git_commit": commit, "mlflow.source.git.commit": commit,
             "params_hash": params_hash(dict(params)), "owner": owner_tag(), **link, **(tags or {})}
        )
        if closed:
            print(f"{stage}: marked MLflow run(s) {', '.join(closed)} KILLED (their process had died)", flush=True)
        handle.log_params(params)
        yield handle
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        mlflow.end_run(status=status)
        _restore_env("MLFLOW_TRACKING_URI", env_before)


def _reachable_uri(cfg: Any, root: str | os.PathLike | None) -> str:
    """The tracking URI to log to: the one params or the environment name, or the local store when that server
    does not answer and tracking.fallback_local is on (with a warning); else TrackingError."""
    uri = resolve_tracking_uri(cfg, root)
    if uri.startswith(("http://", "https://")):
        try:
            check_server(uri)
        except TrackingError as e:
            if not getattr(cfg, "fallback_local", False):
                raise
            uri = local_store_uri(root)
            print(f"warning: {e}; logging to {uri} instead (tracking.fallback_local)", file=sys.stderr)
    return uri


def _open_run(mlflow, uri: str, experiment: str, stage: str, nested: bool, env_before: str | None):
    """(the started run, ids of this stage's runs that a dead process left RUNNING and are now KILLED); any
    failure puts MLFLOW_TRACKING_URI back and is one TrackingError naming the store."""
    mlflow.set_tracking_uri(uri)
    try:
        exp_id = _experiment_id(mlflow, experiment, uri)
        closed = close_dead_runs(mlflow, exp_id, stage)
        return mlflow.start_run(run_name=stage, experiment_id=exp_id, nested=nested), closed
    except TrackingError:
        _restore_env("MLFLOW_TRACKING_URI", env_before)
        raise
    except Exception as e:  # noqa: BLE001 - MlflowException, sqlalchemy, requests errors all mean the same
        _restore_env("MLFLOW_TRACKING_URI", env_before)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrackingError(f"cannot open an MLflow run at {redact(uri)}: {msg}") from None
