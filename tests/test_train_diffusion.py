"""Stage train_diffusion on configs/tiny.yaml in tmp dirs: kill -9 and resume, interrupted checkpoint writes,
sampling from models/diffusion alone, bitwise determinism and exact resume, NaN -> one-line error, a `ray start --head`
as the README starts it and a local run beside it. Ray DDP (disjoint data, identical replicas) through a lost worker
and a lost job: tests/test_cluster.py."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_core.checkpoint import find_last_good_checkpoint, verify_checkpoint_dir
from diffusion_core.model_folders import load_diffusion_dir
from diffusion_core.samplers import SamplingSpec, sample
from pipeline import train_diffusion

from .stages import ROOT, TINY, dashboard_answers, group_pids, listening_ips, ray_token_env, stage_env

CKPTS = Path("checkpoints") / "train_diffusion"
_env = stage_env  # the `prepared` folder (tiny.yaml's data) is the session fixture of conftest.py


def _workdir(prepared: Path, dest: Path, tracking: bool = False, **train) -> Path:
    """dest/ with the prepared data and tiny.yaml (train_diffusion keys overridden; `scaling` defaults to two Ray
    Train workers, tiny.yaml's is in-process); returns dest."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(prepared / "data", dest / "data")
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["enabled"] = tracking
    scaling = train.pop("scaling", RAY_WORKERS)
    raw["train_diffusion"].update(train)
    raw["train_diffusion"]["scaling"].update(scaling)
    (dest / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


IN_PROCESS = {"num_workers": 1, "use_ray": False}
RAY_WORKERS = {"num_workers": 2, "use_ray": True}


def _main_in(cwd: Path, monkeypatch, *argv: str) -> int:
    monkeypatch.chdir(cwd)
    return train_diffusion.main(["--params", "tiny.yaml", *argv])


def _steps(cwd: Path) -> list[int]:
    return [h["step"] for h in json.loads((cwd / "reports" / "train_diffusion_loss.json").read_text())]


# ----------------------------------------------------------------------------------------------- Ray, 2 workers


def _ckpt_steps(cwd: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (cwd / CKPTS).glob("step-*/config.json"))


def _cmd(p) -> str:
    try:
        return " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - a process that just ended
        return ""


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 240, every: float = 0.05) -> None:
    """Poll cond every `every` seconds until it holds; fail if proc ended first or the time ran out."""
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"training ended before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(every)


def _start_training(cwd: Path) -> tuple[subprocess.Popen, list[str]]:
    """The stage as its own process group; its stdout lines are collected in the returned list as they come."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "pipeline.train_diffusion", "--params", "tiny.yaml"], cwd=cwd,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _last_logged_step(lines: list[str]) -> int:
    steps = [int(m.group(1)) for line in list(lines) if (m := re.match(r"train_diffusion: step (\d+)/", line))]
    return max(steps, default=0)


@pytest.mark.slow
def test_kill_9_at_three_random_points_then_resume_to_the_end(prepared, tmp_path):
    """`kill -9` of the stage's process group at three random steps (seeded), each strictly after the first
    checkpoint and after the checkpoint the previous kill left; each rerun says it resumes from the newest complete
    step folder; the last run ends at `steps` with one gap-free loss curve and a complete, loadable model."""
    steps, every = 60, 5
    cwd = _workdir(prepared, tmp_path / "w", steps=steps, checkpoint_every=every, log_every=1, sample_every=0,
                   keep_checkpoints=2, scaling=IN_PROCESS)
    rng = random.Random(20261130)
    good, killed_at = 0, []
    proc, lines = _start_training(cwd)
    for _ in range(3):
        try:
            target = rng.randint(good + every + 1, good + 2 * every + 2)  # a new checkpoint is written first
            _wait_for(lambda: _last_logged_step(lines) >= target, proc, f"step {target}", timeout=120)
            time.sleep(rng.uniform(0, 0.1))  # anywhere in a step, a checkpoint write included
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reached = _last_logged_step(lines)
        assert proc.returncode == -signal.SIGKILL and target <= reached < steps
        # independent of the product's own search: step folders are renamed into place complete, config.json last
        complete = _ckpt_steps(cwd)
        newest = complete[-1]  # (an older folder may be half-pruned; readers skip it by its checksums)
        assert verify_checkpoint_dir(cwd / CKPTS / f"step-{newest:08d}")["training_step"] == newest
        # every checkpoint before the last logged step was done; none can be past it
        assert every * ((reached - 1) // every) <= newest <= reached and newest > good
        killed_at.append((target, reached, newest))
        good = newest
        proc, lines = _start_training(cwd)  # the next round's run (the last one is left to finish)
        _wait_for(lambda: any("resuming from" in line for line in list(lines)), proc, "the resume line", timeout=120)
        resumed = next(line for line in list(lines) if "resuming from" in line).strip()
        assert resumed == f"train_diffusion: resuming from {CKPTS}/step-{good:08d} (step {good} of {steps})", resumed

    assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
    assert [g for *_, g in killed_at] == sorted({g for *_, g in killed_at})  # three distinct, growing resume points
    metrics = json.loads((cwd / "metrics" / "train_diffusion.json").read_text())
    assert metrics["steps"] == steps and metrics["samples_seen"] == steps * 32
    assert _steps(cwd) == list(range(1, steps + 1))  # every logged step exactly once: none lost, none repeated
    assert sorted(p.name for p in (cwd / CKPTS).iterdir()) == ["step-00000055", "step-00000060"]  # no temp left
    bundle = load_diffusion_dir(cwd / "models" / "diffusion")  # checksums verified on load
    assert verify_checkpoint_dir(cwd / "models" / "diffusion")
    x = sample(bundle.diffusion, bundle.model, (2, *bundle.shape), SamplingSpec("ddim", steps=5),
               generator=torch.Generator().manual_seed(0), y=torch.arange(2))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


# ----------------------------------------------------------------------------------------------- in-process


def test_interrupted_checkpoint_write_keeps_last_good_then_sampling_needs_only_the_path(prepared, tmp_path,
                                                                                          monkeypatch):
    cwd = _workdir(prepared, tmp_path / "w", steps=30, checkpoint_every=10, scaling=IN_PROCESS)
    import diffusion_core.checkpoint as ckpt

    real, calls = ckpt.save_training_state, {"n": 0}

    def dying_save(*a, **k):  # the second checkpoint dies between its weight files and its state/config
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_training_state", dying_save)
    assert _main_in(cwd, monkeypatch) == 130
    good = find_last_good_checkpoint(cwd / CKPTS)
    assert good.name == "step-00000010" and verify_checkpoint_dir(good)["training_step"] == 10
    assert sorted(p.name for p in (cwd / CKPTS).iterdir()) == ["step-00000010"]  # no partial step-20, no temp dir
    assert not (cwd / "models").exists()

    monkeypatch.setattr(ckpt, "save_training_state", real)
    assert _main_in(cwd, monkeypatch) == 0
    assert json.loads((cwd / "metrics" / "train_diffusion.json").read_text())["steps"] == 30
    assert _steps(cwd) == list(range(5, 31, 5))

    bundle = load_diffusion_dir(cwd / "models" / "diffusion")  # no flags but the path
    assert bundle.shape == (1, 8, 8) and bundle.num_classes == 10 and not bundle.is_latent
    y = torch.arange(4)
    x = sample(bundle.diffusion, bundle.model, (4, *bundle.shape), SamplingSpec("ddim", steps=10),
               generator=torch.Generator().manual_seed(0), y=y)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1


@pytest.mark.parametrize("sections,train,steps", [
    ({}, {}, 20),  # tiny.yaml's: learned variances with the hybrid loss, uniform timesteps
    # L_vlb with importance-sampled timesteps (Improved DDPM), long enough for every t's loss history to fill: 20
    # timesteps of 10 losses each, about 200 samples, 7 steps of 32 if every t were drawn evenly
    ({"diffusion": {"loss": "vlb", "timestep_sampler": "loss_aware"}, "schedule": {"num_timesteps": 20}}, {}, 40),
    ({}, {"backbone": "dit"}, 20),  # the transformer backbone through the same stage
], ids=["hybrid", "vlb-loss_aware", "dit"])
def test_same_seed_bitwise_identical_and_resume_is_exact(sections, train, steps, prepared, tmp_path, monkeypatch):
    """Two runs, and one stopped halfway and continued, end with the same bytes (weights and EMA): with the
    loss-aware sampler too, which samples by its loss history once every timestep has one (the checkpoint carries
    it), and with the DiT backbone, whose folder rebuilds a DiT that samples."""
    from diffusion_core.checkpoint import load_training_state
    from diffusion_core.generation import generate
    from diffusion_core.model_folders import load_diffusion_dir
    from diffusion_core.models import DiT

    runs, half = {}, steps // 2
    for name, plan in (("a", [steps]), ("b", [steps]), ("resumed", [half, steps])):
        cwd = _workdir(prepared, tmp_path / name, steps=plan[0], checkpoint_every=half, scaling=IN_PROCESS, **train)
        for steps in plan:
            raw = yaml.safe_load((cwd / "tiny.yaml").read_text())
            raw["train_diffusion"]["steps"] = steps
            for section, keys in sections.items():
                raw[section].update(keys)
            (cwd / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            assert _main_in(cwd, monkeypatch) == 0
        runs[name] = [(cwd / "models" / "diffusion" / f).read_bytes() for f in ("model.safetensors", "ema.safetensors")]
    assert runs["a"] == runs["b"] == runs["resumed"]
    if "loss_aware" in str(sections):  # the resumed half sampled by the restored history
        state = load_training_state(cwd / "checkpoints" / "train_diffusion" / f"step-{half:08d}" / "training_state.pt")
        assert state["timestep_sampler"]["counts"].min() >= 10
    bundle = load_diffusion_dir(cwd / "models" / "diffusion")
    assert isinstance(bundle.model, DiT) == (train.get("backbone") == "dit")
    out = generate(bundle, 3, SamplingSpec("ddim", 4, guidance="cfg", scale=2.0), seed=0)
    assert out["images"].shape == (3, 8, 8, 1) and out["images"].std() > 0


def test_a_dit_patch_that_does_not_divide_the_data_is_a_one_line_error(prepared, tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load(TINY.read_text())
    cwd = _workdir(prepared, tmp_path / "w", backbone="dit", scaling=IN_PROCESS,
                   dit={**raw["train_diffusion"]["dit"], "patch_size": 3})
    assert _main_in(cwd, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train_diffusion.dit.patch_size 3" in err and "[1, 8, 8]" in err, err
    assert not (cwd / "models").exists()


def _change_loss_at_call(monkeypatch, n: int, change) -> dict:
    """Wrap GaussianDiffusion.losses_from_output so its n-th call returns change(per-sample losses); the call count
    is in the returned dict's "n"."""
    from diffusion_core.diffusion import GaussianDiffusion

    real, calls = GaussianDiffusion.losses_from_output, {"n": 0}

    def wrapped(self, *a, **k):
        calls["n"] += 1
        terms = real(self, *a, **k)
        if calls["n"] == n:
            terms["loss"] = change(terms["loss"])
        return terms

    monkeypatch.setattr(GaussianDiffusion, "losses_from_output", wrapped)
    return calls


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_nan_loss_one_line_error_names_step_keeps_checkpoint_marks_run_failed(bad, prepared, tmp_path, monkeypatch,
                                                                              capsys):
    """A NaN, +inf or -inf loss at step 15 (injected into the per-sample losses of that step only)."""
    cwd = _workdir(prepared, tmp_path / "w", tracking=True, steps=30, checkpoint_every=10, scaling=IN_PROCESS)

    def poison(loss):
        loss = loss.clone()
        loss[0] = float(bad)  # one sample of the batch: the mean must still come out non-finite
        return loss

    calls = _change_loss_at_call(monkeypatch, 15, poison)
    assert _main_in(cwd, monkeypatch) == 2
    assert calls["n"] == 15  # stopped at the bad step: no step after it was taken
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == out.err.strip().splitlines()[-1] and "Traceback" not in out.err
    assert errors[0].startswith(f"error: loss is {bad} at step 15:") and "last good checkpoint is kept" in errors[0]
    assert find_last_good_checkpoint(cwd / CKPTS).name == "step-00000010"
    assert not (cwd / "models").exists() and not (cwd / "metrics" / "train_diffusion.json").exists()
    with sqlite3.connect(cwd / "mlflow.db") as db:
        assert db.execute("select name, status from runs").fetchall() == [("train_diffusion", "FAILED")]


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


def test_infinite_gradient_with_a_finite_loss_stops_at_that_step(prepared, tmp_path, monkeypatch, capsys):
    """The loss of step 15 is finite but its gradient is infinite: the grad-norm check (not the loss check) stops
    training with one line naming the step, before the optimizer touches the weights; the last good checkpoint
    stays, no model is written and the MLflow run is FAILED."""
    cwd = _workdir(prepared, tmp_path / "w", tracking=True, steps=30, checkpoint_every=10, scaling=IN_PROCESS)
    calls = _change_loss_at_call(monkeypatch, 15, _InfiniteGradient.apply)
    assert _main_in(cwd, monkeypatch) == 2
    assert calls["n"] == 15
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # inf gradients turn to nan on their way back through the network (inf - inf): either is non-finite
    assert re.match(r"error: gradient norm is (inf|nan) at step 15: ", err.strip().splitlines()[-1]), err
    assert find_last_good_checkpoint(cwd / CKPTS).name == "step-00000010"
    assert not (cwd / "models").exists()
    with sqlite3.connect(cwd / "mlflow.db") as db:
        assert db.execute("select name, status from runs").fetchall() == [("train_diffusion", "FAILED")]


def test_config_errors_before_any_work(tmp_path, monkeypatch, capsys):
    raw = yaml.safe_load(TINY.read_text())
    raw["train_diffusion"]["batch_size"] = 33
    raw["train_diffusion"]["scaling"].update(RAY_WORKERS)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    assert _main_in(tmp_path, monkeypatch) == 2
    assert "batch_size 33 must be divisible by scaling.num_workers 2" in capsys.readouterr().err
    raw["train_diffusion"]["batch_size"] = 32
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    assert _main_in(tmp_path, monkeypatch) == 2  # no data prepared here
    assert "data/shards not found" in capsys.readouterr().err


def test_unreachable_ray_address_fails_fast(prepared, tmp_path, monkeypatch, capsys):
    cwd = _workdir(prepared, tmp_path / "w")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    t0 = time.time()
    assert _main_in(cwd, monkeypatch) == 2
    err = capsys.readouterr().err
    assert time.time() - t0 < 15 and err.count("\n") == 1 and f"RAY_ADDRESS=127.0.0.1:{port} is unreachable" in err


# ----------------------------------------------------------------------------------------------- ray job submit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Free ports for a head's agents: Ray's defaults (dashboard agent 52365, metrics, runtime env agent) are
    fixed, so a head started while another test's local Ray holds them lost its job agent ("No available agent")."""
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "ray-client-server-port")
    return [f"--{flag}={_free_port()}" for flag in flags]


