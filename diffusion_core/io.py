"""Atomic file output: write to a temporary name in the same folder, fsync, then rename into place.

A process killed (SIGKILL) part-way leaves its temporary behind under a hidden name (`.<name>.<random><suffix>.tmp`)
that no reader opens; the next atomic write into the same folder removes it (stages remove their temp folders).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


class OutputError(RuntimeError):
    """A stage could not write one of its outputs (unwritable folder, full disk)."""


# atomic_path's temporaries: "." + target name + "." + mkstemp's 8 random characters + suffix + ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)*\.tmp")
_STARTED = time.time()
_swept: set[str] = set()


def _forked() -> None:
    """A forked child is a process of its own (a fork server's command, multiprocessing's fork start method): its
    temporaries' age counts from the fork, and it sweeps each folder once itself."""
    global _STARTED
    _STARTED = time.time()
    _swept.clear()


os.register_at_fork(after_in_child=_forked)


def remove_stale_temps(folder: Path) -> None:
    """Delete atomic_path temporaries in `folder` that a writer killed before its rename left behind.

    Once per process and folder (a folder of many outputs is listed once, not once per file), and only files older
    than this module's import, so a temporary that another thread of this process is writing is never touched."""
    key = os.path.realpath(folder)
    if key in _swept:
        return
    _swept.add(key)
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                if _TEMP_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False) and \
                        e.stat(follow_symlinks=False).st_mtime < _STARTED:
                    os.unlink(e.path)
    except FileNotFoundError:
        pass


def remove_stale_dirs(parent: str | os.PathLike, prefix: str) -> None:
    """Delete hidden temp folders `parent/<prefix>*` that a killed stage left (its `finally` never ran)."""
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.glob(f"{prefix}*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staging_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A fresh hidden temp folder `parent/<prefix>*` to build an output in before it is swapped into place
    (`replace_dir`); stale ones a killed run left are removed first, this one on exit whatever happens.
    OutputError (one line) when `parent` cannot be written."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_dirs(parent, prefix)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write into {parent}: {e.strerror or e}; choose a writable folder") from e
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): at every instant each name holds
    either its old or its new content. False where the OS or file system cannot; nothing is changed then."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    On any error the temporary file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}; choose a writable output folder") from e
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e} (disk full or folder not writable?)") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` to produce the file, then rename it onto `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)
