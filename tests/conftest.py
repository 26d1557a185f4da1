"""Test-wide settings, and the `prepared` folder shared by the tests that run stages."""

import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests import zygote
from tests.stages import TINY, stage_env

# Under pytest-xdist (`make test` and `make test-fast` run -n 2) each worker's in-process torch gets its share of
# the cores. Stages started as subprocesses keep their own thread counts (Ray sets OMP_NUM_THREADS per worker from
# its CPUs): forcing them to 1 thread made the suite slower when measured (commit 72bc57d).
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(THREADS)


CGROUP_ENV = "TEST_CPU_CGROUP"  # =1: each test's CPU seconds, its children's and Ray's included, in the JUnit report
_cpu_usage = None
_CPU_START = pytest.StashKey[int]()


def pytest_configure(config):
    """With TEST_CPU_CGROUP=1, where a cgroup-v1 cpuacct hierarchy is writable (root on Linux): this pytest process
    (one per xdist worker) moves into a cgroup of its own, so everything it starts lands there too (stages, their
    local Ray, `ray start` clusters, servers), and each test's report carries the group's CPU seconds over its setup,
    call and teardown as the JUnit property cpu_seconds (`python -m tests.durations` sums them per file)."""
    global _cpu_usage
    root = Path("/sys/fs/cgroup/cpuacct")
    if os.environ.get(CGROUP_ENV) != "1" or not root.is_dir():
        return
    group = root / f"pytest-{os.getpid()}"
    try:
        group.mkdir(exist_ok=True)
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as e:
        print(f"{CGROUP_ENV}: no cgroup of its own ({e}); no cpu_seconds", file=sys.stderr)
        return
    _cpu_usage = group / "cpuacct.usage"


def pytest_unconfigure(config):
    """Back into the parent group, and the group removed (kept while a process it started still runs)."""
    if _cpu_usage is not None:
        import contextlib

        with contextlib.suppress(OSError):
            (_cpu_usage.parent.parent / "cgroup.procs").write_text(str(os.getpid()))
            _cpu_usage.parent.rmdir()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    if _cpu_usage is not None:
        item.stash[_CPU_START] = int(_cpu_usage.read_text())
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield
    if _cpu_usage is not None and _CPU_START in item.stash:
        used_ns = int(_cpu_usage.read_text()) - item.stash[_CPU_START]
        item.user_properties.append(("cpu_seconds", round(used_ns / 1e9, 2)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box two threads per process thrash (a test module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """configs/tiny.yaml's `prepare` (digits 8x8) run once per session through its CLI, tracking off: the folder holds
    data/, metrics/prepare.json, reports/prepare_samples.png and tiny.yaml. Tests copy from it and never write to it."""
    d = tmp_path_factory.mktemp("prepared")
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["enabled"] = False
    (d / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    res = zygote.run([sys.executable, "-m", "pipeline.prepare", "--params", "tiny.yaml"], cwd=d, env=stage_env(),
                     timeout=900)
    assert res.returncode == 0, res.stderr
    return d


@pytest.fixture(scope="session")
def s3_server():
    """An S3 endpoint on 127.0.0.1 (moto's threaded server, in this test process) for the session; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A fresh bucket on the server, credentials and endpoint in the environment as a user sets them; the model
    cache in tmp_path. Yields the bucket's URL."""
    import uuid

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_server, "DIFFUSION_CACHE": str(tmp_path / "cache")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return f"s3://{bucket}"


def pytest_collection_modifyitems(items):
    """The longest test files first, by the seconds tests/durations.json recorded for each (`make test` hands whole
    files to its xdist workers in this order, the next to the first worker that is nearly done: the longest start at
    once and the short ones even out the workers' ends); files not recorded go last. Stable: each file keeps its own
    order. `make test-durations` records a fresh run's seconds."""
    from tests.durations import load

    seconds = load()
    items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))