def _start_head(make_args, env: dict, temp_dir: str, timeout: float, attempts: int = 3) -> subprocess.Popen:
    """`ray start --head --block`, retried with fresh ports when the head exits before it is ready: a port picked
    free can be taken by another test's Ray before the head binds it (CI saw a head exit 1 at once). make_args()
    gives the arguments and a readiness check for fresh ports; the head's output is quoted when every try failed."""
    log = Path(temp_dir) / "head.log"
    for _ in range(attempts):
        args, ready = make_args()
        with open(log, "w") as out:
            head = subprocess.Popen(["ray", "start", "--head", "--block", *args], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while head.poll() is None and time.time() < deadline:
            if ready():
                return head
            time.sleep(0.5)
        if head.poll() is None:  # neither ready nor exited in time: no retry would help
            _stop_head(head, temp_dir, remove=False)
            break
        _kill_session_leftovers(temp_dir)
    pytest.fail(f"ray start --head did not come up; its last output:\n{log.read_text()[-3000:]}")


def _stop_head(head: subprocess.Popen, temp_dir: str, remove: bool = True) -> None:
    """Stop only this cluster (`ray stop` would also kill every other Ray on the machine): --block makes `ray start`
    stop its processes on SIGTERM; whatever is left in our session folder is killed by pid."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    _kill_session_leftovers(temp_dir)
    if remove:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _pids_naming(temp_dir: str) -> set[int]:
    """Processes whose command line names the session's temp dir (Ray's daemons and workers)."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in (p.info["cmdline"] or [])):
                pids.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def _kill_session_leftovers(temp_dir: str) -> None:
    for pid in _pids_naming(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.slow
def test_a_head_started_as_the_readme_says_and_a_local_run_beside_it(prepared, tmp_path):
    """`ray start --head` as README's cluster walkthrough starts it: token authentication on (the README generates
    ~/.ray/auth_token; here the token comes from the environment, which Ray reads first, so the test leaves the home
    folder alone), the dashboard (which accepts jobs) on the loopback address only and refusing a request without
    the token (401). Ray's GCS, raylet and agents listen on every interface whatever --node-ip-address says: that is
    why the README keeps token authentication on. `ray job submit` to such a cluster: tests/test_cluster.py.

    Beside it, a stage with RAY_ADDRESS unset starts a Ray of its own: ray.init() without an address would join
    the latest such cluster (its address file in the Ray temp dir) and refuse the stage's num_cpus ("When
    connecting to an existing cluster, num_cpus ... must not be provided")."""
    work = _workdir(prepared, tmp_path / "w", steps=4, checkpoint_every=2, log_every=2)
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = ray_token_env(RAY_TMPDIR=tmp)  # the head's address file and the stage's lookup both live under tmp/ray
    token = env["RAY_AUTH_TOKEN"]
    address_file = Path(tmp) / "ray" / "ray_current_cluster"
    port = dash = 0

    def head_args():
        nonlocal port, dash
        port, dash = _free_port(), _free_port()
        address_file.unlink(missing_ok=True)  # a failed try's file must not pass for the next head's

        def ready() -> bool:
            return address_file.exists() and dashboard_answers(f"http://127.0.0.1:{dash}", token)

        return ["--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}", "--num-cpus=1", f"--temp-dir={tmp}/ray", "--disable-usage-stats",
                *_node_ports()], ready

    head = _start_head(head_args, env, tmp, timeout=180)
    try:
        with pytest.raises(urllib.error.HTTPError, match="401"):  # without the token the dashboard refuses
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=5)
        assert listening_ips(group_pids(head.pid) | _pids_naming(tmp), port=dash) == {"127.0.0.1"}
        res = subprocess.run([sys.executable, "-m", "pipeline.train_diffusion", "--params", "tiny.yaml"], cwd=work,
                             env={**_env(), "RAY_TMPDIR": tmp}, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-2000:]
        assert verify_checkpoint_dir(work / "models/diffusion")  # written by the stage's own two-worker Ray
    finally:
        _stop_head(head, tmp)


