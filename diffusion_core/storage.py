"""Model folders on shared storage: an object store (`s3://bucket/prefix`, `gs://...`, any fsspec URL) or a path.

A published folder at URL is a set of versions and a pointer::

    URL/v-20261206T051203Z-3f9a1c2e/   the files of one local model folder (config.json, weights, card, ...)
    URL/LATEST                         the name of the newest complete version (one small object)

`publish_dir` uploads every file of a new version first and writes LATEST last, in one PUT: object stores have no
rename, but a single object is replaced atomically, so a reader sees the old version or the new one, never a mix,
and a publish killed midway leaves a version that no pointer names (the next publish removes it). `fetch_dir`
downloads the version LATEST names into a local cache folder (temp folder, then rename) keyed by URL and version:
a second load of the same version is local, and a newer version is fetched anew.

Credentials and endpoints come from the environment as the store's own client reads them (for S3:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for MinIO/moto/Ceph); s3:// needs `s3fs`
(`pip install "diffusion-pipeline[s3]"`). The library imports fsspec only when a URL is used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from pathlib import Path

POINTER = "LATEST"
_VERSION = re.compile(r"v-\d{8}T\d{6}Z-[0-9a-f]{8}")


class StorageError(RuntimeError):
    """A storage URL could not be read or written (missing client library, no such folder, no access)."""


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` other than file:// (those are read through fsspec); plain paths are local."""
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def join(url: str, *parts: str) -> str:
    """`url` with `parts` appended by '/' (no normalisation of the scheme or bucket)."""
    return posixpath.join(url.rstrip("/"), *[p.strip("/") for p in parts])


def _fs(url: str):
    """(fsspec filesystem, path inside it) of `url`, with a one-line error where its client is not installed."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        raise StorageError(f"{url}: reading {scheme}:// needs its fsspec client ({' '.join(str(e).split())}); "
                           f"for s3:// install s3fs (pip install 'diffusion-pipeline[s3]')") from None
    except ValueError as e:
        raise StorageError(f"{url}: not a storage URL fsspec knows ({e})") from None


def _fail(url: str, what: str, e: Exception) -> StorageError:
    msg = " ".join(str(e).split()) or type(e).__name__
    return StorageError(f"cannot {what} {url}: {msg}; check the URL, the credentials and the endpoint "
                        f"(AWS_ENDPOINT_URL for an S3-compatible server)")


def publish_dir(local: str | os.PathLike, url: str) -> str:
    """Upload the model folder `local` as a new version of `url` and point LATEST at it; returns the version name.

    Older versions than the previous one are removed after the pointer moved (the previous one stays for readers
    that resolved it a moment ago), as are versions no pointer names (a publish killed before its pointer)."""
    local = Path(local)
    if not (local / "config.json").is_file():
        raise StorageError(f"{local} is not a model folder (no config.json): nothing to publish to {url}")
    fs, root = _fs(url)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    version = f"v-{stamp}-{uuid.uuid4().hex[:8]}"
    try:
        previous = _read_pointer(fs, root)
        files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith("."))
        for f in sorted(files, key=lambda p: p.name == "config.json"):  # config.json last within the version
            target = posixpath.join(root, version, f.relative_to(local).as_posix())
            if _is_local(fs):
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.put_file(str(f), target)
        _write_pointer(fs, root, version)
    except StorageError:
        raise
    except Exception as e:  # the client's own errors (botocore, OSError, PermissionError) differ by store
        raise _fail(url, "publish to", e) from e
    for name in _versions(fs, root):
        if name not in (version, previous):
            fs.rm(posixpath.join(root, name), recursive=True)
    return version


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _write_pointer(fs, root: str, version: str) -> None:
    """One PUT on an object store (atomic there); on a local or mounted path a temp file renamed into place."""
    if _is_local(fs):
        from .io import atomic_write_text

        atomic_write_text(posixpath.join(root, POINTER), version)
    else:
        fs.pipe_file(posixpath.join(root, POINTER), version.encode())


def _read_pointer(fs, root: str) -> str | None:
    try:
        name = fs.cat_file(posixpath.join(root, POINTER)).decode().strip()
    except FileNotFoundError:
        return None
    if not _VERSION.fullmatch(name):
        raise StorageError(f"{root}/{POINTER} names {name!r}, not a version folder: republish the model")
    return name


def _versions(fs, root: str) -> list[str]:
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)
                      if _VERSION.fullmatch(posixpath.basename(p.rstrip("/"))))
    except FileNotFoundError:
        return []


def latest_version(url: str) -> str | None:
    """The version LATEST names; None for a plain folder (config.json at the URL itself, e.g. copied by hand)."""
    fs, root = _fs(url)
    try:
        name = _read_pointer(fs, root)
        if name is None and not fs.exists(posixpath.join(root, "config.json")):
            raise StorageError(f"{url} holds no model (neither {POINTER} nor config.json): publish one there "
                               f"(project.storage_root of a pipeline run) or check the URL")
    except StorageError:
        raise
    except Exception as e:
        raise _fail(url, "read", e) from e
    return name


def default_cache() -> Path:
    """$DIFFUSION_CACHE, else $XDG_CACHE_HOME/diffusion-pipeline, else ~/.cache/diffusion-pipeline."""
    if os.environ.get("DIFFUSION_CACHE"):
        return Path(os.environ["DIFFUSION_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusion-pipeline"


def fetch_dir(url: str, cache: str | os.PathLike | None = None) -> Path:
    """Local copy of the model folder at `url` (its LATEST version), downloaded once per version into `cache`."""
    version = latest_version(url)
    key = hashlib.sha256(f"{url.rstrip('/')}\n{version or ''}".encode()).hexdigest()[:16]
    base = Path(cache) if cache is not None else default_cache()
    dest = base / "models" / f"{posixpath.basename(url.rstrip('/'))}-{key}"
    if version and (dest / "config.json").is_file():
        return dest  # a version never changes once its pointer names it
    base.joinpath("models").mkdir(parents=True, exist_ok=True)
    src = join(url, version) if version else url
    download_folder(src, dest, skip=lambda rel: rel == POINTER or rel.startswith("v-"))
    return dest


def download_folder(url: str, dest: str | os.PathLike, skip=lambda rel: False) -> Path:
    """Every file under `url` (but those whose relative path `skip` names) into the local folder `dest`, swapped in
    whole: downloaded into a temp folder beside it, then renamed (an older `dest` is replaced)."""
    fs, src = _fs(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for path in fs.find(src):
            rel = posixpath.relpath(path, src)
            if skip(rel):
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(tmp / rel))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _fail(url, "download", e) from e
    return dest


def local_model_path(path: str | os.PathLike) -> Path:
    """The local folder to load for `path`: a URL's latest version fetched into the cache, the version LATEST
    names in a folder published to a local or mounted root, else `path` itself."""
    if is_url(path):
        return fetch_dir(os.fspath(path))
    path = Path(path)
    if (path / POINTER).is_file() and not (path / "config.json").exists():
        return path / _read_pointer(_fs(str(path))[0], str(path))
    return path


def read_bytes(url: str) -> bytes:
    """The whole object at `url` (a shard, a meta.json). FileNotFoundError where there is none; StorageError for
    the store's other failures (no client, no access, no endpoint)."""
    fs, path = _fs(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise _fail(url, "read", e) from e


def remove(url: str) -> None:
    """Delete everything under `url` (nothing there: nothing to do)."""
    fs, path = _fs(url)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    except Exception as e:
        raise _fail(url, "remove", e) from e


def upload_folder(local: str | os.PathLike, url: str, last: str | None = None) -> None:
    """Copy every file under the local folder `local` to `url`, the file named `last` (relative) after all others:
    a reader that finds it finds everything beside it. It is written atomically (one PUT on an object store; temp
    file then rename on a path)."""
    local = Path(local)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.relative_to(local).as_posix() == last)
    fs, root = _fs(url)
    try:
        for f in files:
            target = posixpath.join(root, f.relative_to(local).as_posix())
            if _is_local(fs):  # a mounted path: folders are made, and the last file goes in by rename
                fs.makedirs(posixpath.dirname(target), exist_ok=True)
                if f.relative_to(local).as_posix() == last:
                    from .io import atomic_write_bytes

                    atomic_write_bytes(target, f.read_bytes())
                    continue
            fs.put_file(str(f), target)
    except Exception as e:
        raise _fail(url, "upload to", e) from e


