"""Where a Ray training stage's workers read and write, on one machine or on a cluster without a shared disk.

Without a storage root, every worker runs in the driver's folder (the DVC workspace), as on one machine or a
cluster whose nodes mount that folder. With one (`project.storage_root` / DIFFUSION_STORAGE_ROOT), a worker may
run on a node that has never seen the driver's disk, so nothing goes through it:

    <root>/data/<shards>-<meta sha256[:12]>/  the shards, uploaded once by the driver (content-addressed: equal
                                              meta.json, equal shards) and read by URL (diffusion_core.data)
    <root>/runs/<run>/inputs/<path>/          model folders the workers need (models/autoencoder), per run
    <root>/runs/<run>/outputs/<path>          what rank 0 wrote (model folder, metrics, reports), DONE last

Each worker works in a node-local scratch folder (under its Ray node's session folder); rank 0 uploads its outputs
when it is done, and the driver moves them into the workspace (each file and folder swapped in whole) and removes
the run's folder from the store. Checkpoints reach other nodes through Ray's own storage (<root>/ray_results).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from diffusion_core.data.shards import replace_dir
from diffusion_core.io import atomic_write_bytes

from ._stage import storage_root

DONE = "DONE.json"


def open_run(name: str, project, shard_dir: Path, inputs: tuple[str, ...] = ()) -> dict:
    """The driver's description of the run's workspace for its workers (JSON): the shards to read (a path, or
    a URL once uploaded) and, with a storage root, the run's folder on the store with `inputs` uploaded there."""
    ws = {"root": str(Path.cwd().resolve()), "data": str(shard_dir), "run": None, "inputs": []}
    root = storage_root(project)
    if not root:
        return ws
    from diffusion_core.storage import join, upload_folder, upload_shards

    meta = hashlib.sha256((shard_dir / "meta.json").read_bytes()).hexdigest()[:12]
    ws["data"] = join(root, "data", f"{shard_dir.name}-{meta}")
    if upload_shards(shard_dir, ws["data"]):
        print(f"uploaded {shard_dir}/ to {ws['data']}", flush=True)
    ws["run"] = join(root, "runs", name)
    for rel in inputs:
        upload_folder(rel, join(ws["run"], "inputs", rel), last="config.json")
    ws["inputs"] = list(inputs)
    return ws


def _scratch(ws: dict) -> Path:
    """This node's folder for the run: in the Ray node's session folder (another machine's disk on a cluster;
    a node of its own in tests), else the system temp folder."""
    try:
        import ray._private.worker as ray_worker

        base = Path(ray_worker.global_worker.node.get_session_dir_path())
    except Exception:  # noqa: BLE001 - not in a Ray worker, or Ray moved its internals: any local folder serves
        base = Path(tempfile.gettempdir())
    return base / "diffusion-pipeline" / ws["run"].rstrip("/").rsplit("/", 1)[-1]


def _download_once(url: str, dest: Path) -> None:
    """The folder at `url` as `dest`, downloaded into a temp folder beside it and renamed into place. Ranks on one
    node share their scratch folder: when another rank's copy landed first, that one is kept."""
    from diffusion_core.storage import download_folder

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        download_folder(url, tmp / "d")
        with contextlib.suppress(OSError):
            os.rename(tmp / "d", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def enter(ws: dict) -> str:
    """chdir a worker to its working folder (the driver's, or this node's scratch with the run's inputs fetched);
    returns the folder for MLflow's local store: the driver's where this node sees it, else the scratch."""
    if ws["run"] is None:
        os.chdir(ws["root"])
        return ws["root"]
    from diffusion_core.storage import join

    scratch = _scratch(ws)
    scratch.mkdir(parents=True, exist_ok=True)
    os.chdir(scratch)
    for rel in ws["inputs"]:
        if not (scratch / rel / "config.json").is_file():
            _download_once(join(ws["run"], "inputs", rel), scratch / rel)
    return ws["root"] if Path(ws["root"]).is_dir() else str(scratch)


def send_outputs(ws: dict, paths: tuple[str, ...]) -> None:
    """Rank 0, once done: its outputs (files and folders, relative) to the run's folder on the store, DONE last;
    then its scratch folder is removed. Nothing to do in the driver's folder."""
    if ws["run"] is None:
        return
    from diffusion_core.storage import join, upload_folder

    scratch = Path.cwd()
    with tempfile.TemporaryDirectory(prefix=".outputs.", dir=scratch) as tmp:
        for rel in paths:
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            copy = shutil.copytree if (scratch / rel).is_dir() else shutil.copy2
            copy(scratch / rel, Path(tmp) / rel)
        Path(tmp, DONE).write_text(json.dumps(list(paths)))
        upload_folder(tmp, join(ws["run"], "outputs"), last=DONE)
    os.chdir(ws["root"] if Path(ws["root"]).is_dir() else tempfile.gettempdir())
    shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):  # the parent, once no other run uses it
        scratch.parent.rmdir()