SIGTERM_IN_DEL = """
import os, signal, sys, time
from pipeline._ray import install_sigterm_redelivery
if sys.argv[1] == "hook":
    install_sigterm_redelivery()
def sigterm_handler(signum, frame):  # as Ray's worker main loop: SIGTERM -> SystemExit
    raise SystemExit(1)
signal.signal(signal.SIGTERM, sigterm_handler)
class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100000))  # the handler runs here, inside __del__
obj = Finalized()
del obj
time.sleep(1)
print("still alive")
"""


@pytest.mark.parametrize("hook", ["hook", "no hook"])
def test_a_sigterm_inside_a_finalizer_still_ends_a_ray_worker_quietly(hook):
    """Python ignores the SystemExit of a SIGTERM handled inside __del__ or a weakref callback: it prints a
    traceback and the process lives on (the sweep's console showed one from a trial actor Ray was stopping).
    The workers' setup hook sends the signal again, so the process ends with the handler's code, quietly."""
    res = subprocess.run([sys.executable, "-c", SIGTERM_IN_DEL, hook], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    if hook == "hook":
        assert (res.returncode, res.stdout, res.stderr) == (1, "", "")
    else:  # the failure the hook is for, as Python shows it
        assert res.returncode == 0 and "still alive" in res.stdout and "Exception ignored" in res.stderr


def test_polling_noise_stays_off_after_train_configures_its_loggers(caplog):
    """Ray Train's controller and workers run `logging.config.dictConfig` for `ray.train` after the worker set-up
    hook, which resets the levels of its child loggers: the hook's quieting must survive that (a busy CPU's
    'Failed to send resource request' WARNING with its traceback reached the console), errors still pass."""
    import logging
    import logging.config

    from pipeline._ray import _POLLING_LOGGERS, quiet_worker_logging

    loggers = [logging.getLogger(n) for n in _POLLING_LOGGERS]
    saved = [(lg.level, list(lg.filters)) for lg in loggers]
    old_hook = threading.excepthook
    try:
        quiet_worker_logging()
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "loggers": {"ray.train": {"level": "DEBUG", "propagate": True}}})
        assert all(lg.level == logging.NOTSET for lg in loggers)  # what Train's dictConfig does to them
        with caplog.at_level(logging.DEBUG):
            for lg in loggers:
                lg.warning("polling noise")
                lg.critical("a real failure")
        assert [r.getMessage() for r in caplog.records] == ["a real failure"] * len(loggers)
    finally:
        threading.excepthook = old_hook
        for lg, (level, filters) in zip(loggers, saved):
            lg.setLevel(level)
            lg.filters[:] = filters
