"""Model folders on shared storage (diffusion_core.storage) against a real S3-compatible server on 127.0.0.1
(moto's server mode) and a local root: publish, load by URL, versions and the pointer, a publish killed midway,
the CLI's --model URL, and a training stage publishing under project.storage_root."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion_core.checkpoint import load_model_dir
from diffusion_core.model_folders import load_diffusion_dir
from diffusion_core.storage import POINTER, StorageError, fetch_dir, latest_version, publish_dir

from . import zygote
from .stages import ROOT, params_raw
from .tiny_models import make_diffusion_dir, make_latent_dir


def _weights(path) -> dict[str, torch.Tensor]:
    model, _ = load_model_dir(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_publish_then_load_by_url_is_bitwise_the_folder(where, s3, tmp_path):
    root = s3 if where == "s3" else str(tmp_path / "shared")
    local = make_diffusion_dir(tmp_path / "m", num_classes=3)
    url = f"{root}/run1/models/diffusion"
    version = publish_dir(local, url)
    assert latest_version(url) == version
    assert _same(_weights(url), _weights(local))
    fetched = fetch_dir(url)
    assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in local.iterdir())
    assert load_diffusion_dir(url).config == load_diffusion_dir(local).config


def test_republish_moves_the_pointer_and_keeps_one_previous_version(s3, tmp_path):
    import s3fs

    url = f"{s3}/models/diffusion"
    first = make_diffusion_dir(tmp_path / "a", seed=0)
    second = make_diffusion_dir(tmp_path / "b", seed=1)
    v1 = publish_dir(first, url)
    assert _same(_weights(url), _weights(first))
    v2 = publish_dir(second, url)
    v3 = publish_dir(second, url)
    assert len({v1, v2, v3}) == 3 and latest_version(url) == v3
    assert _same(_weights(url), _weights(second))  # the cache is keyed by version: the new one is fetched
    listed = {p.rsplit("/", 1)[1] for p in s3fs.S3FileSystem().ls(url.removeprefix("s3://"))}
    assert listed == {POINTER, v2, v3}, "the version before the newest stays for readers that just resolved it"


def test_a_publish_killed_midway_leaves_the_previous_model(s3, tmp_path, monkeypatch):
    import s3fs

    url = f"{s3}/models/diffusion"
    good = make_diffusion_dir(tmp_path / "good", seed=0)
    publish_dir(good, url)
    calls = {"n": 0}
    real_put = s3fs.S3FileSystem._put_file

    async def dying_put(self, lpath, rpath, *a, **k):  # the connection drops at the second file of the new version
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("connection reset by peer")
        return await real_put(self, lpath, rpath, *a, **k)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", dying_put)
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec binds the sync wrappers when an instance is made
    with pytest.raises(StorageError, match=r"cannot publish to s3://.*connection reset"):
        publish_dir(make_diffusion_dir(tmp_path / "new", seed=5), url)
    assert calls["n"] == 2
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", real_put)
    s3fs.S3FileSystem.clear_instance_cache()
    assert _same(_weights(url), _weights(good)), "readers still get the last complete version"
    v = publish_dir(good, url)  # the next publish removes the orphan of the killed one
    listed = {p.rsplit("/", 1)[1] for p in s3fs.S3FileSystem().ls(url.removeprefix("s3://"))}
    assert len(listed) == 3 and v in listed  # LATEST, the new version, the previous complete one


def test_latent_model_finds_its_autoencoder_beside_it_on_the_store(s3, tmp_path):
    local = make_latent_dir(tmp_path / "models")
    publish_dir(local.parent / "autoencoder", f"{s3}/run/models/autoencoder")
    publish_dir(local, f"{s3}/run/models/diffusion")
    shutil.rmtree(tmp_path / "models")  # nothing left on this machine: both must come from the store
    bundle = load_diffusion_dir(f"{s3}/run/models/diffusion")
    assert bundle.decoder is not None
    z = torch.randn(1, *bundle.config["data"]["shape"], generator=torch.Generator().manual_seed(0))
    assert bundle.decoder(z).shape == (1, 1, 8, 8)


def test_missing_or_unreadable_urls_give_one_line_errors(s3, tmp_path, monkeypatch):
    with pytest.raises(StorageError, match=r"s3://.*/nowhere holds no model .*LATEST"):
        load_model_dir(f"{s3}/nowhere")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would back off for seconds first
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match=r"cannot read s3://.*AWS_ENDPOINT_URL"):
        latest_version(f"{s3}/models/diffusion")
    with pytest.raises(StorageError, match="not a model folder"):
        publish_dir(tmp_path, f"{s3}/x")


def test_cli_samples_from_a_url_as_from_the_folder(s3, tmp_path):
    local = make_diffusion_dir(tmp_path / "m", num_classes=3)
    url = f"{s3}/models/diffusion"
    publish_dir(local, url)
    import os

    outs = {}
    for name, model in (("url", url), ("local", str(local))):
        out = tmp_path / name
        res = zygote.run([sys.executable, "-m", "pipeline.cli", "sample", "--model", model, "--num", "4",
                          "--steps", "3", "--seed", "7", "--out", str(out), "--no-progress"],
                         cwd=ROOT, env=os.environ.copy(), timeout=900)
        assert res.returncode == 0, res.stderr[-2000:]
        with np.load(out / "samples.npz") as z:
            outs[name] = z["images"]
    assert np.array_equal(outs["url"], outs["local"])
    res = zygote.run([sys.executable, "-m", "pipeline.cli", "sample", "--model", f"{s3}/missing", "--num", "1",
                      "--out", str(tmp_path / "x")], cwd=ROOT, env=os.environ.copy(), timeout=900)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "holds no model" in res.stderr


@pytest.mark.slow
def test_a_training_stage_publishes_under_the_storage_root(s3, prepared, tmp_path):
    """DIFFUSION_STORAGE_ROOT (a cluster job's environment) set: the stage writes its folder to the DVC workspace as
    before and publishes the same folder as <root>/models/feature_net, which loads by URL to the same weights."""
    import os

    from tests.stages import stage_env

    work = tmp_path / "work"
    shutil.copytree(prepared, work)
    env = {**stage_env(), "DIFFUSION_STORAGE_ROOT": f"{s3}/run"}
    res = zygote.run([sys.executable, "-m", "pipeline.train_feature_net", "--params", "tiny.yaml"], cwd=work,
                     env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    url = f"{s3}/run/models/feature_net"
    assert f"published models/feature_net/ to {url} (version v-" in res.stdout
    assert _same(_weights(url), _weights(work / "models" / "feature_net"))
    fetched = fetch_dir(url)
    assert (fetched / "provenance.json").read_bytes() == (work / "models/feature_net/provenance.json").read_bytes()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in (fetched / "provenance.json").read_text()


@pytest.mark.slow
def test_dvc_remote_on_the_store_brings_a_runs_outputs_to_another_checkout(s3, tmp_path):
    """README's cluster walkthrough: the job's checkout pushes its DVC outputs to a remote on the same store, the
    user's checkout of the same commit pulls them: byte-identical files, no copy by hand."""
    from tests.stages import stage_env

    env = {**stage_env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}

    def run(cwd, *cmd):
        res = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{cmd}: {res.stdout[-1500:]}{res.stderr[-1500:]}"
        return res.stdout

    job = tmp_path / "job"
    job.mkdir()
    run(job, "git", "init", "-q")
    run(job, "dvc", "init", "-q")
    (job / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python -c \"import os; os.makedirs('models/m', exist_ok=True); "
        "open('models/m/w.bin', 'wb').write(os.urandom(4096))\"\n    outs:\n      - models/m\n")
    run(job, "dvc", "repro", "-q")
    run(job, "dvc", "remote", "add", "-d", "store", f"{s3}/dvc")  # endpoint and keys: the environment's
    run(job, "git", "add", "-A")
    run(job, "git", "commit", "-qm", "run")
    run(job, "dvc", "push", "-q")
    user = tmp_path / "user"
    run(tmp_path, "git", "clone", "-q", str(job), str(user))
    assert not (user / "models/m").exists()
    run(user, "dvc", "pull", "-q")
    assert (user / "models/m/w.bin").read_bytes() == (job / "models/m/w.bin").read_bytes()


@pytest.mark.slow
def test_team_mlflow_server_keeps_artifacts_on_the_store(s3, prepared, tmp_path):
    """README's team set-up: `mlflow server` with a SQL backend and --artifacts-destination on the object store;
    a stage logs its run and model through it, the model's files land in the bucket, and a client elsewhere loads
    the model back through the server."""
    import os
    import socket
    import time
    import urllib.request

    import s3fs
    import yaml

    from tests.stages import stage_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    server = subprocess.Popen(["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{server_dir}/mlflow.db",
                               "--artifacts-destination", f"{s3}/mlflow"], cwd=server_dir,
                              env={**stage_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # as README's
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not come up"
                time.sleep(1)
        work = tmp_path / "work"
        shutil.copytree(prepared, work)
        raw = yaml.safe_load((work / "tiny.yaml").read_text())
        raw["tracking"]["enabled"] = True
        (work / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        # the stage's machine knows the server only; the bucket's credentials stay with the server
        env = {k: v for k, v in stage_env().items() if not k.startswith("AWS_")}
        res = subprocess.run([sys.executable, "-m", "pipeline.train_feature_net", "--params", "tiny.yaml"],
                             cwd=work, env={**env, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        stored = s3fs.S3FileSystem().find(f"{s3.removeprefix('s3://')}/mlflow")
        assert any(p.endswith("/model.safetensors") for p in stored), stored[:20]
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name(raw["project"]["experiment"]).experiment_id])
        assert [r.info.run_name for r in runs] == ["train_feature_net"] and runs[0].info.status == "FINISHED"
        mlflow.set_tracking_uri(uri)
        try:
            model = mlflow.pyfunc.load_model(f"runs:/{runs[0].info.run_id}/model")
        finally:
            mlflow.set_tracking_uri(None)
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        assert model.metadata.run_id == runs[0].info.run_id
    finally:
        _stop_group(server)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL if it has not exited 30 s later (a busy machine's gunicorn can lag)."""
    import os
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_shards_read_from_a_url_are_the_local_shards(s3, prepared):
    """upload_shards puts a shard folder on the store, meta.json last; ShardDataset and load_split read it by URL
    to the same samples, in the same rank split, as from the local folder; a second upload of the same shards
    writes nothing, and a shard missing on the store is a one-line DataError naming it."""
    from diffusion_core.data import DataError, ShardDataset, load_split
    from diffusion_core.storage import remove, upload_shards

    local, url = prepared / "data/shards", f"{s3}/data/shards-x"
    assert upload_shards(local, url) and not upload_shards(local, url)
    for split in ("train", "test"):
        x_url, y_url = load_split(url, split, verify_checksums=True)
        x_loc, y_loc = load_split(local, split)
        assert torch.equal(x_url, x_loc) and torch.equal(y_url, y_loc)
    got = [(x, y) for x, y in ShardDataset(url, "train", rank=1, world_size=2, verify_checksums=True)]
    want = [(x, y) for x, y in ShardDataset(local, "train", rank=1, world_size=2)]
    assert len(got) == len(want) > 0 and all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(got, want))
    remove(f"{url}/train-000001.tar")
    with pytest.raises(DataError, match=r"shard s3://.*/train-000001.tar is missing"):
        load_split(url, "train")


def _store_checkpoint(store, run: str, step: int, key: str) -> None:
    """A checkpoint folder as checkpoint.py writes one (files + checksums) under a Ray run on the store."""
    import hashlib
    import json

    d = store / run / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "w.bin").write_bytes(b"step %d" % step)
    (d / "config.json").write_text(json.dumps({"run_key": key, "training_step": step, "mlflow_run_id": f"r{step}",
                                               "checksums": {"w.bin": hashlib.sha256(b"step %d" % step).hexdigest()}}))


def test_a_resubmitted_run_finds_the_newest_checkpoint_of_its_params_on_the_store(tmp_path):
    """pipeline/workspace: among the Ray runs an earlier failed job left on the store, the checkpoints whose
    config.json has this run_key (not another params' newer one, not another stage's), newest first; the newest
    that verifies is fetched, one cut short in its upload is skipped."""
    import json

    from pipeline.workspace import checkpoints_on_store, fetch_checkpoint

    store = tmp_path / "ray_results"
    for run, step, key in (("train_diffusion-a", 10, "k1"), ("train_diffusion-a", 20, "k1"),
                           ("train_diffusion-b", 30, "k1"), ("train_diffusion-c", 50, "k2"),
                           ("train_classifier-d", 90, "k1")):
        _store_checkpoint(store, run, step, key)
    (store / "train_diffusion-b/step-00000030/w.bin").write_bytes(b"cut")  # an upload cut short
    found = checkpoints_on_store(str(store), "train_diffusion", "k1")
    assert [(step, run) for _, step, run in found] == [(30, "train_diffusion-b"), (20, "train_diffusion-a"),
                                                       (10, "train_diffusion-a")]
    assert found[0][0] == f"{store}/train_diffusion-b/step-00000030"
    assert checkpoints_on_store(str(store), "train_diffusion", "k3") == []
    url, got = fetch_checkpoint([url for url, _, _ in found], tmp_path / "ckpt")
    assert url == found[1][0] and got == tmp_path / "ckpt/step-00000020"
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-00000020"]  # the broken copy is not kept
    assert json.loads((got / "config.json").read_text())["training_step"] == 20


@pytest.mark.parametrize("earlier_step, says", [
    (10, "workers restarted by Ray; resuming from its checkpoint at step 20"),  # its own run's is the newest
    (30, "resuming from {store}/train_diffusion-before/step-00000030")])  # an earlier job's is newer
def test_a_restarted_group_that_ray_gives_no_checkpoint_resumes_from_the_store(tmp_path, monkeypatch, capsys,
                                                                               earlier_step, says):
    """Ray hands a restarted worker group only the checkpoints its controller had registered, on its next poll of
    the workers: a group restarted before that gets none. With a storage root the group still resumes, from the
    newest checkpoint of its run key on the store: its own run's, or an earlier job's when that one is newer."""
    import json

    from pipeline import training_stage
    from pipeline.train_diffusion import STAGE

    store = tmp_path / "ray_results"
    _store_checkpoint(store, "train_diffusion-now", 10, "k1")
    _store_checkpoint(store, "train_diffusion-now", 20, "k1")
    _store_checkpoint(store, "train_diffusion-before", earlier_step, "k1")
    _store_checkpoint(store, "train_diffusion-other", 90, "k2")  # other params: never

    class Trainer:  # what _resume asks of the trainer
        step = 0

        def load_checkpoint(self, path):
            self.loaded, self.step = path, json.loads((path / "config.json").read_text())["training_step"]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(training_stage, "latest_ray_checkpoint", lambda: None)
    config = training_stage.WorkerConfig(params=params_raw({"train_diffusion": {"steps": 80}}), ws={},
                                         data_checksums={}, input_models=None, ray_storage=str(store),
                                         ray_run="train_diffusion-now", run_key="k1", store_resume=True)
    worker = training_stage.Worker(STAGE, None, config, rank=0, world=1, tracking_root="")
    trainer = Trainer()
    newest = max(20, earlier_step)
    assert worker.resume(trainer) == f"r{newest}"
    assert trainer.step == newest and trainer.loaded.name == f"step-{newest:08d}"
    assert says.format(store=store) in capsys.readouterr().out
