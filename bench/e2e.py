"""End to end: wall and CPU time of the default `dvc repro` on a fresh clone, per stage, and of a no-op rerun.

    python -m bench.e2e [--dir DIR]     # DIR: a fresh clone to run in (default: clone this repo into /tmp)
    python -m bench.e2e --params configs/colour.yaml    # that file as the clone's params.yaml (groups.e2e_colour)

Slow (the whole default pipeline, ~30 min on 2 cores): not part of `python -m bench --quick`, which only times a
no-op `dvc repro` where one has finished. The clone's `.venv` is created by `make install` first (not timed). The
figures go into `bench/results.json` under groups.e2e; the clone keeps every output (models, reports, mlflow.db)
for `python -m bench.quality --run DIR`. A clone is about 8 GB (its venv holds a CUDA build of torch): a finished
run deletes the clone that this script made for the same group before (a `--dir` of your own is never deleted).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import atomic_write_json, load

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results.json")
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def dvc_env(cwd: Path) -> dict:
    """A clean environment for the clone's own dvc: its venv first on PATH, nothing else from ours."""
    return {"PATH": f"{cwd / '.venv/bin'}:/usr/bin:/bin", "HOME": str(Path.home())}


def timed_repro(cwd: Path, log: Path) -> tuple[float, dict[str, float], dict[str, float]]:
    """Run `dvc repro` in cwd, streaming its output to log; (total seconds, wall seconds per stage in run order, CPU
    seconds per stage). A stage's CPU seconds are those of dvc's process tree while it ran: user + system time of
    dvc and of every process it has reaped, read at each stage's start and, for the last, from wait4 when dvc exits.
    Ray's worker processes are the raylet's children and are not reaped into the stage's process, so a Ray stage's
    figure is its driver's alone (bench/README.md)."""
    import os

    import psutil

    t0 = time.perf_counter()
    marks: list[tuple[str, float, float]] = []
    with log.open("w") as f:
        proc = subprocess.Popen([str(cwd / ".venv/bin/dvc"), "repro"], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env={**dvc_env(cwd), "RAY_USAGE_STATS_ENABLED": "0"})
        tree = psutil.Process(proc.pid)

        def cpu() -> float:
            c = tree.cpu_times()
            return c.user + c.system + c.children_user + c.children_system

        for line in proc.stdout:
            f.write(line)
            f.flush()
            m = STAGE_LINE.search(line)
            if m:
                marks.append((m.group(1), time.perf_counter(), cpu()))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {cwd} (exit {proc.returncode}); see {log}")
    ends = [(t, c) for _, t, c in marks[1:]] + [(t0 + total, usage.ru_utime + usage.ru_stime)]
    wall = {name: round(end[0] - start, 1) for (name, start, _), end in zip(marks, ends)}
    cpu_s = {name: round(end[1] - c0, 1) for (name, _, c0), end in zip(marks, ends)}
    return total, wall, cpu_s


def noop_seconds(cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(cwd / ".venv/bin/dvc"), "repro"], cwd=cwd, check=True, capture_output=True,
                   env=dvc_env(cwd))
    return round(time.perf_counter() - t0, 2)


def remove_own_clone(directory: str | None, keep: Path) -> None:
    """Delete `directory` if this script made it (a bench-e2e- folder in the temp dir) and it is not `keep`."""
    if not directory:
        return
    path = Path(directory)
    own = path.parent == Path(tempfile.gettempdir()) and path.name.startswith("bench-e2e-")
    if own and path.resolve() != keep.resolve() and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed the previous run's clone {path}", file=sys.stderr)


def run(quick: bool = True, directory: Path | None = None) -> dict:
    """Quick: only the no-op rerun in `directory` (default: the clone of the last full run, else this repo)."""
    if directory is None and RESULTS.exists():
        last = json.loads(RESULTS.read_text()).get("groups", {}).get("e2e", {}).get("dir")
        directory = Path(last) if last and (Path(last) / "dvc.lock").exists() else None
    cwd = directory or ROOT
    if not (cwd / "dvc.lock").exists() or not (cwd / ".venv/bin/dvc").exists():
        return {"noop_repro_s": None, "reason": f"no finished `dvc repro` in {cwd}: run python -m bench.e2e"}
    status = subprocess.run([str(cwd / ".venv/bin/dvc"), "status", "--json"], cwd=cwd, capture_output=True, text=True,
                            env=dvc_env(cwd))
    if status.returncode != 0 or status.stdout.strip() not in ("{}", ""):
        # a changed stage would make the "no-op" rerun a full one (half an hour): time nothing instead
        return {"noop_repro_s": None, "reason": f"the pipeline in {cwd} is not up to date (`dvc status`): its rerun "
                                                f"would not be a no-op; run python -m bench.e2e"}
    return {"noop_repro_s": noop_seconds(cwd)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="fresh clone to run in (default: a new clone in /tmp)")
    ap.add_argument("--params", default=None, help="a params file of the repo (e.g. configs/colour.yaml) copied over "
                                                   "the clone's params.yaml; figures under groups.e2e_<its stem>")
    args = ap.parse_args(argv)
    cwd = args.dir or Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    if args.dir is None:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(cwd)], check=True)
    group = "e2e"
    if args.params:
        shutil.copyfile(cwd / args.params, cwd / "params.yaml")
        group = f"e2e_{Path(args.params).stem}"
    subprocess.run(["make", "install"], cwd=cwd, check=True)
    if (cwd / "dvc.lock").exists():
        raise SystemExit(f"{cwd} already has dvc.lock: give a fresh clone")
    load_before = load()
    total, stages, cpu = timed_repro(cwd, cwd / "repro.log")
    fig = {"default_repro_s": round(total, 1), "stages_s": stages, "stages_cpu_s": cpu,
           "noop_repro_s": noop_seconds(cwd),
           "params": args.params or "params.yaml", "load_before": load_before, "load_after": load(), "dir": str(cwd),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                                    text=True).stdout.strip(),
           "measured_at": dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    for name in ("train_autoencoder", "train_diffusion", "evaluate"):
        p = cwd / "metrics" / f"{name}.json"
        if name == "evaluate":
            p = cwd / "reports" / "metrics.json"
        if p.exists():
            fig[f"{name}_metrics"] = json.loads(p.read_text())
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"groups": {}}
    previous = res.get("groups", {}).get(group, {}).get("dir")
    res.setdefault("groups", {})[group] = fig
    atomic_write_json(RESULTS, res)
    remove_own_clone(previous, keep=cwd)
    print(json.dumps({k: v for k, v in fig.items() if not k.endswith("_metrics")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
