"""Shared stage wrapper: argument parsing and one-line errors (exit code 2) instead of tracebacks."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from typing import Callable, Sequence


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Error types that mean bad input or environment (not a bug): reported as one line."""
    from diffusion_core.checkpoint import CheckpointError
    from diffusion_core.data.errors import DataError
    from diffusion_core.io import OutputError
    from diffusion_core.storage import StorageError
    from diffusion_core.training import NumericalError  # NaN/inf loss (names the step)
    from pipeline.config import ConfigError
    from pipeline.tracking import TrackingError

    errors: list[type[BaseException]] = [ConfigError, DataError, OutputError, TrackingError, CheckpointError,
                                         NumericalError, StorageError, OSError, ValueError]
    from pipeline._ray import RayError  # Ray unreachable or a worker failed (imports no ray itself)

    return (*errors, RayError)


STORAGE_ENV = "DIFFUSION_STORAGE_ROOT"  # overrides project.storage_root (a cluster job's environment sets it)


def storage_root(project) -> str | None:
    """The shared storage root model folders are published under: $DIFFUSION_STORAGE_ROOT, else
    project.storage_root; None: the DVC workspace only."""
    return os.environ.get(STORAGE_ENV) or getattr(project, "storage_root", None) or None


def stage_device(project):
    """The torch.device of a stage that runs a network outside Ray Train: project.device, `auto` being cuda where
    torch sees a GPU, else cpu; ConfigError (one line, naming the setting) for a device this machine lacks."""
    import torch

    from diffusion_core.generation import SamplingError, check_device
    from pipeline.config import ConfigError

    if project.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return check_device(project.device)
    except SamplingError as e:
        raise ConfigError(f"project.{e} (or project.device: auto)") from None


def worker_params(params, sections) -> dict:
    """`params`' sections as JSON for Ray workers, project.storage_root resolved here on the driver: a worker on
    another node does not see the driver's environment (DIFFUSION_STORAGE_ROOT)."""
    import json

    out = json.loads(json.dumps(params.to_dict(*sections)))
    out["project"]["storage_root"] = storage_root(params.project)
    return out


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and getattr(e, "filename", None) and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    return msg


def build_parser(name: str, description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m pipeline.{name}",
        description=description or f"DVC stage '{name}'.",
        epilog="Outputs are written relative to the current directory (run from the repo root, as dvc does).",
    )
    p.add_argument("--params", default="params.yaml", metavar="PATH", help="params file (default: params.yaml)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--verbose", action="store_true",
                   help="let Ray print all of its own messages (by default its known polling noise is filtered)")
    return p


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_stage(
    name: str,
    main_fn: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None = None,
    *,
    description: str | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse `--params PATH` and `--debug`, call `main_fn(args)`; return the exit code.

    Expected errors print `error: <message>` (one line) to stderr and return 2; unexpected ones return 1.
    With `--debug` the full traceback is printed as well.
    """
    parser = build_parser(name, description)
    if add_args is not None:
        add_args(parser)
    args = parser.parse_args(argv)
    if args.verbose:
        from pipeline._ray import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's or `kill`'s stop closes the MLflow run as KILLED too
    try:
        main_fn(args)
        return 0
    except KeyboardInterrupt as e:
        print(f"error: {name} interrupted{f' by {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the whole point: one line per failure
        expected = isinstance(e, _expected_errors())
        if args.debug:
            traceback.print_exc()
        if expected:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"error: unexpected {type(e).__name__} in {name}: {one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