def upload_shards(local: str | os.PathLike, url: str) -> bool:
    """Copy the shard folder `local` (tars + meta.json) to `url`, meta.json last. A folder whose meta.json is already
    there byte for byte is not uploaded again (callers name `url` by the meta's hash, so equal meta means equal
    shards, whose sha256 the meta holds). Returns whether it uploaded."""
    local = Path(local)
    if not (local / "meta.json").is_file():
        raise StorageError(f"{local} has no meta.json: rerun the stage that writes these shards")
    fs, root = _fs(url)
    try:
        there = fs.cat_file(posixpath.join(root, "meta.json"))
    except FileNotFoundError:
        there = None
    except Exception as e:
        raise _fail(url, "read", e) from e
    if there == (local / "meta.json").read_bytes():
        return False
    upload_folder(local, url, last="meta.json")
    return True


def find_beside(url: str, relative: str) -> str | None:
    """`relative` (a folder a model recorded, e.g. models/autoencoder) resolved against `url`'s parent chain
    on the same store: the first candidate that holds a model, or None. An absolute local path recorded on the
    machine that trained is looked up by its last name (models/autoencoder -> autoencoder)."""
    fs, root = _fs(url)
    scheme = url.split("://", 1)[0] + "://"
    relative = relative if not posixpath.isabs(relative) else posixpath.basename(relative.rstrip("/"))
    parent = root.rstrip("/")
    while parent and parent != posixpath.dirname(parent):
        candidate = posixpath.join(parent, relative)
        if fs.exists(posixpath.join(candidate, POINTER)) or fs.exists(posixpath.join(candidate, "config.json")):
            return scheme + candidate
        parent = posixpath.dirname(parent)
    return None


__all__ = ["POINTER", "StorageError", "default_cache", "download_folder", "fetch_dir", "find_beside", "is_url", "join",
           "latest_version", "local_model_path", "publish_dir", "read_bytes", "remove", "upload_folder",
           "upload_shards"]
