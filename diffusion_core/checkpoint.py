"""Checkpoint folders: safetensors weights + config.json with checksums; safe training state; atomic step dirs.

A model folder holds `model.safetensors`, optional `ema.safetensors`, optional extra files (a model card, provenance)
and `config.json` = {"model": model.config, **extra_config, "checksums": {file: sha256}}; config.json is written
last, so its presence means the files beside it are complete. Weights never go through pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .io import OutputError, atomic_path, atomic_write_json, exchange_paths
from .models import EMA, build_model, unwrap_model
from .storage import local_model_path

MODEL_FILE, EMA_FILE, CONFIG_FILE, TRAINING_STATE_FILE = "model.safetensors", "ema.safetensors", "config.json", \
    "training_state.pt"
STEP_DIR_PATTERN = re.compile(r"^step-(\d{8})$")
RESERVED_FILES = frozenset({MODEL_FILE, EMA_FILE, CONFIG_FILE, TRAINING_STATE_FILE})
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or does not fit its config."""


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """root/step-%08d, the folder save_checkpoint_dir writes for `step`."""
    return Path(root) / f"step-{step:08d}"


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_safetensors(path: Path, module: nn.Module) -> str:
    """Write module's state dict atomically as safetensors; return the file's sha256."""
    # contiguous CPU copies: safetensors rejects strided (channels_last) and shared-storage tensors
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap_model(module).state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
        digest = sha256_file(tmp)
    return digest


def _check_extra_files(extra_files: Mapping[str, str | bytes]) -> None:
    for name, content in extra_files.items():
        if name in RESERVED_FILES or not _EXTRA_NAME.match(name):
            raise ValueError(f"extra file name {name!r} is reserved or not a plain file name; use another name "
                             f"(letters, digits, '.', '_', '-'; not {', '.join(sorted(RESERVED_FILES))})")
        if not isinstance(content, (str, bytes)):
            raise TypeError(f"extra file {name!r} must be str or bytes, got {type(content).__name__}")


def _save_dir(path: Path, model: nn.Module, extra_config: dict, ema_model, state: dict | None,
              extra_files: Mapping[str, str | bytes] | None = None) -> None:
    reserved = {"model", "checksums"} & set(extra_config)
    if reserved:
        raise ValueError(f"extra_config may not contain the reserved keys {sorted(reserved)}")
    _check_extra_files(extra_files or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).unlink(missing_ok=True)  # an old config must not vouch for half-written new weights
    checksums = {MODEL_FILE: _write_safetensors(path / MODEL_FILE, model)}
    if ema_model is not None:
        checksums[EMA_FILE] = _write_safetensors(path / EMA_FILE, ema_model.module if isinstance(ema_model, EMA)
                                                 else ema_model)
    if state is not None:
        save_training_state(path / TRAINING_STATE_FILE, state)
        checksums[TRAINING_STATE_FILE] = sha256_file(path / TRAINING_STATE_FILE)
    for name, content in (extra_files or {}).items():  # not in checksums: a timing in them must not change config.json
        with atomic_path(path / name) as tmp:
            tmp.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    atomic_write_json(path / CONFIG_FILE, {"model": unwrap_model(model).config, **extra_config,
                                           "checksums": checksums})


def save_model_dir(path: str | os.PathLike, model: nn.Module, extra_config: dict | None = None,
                   ema_model: nn.Module | EMA | None = None,
                   extra_files: Mapping[str, str | bytes] | None = None) -> None:
    """Write model.safetensors (+ ema.safetensors), `extra_files` ({file name: text or bytes}, e.g. README.md,
    provenance.json; not listed in the checksums) then config.json into a temp folder beside `path`, then swap it onto
    `path` by renames: a failure (full disk, kill) leaves the previous model folder intact."""
    _check_extra_files(extra_files or {})  # before any work: a bad name is the caller's bug
    _save_swapped(Path(path), model, dict(extra_config or {}), ema_model, None, extra_files)