def receive_outputs(ws: dict) -> None:
    """The driver, after the workers ended: rank 0's outputs from the store into the workspace (each swapped in
    whole: a reader sees the old or the new one), then the run's folder on the store is removed."""
    if ws["run"] is None:
        return
    from diffusion_core.storage import download_folder, join, read_bytes, remove

    outputs = join(ws["run"], "outputs")
    paths = json.loads(read_bytes(join(outputs, DONE)))
    with tempfile.TemporaryDirectory(prefix=".outputs.", dir=".") as tmp:
        got = download_folder(outputs, Path(tmp) / "o")
        for rel in paths:
            Path(rel).parent.mkdir(parents=True, exist_ok=True)
            if (got / rel).is_dir():
                replace_dir(got / rel, rel)
            else:
                atomic_write_bytes(rel, (got / rel).read_bytes())
    remove(ws["run"])


def checkpoints_on_store(storage: str, stage: str, run_key: str) -> list[tuple[str, int, str]]:
    """(URL, step, Ray run name) of the checkpoints of `run_key` that Ray keeps under `storage` for runs of `stage`
    (a run that failed or was killed keeps its folder there; the running one's are there too), newest first. With a
    storage root, this is how a resubmitted job, or a worker group Ray restarted, resumes: the node-local
    checkpoints may be on a machine that is gone."""
    import fsspec

    from diffusion_core.storage import join, read_bytes

    fs, root = fsspec.core.url_to_fs(storage)
    found = []
    for path in fs.glob(f"{root.rstrip('/')}/{stage}-*/step-*/config.json"):
        rel = path[len(root.rstrip("/")) + 1:].rsplit("/", 1)[0]  # <run>/step-%08d
        with contextlib.suppress(ValueError, KeyError, FileNotFoundError):
            config = json.loads(read_bytes(join(storage, rel, "config.json")))
            if config.get("run_key") == run_key:
                found.append((join(storage, rel), int(config["training_step"]), rel.split("/")[0]))
    return sorted(found, key=lambda c: -c[1])


def fetch_checkpoint(urls: list[str], ckpt_root: Path) -> tuple[str, Path] | None:
    """(URL, local folder) of the newest of the checkpoints at `urls` (newest first) whose checksums verify,
    downloaded into `ckpt_root/<its step folder>` where the loop's resume finds it; one a kill cut short in its
    upload is skipped. Ranks on one node share the folder: the first download to land is kept. None when none
    verifies."""
    from diffusion_core.checkpoint import CheckpointError, verify_checkpoint_dir

    ckpt_root.mkdir(parents=True, exist_ok=True)
    for url in urls:
        dest = ckpt_root / url.rstrip("/").rsplit("/", 1)[-1]
        if not dest.is_dir():
            _download_once(url, dest)
        try:
            verify_checkpoint_dir(dest)
            return url, dest
        except CheckpointError:
            print(f"checkpoint {url} is incomplete (its upload was cut short); trying the one before", flush=True)
            shutil.rmtree(dest, ignore_errors=True)
    return None
