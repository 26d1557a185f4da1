"""A fork server for the tests' stage command lines: `python -m pipeline.<stage> ...` without paying for Python's
start-up and the imports (torch, MLflow, Ray, the pipeline: about 2.5 s of CPU) on every run.

The server (`python -m tests.zygote`, one per test process, started on first use) imports what the stages import
and then only forks: each request becomes a child that takes the request's working folder, environment, argv
and PYTHONPATH (a `sitecustomize.py` there is run, as Python's start-up would run it), starts a new session (so a
stage that kills its own process group kills nothing else), writes its stdout/stderr to files, runs the module as
`__main__` and exits as Python would (non-daemon threads joined, atexit handlers run) with the module's exit
code, or -signal when it was killed. The server runs no torch op before forking (no thread pools to inherit).

`run(cmd, ...)` takes the argv a test would give `subprocess.run` and returns its `CompletedProcess`; a command
that is not `sys.executable [-u] -m module ...` or `sys.executable -c code ...` runs through `subprocess.run`.
Each test file still starts some stages as plain subprocesses (the real interpreter start-up, `--help`, Ray
jobs it kills from outside): this server is for the tables and kill harnesses that run a stage dozens of times.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# imported by the server; the command-line modules are then dropped from sys.modules (their imports stay), as
# `python -m` finds them not yet imported
PRELOAD = ("torch", "numpy", "yaml", "PIL.Image", "mlflow", "ray", "diffusion_core.data", "diffusion_core.generation",
           "pipeline.config", "pipeline._stage")
ENTRY_POINTS = ("pipeline.cli", "pipeline.prepare", "pipeline.train_feature_net", "pipeline.train_autoencoder",
                "pipeline.train_diffusion", "pipeline.train_classifier", "pipeline.encode_latents",
                "pipeline.reference_stats", "pipeline.evaluate", "pipeline.sweep", "pipeline.distill")


# ----------------------------------------------------------------------------------------------- the server


def _child(req: dict) -> None:
    """In the forked child: become the command, run it, exit with its code (never returns)."""
    code = 1
    try:
        os.setsid()
        fds = [os.open(os.devnull, os.O_RDONLY), os.open(req["out"], os.O_WRONLY | os.O_TRUNC),
               os.open(req["err"], os.O_WRONLY | os.O_TRUNC)]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        code = _run_as_main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - printed as Python prints an uncaught exception
        import traceback

        tb = e.__traceback__  # from the command's own frames: the server's and runpy's are not the command's
        while tb is not None and (tb.tb_frame.f_code.co_filename == __file__ or
                                  tb.tb_frame.f_code.co_filename.startswith("<frozen runpy")):
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        code = 1
    finally:
        os._exit(_exit_like_python(code))


def _run_as_main(argv: list[str]) -> int:
    import runpy
    import warnings

    import torch

    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in entries if p not in sys.path]
    site = next((os.path.join(p, "sitecustomize.py") for p in entries
                 if os.path.isfile(os.path.join(p, "sitecustomize.py"))), None)
    if site is not None:  # as Python's start-up imports it: the first one on the path
        runpy.run_path(site, run_name="sitecustomize")
    if os.environ.get("PYTHONWARNINGS"):  # as Python's start-up reads it
        warnings._processoptions(os.environ["PYTHONWARNINGS"].split(","))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:  # -c code
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    return 0


def _exit_like_python(code: int) -> int:
    """What the interpreter does on exit before it dies: join non-daemon threads, run atexit, flush."""
    import atexit

    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - exiting anyway
        pass
    return code


def serve() -> None:
    """Read requests (JSON lines) on stdin; answer {"id", "pid"} when forked and {"id", "rc"} when done."""
    import importlib

    for name in PRELOAD + ENTRY_POINTS:
        importlib.import_module(name)
    for name in ENTRY_POINTS:
        del sys.modules[name]
    children: dict[int, int] = {}  # pid -> request id

    def say(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    stdin = sys.stdin.fileno()
    buf = b""
    while True:
        readable, _, _ = select.select([stdin], [], [], 0.05)
        if readable:
            chunk = os.read(stdin, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _child(req)
                children[pid] = req["id"]
                say({"id": req["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            say({"id": children.pop(pid), "rc": os.waitstatus_to_exitcode(status)})


# ----------------------------------------------------------------------------------------------- the client


class _Server:
    def __init__(self) -> None:
        from tests.stages import ROOT, stage_env

        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], cwd=ROOT, env=stage_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}, "the fork server did not start"
        self.lock = threading.Lock()
        self.next_id = 0
        self.waiting: dict[int, dict] = {}
        self.events: dict[int, threading.Event] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.lock:
                self.waiting[msg["id"]].update(msg)
                if "rc" in msg:
                    self.events[msg["id"]].set()
        with self.lock:  # the server died: nobody will answer the ones still waiting
            for rid, event in self.events.items():
                if not event.is_set():
                    self.waiting[rid].setdefault("rc", None)
                    event.set()

    def start(self, argv: list[str], cwd: str, env: dict, out: str, err: str) -> tuple[int, threading.Event, dict]:
        with self.lock:
            self.next_id += 1
            rid = self.next_id
            self.waiting[rid], self.events[rid] = {}, threading.Event()
            self.proc.stdin.write(json.dumps({"id": rid, "argv": argv, "cwd": cwd, "env": env, "out": out,
                                              "err": err}) + "\n")
            self.proc.stdin.flush()
        return rid, self.events[rid], self.waiting[rid]


_server: _Server | None = None
_server_lock = threading.Lock()


def _get_server() -> _Server:
    global _server
    with _server_lock:
        if _server is None or _server.proc.poll() is not None:
            _server = _Server()
        return _server


def _forkable(cmd: list[str]) -> list[str] | None:
    """The python arguments of `cmd` (["-m", module, ...] or ["-c", code, ...]) when the server can run it."""
    if not cmd or cmd[0] != sys.executable:
        return None
    args = list(cmd[1:])
    if args and args[0] == "-u":  # the child's stdout and stderr are line-buffered anyway
        args = args[1:]
    return args if len(args) >= 2 and args[0] in ("-m", "-c") else None


def run(cmd: list[str], *, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, cwd=, env=, capture_output=True, text=True, timeout=, start_new_session=True)` through
    the fork server."""
    argv = _forkable(cmd)
    if argv is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    import signal

    with tempfile.TemporaryDirectory(prefix="zygote-") as d:
        out, err = Path(d, "out"), Path(d, "err")
        out.touch()
        err.touch()
        _, done, msg = _get_server().start(argv, str(cwd), dict(env), str(out), str(err))
        if not done.wait(timeout):
            os.killpg(msg["pid"], signal.SIGKILL)
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
        assert msg["rc"] is not None, f"the tests' fork server died while running {cmd}"
        return subprocess.CompletedProcess(cmd, msg["rc"], out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))


if __name__ == "__main__":
    serve()