def _remove_killed_saves(path: Path) -> None:
    """Delete the `.<name>.<8 random chars>.tmp` / `.old` folders that a save of `path` killed part-way left
    beside it."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")
    for p in path.parent.iterdir():
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def _save_swapped(path: Path, model: nn.Module, extra_config: dict, ema_model, state: dict | None,
                  extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """_save_dir into a temp sibling folder, then rename it onto `path` (the old folder moved aside, then removed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_killed_saves(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}; choose a writable output folder") from e
    try:
        _save_dir(tmp, model, extra_config, ema_model, state, extra_files)
        try:
            if path.exists() and exchange_paths(tmp, path):  # one step: `path` is never without a model
                shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
            elif path.exists():  # no RENAME_EXCHANGE here: move the old folder aside so the swap stays a rename
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e} (disk full or folder not writable?)") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder; CheckpointError if the folder or file is missing or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist; run the training stage first "
                              f"or point to an existing checkpoint folder")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} is missing (incomplete checkpoint); re-run the training stage "
                              f"or use an older step folder")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} is not readable JSON ({e}); re-run the training stage") from e


def verify_checksum(path: str | os.PathLike, config: dict, name: str) -> None:
    """CheckpointError unless path/name exists and matches config["checksums"][name]."""
    file = Path(path) / name
    expected = config.get("checksums", {}).get(name)
    if expected is None or not file.is_file():
        raise CheckpointError(f"{file} is missing or not listed in {CONFIG_FILE} checksums; re-run the training stage")
    if sha256_file(file) != expected:
        raise CheckpointError(f"checksum mismatch for {file}: the file is corrupt or was modified; "
                              f"restore it or re-run the training stage")


def load_model_dir(path: str | os.PathLike, use_ema: bool = True,
                   map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode with the EMA weights when present and use_ema, else the raw weights; its config.json).

    `path` may be a storage URL (s3://...) or a folder published to a local root: its latest version is loaded,
    fetched into the local cache first for a URL (diffusion_core.storage)."""
    path = local_model_path(path)
    config = read_config(path)
    name = EMA_FILE if use_ema and EMA_FILE in config.get("checksums", {}) else MODEL_FILE
    verify_checksum(path, config, name)
    try:
        model = build_model(config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE} has a bad 'model' section: {e}") from e
    try:
        tensors = load_file(str(path / name), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / name} is not a readable safetensors file ({' '.join(str(e).split())}); "
                              f"it is corrupt or truncated: restore it or re-run the training stage") from None
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in tensors or tensors[key].shape != value.shape:
            got = tuple(tensors[key].shape) if key in tensors else "missing"
            raise CheckpointError(f"{path / name} does not fit its config: key {key!r} expected shape "
                                  f"{tuple(value.shape)}, got {got}")
    for key in tensors:
        if key not in expected:
            raise CheckpointError(f"{path / name} does not fit its config: unexpected key {key!r}")
    model.load_state_dict(tensors)
    return model.to(map_location).eval(), config


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """torch.save(state) atomically; keep it to tensors and plain Python values so weights_only loading works."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True): a file that needs arbitrary Python objects is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} does not exist; start training from scratch or point "
                              f"to an existing checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} is not a safe training-state file (it needs arbitrary Python objects, "
                              f"refused by weights_only loading); delete it or re-create it with "
                              f"save_training_state") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable training-state file ({e}); it is corrupt") from e


def save_checkpoint_dir(path: str | os.PathLike, model: nn.Module, ema_model: nn.Module | EMA | None,
                        state: dict[str, Any], extra_config: dict | None = None) -> Path:
    """Write weights, training state and config.json into a temp folder, then rename it onto `path` at once."""
    return _save_swapped(Path(path), model, dict(extra_config or {}), ema_model, state)


def verify_checkpoint_dir(path: str | os.PathLike) -> dict:
    """config.json of `path` after checking every file listed in its checksums; CheckpointError otherwise."""
    config = read_config(path)
    for name in config.get("checksums", {}):
        verify_checksum(path, config, name)
    return config


def find_last_good_checkpoint(root: str | os.PathLike) -> Path | None:
    """Newest root/step-%08d folder whose files all pass their checksums, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR_PATTERN.match(p.name)))
    for _, candidate in reversed(steps):
        try:
            verify_checkpoint_dir(candidate)
            return candidate
        except CheckpointError:
            continue
    return None
