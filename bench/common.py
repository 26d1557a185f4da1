"""Timing, FLOP counting and machine facts shared by the figure groups."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def load() -> list[float]:
    """1/5/15-minute load averages: other jobs on this 2-core box skew timings, so every figure records them."""
    return [round(v, 2) for v in os.getloadavg()]


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Seconds per call of each fn: warm each up, then time them round-robin (A B A B ...) and take medians.

    Interleaving spreads the load of other jobs evenly over the contenders instead of penalising whichever
    ran during a busy spell.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    loads = []
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "times_s": [round(x, 5) for x in v],
                "load1_during": [round(x, 2) for x in loads]} for k, v in times.items()}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn, counted by torch.utils.flop_counter (matmuls and convolutions, fwd + bwd)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@contextlib.contextmanager
def num_threads(n: int):
    """Temporarily run torch ops on n intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def machine() -> dict:
    """What the figures were measured on."""
    import diffusers

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    return {
        "hostname": platform.node(), "cpu": cpu, "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags, "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "cuda_available": torch.cuda.is_available(),
    }


def with_dotted(base: dict, overrides: dict, where: str) -> dict:
    """A deep copy of a params dict with dotted `overrides` ({"diffusion.loss": "vlb"}) set; a key that `base`
    lacks is an error naming `where` the override comes from."""
    import copy

    out = copy.deepcopy(base)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = out
        for k in path:
            node = node[k]
        if last not in node:
            raise SystemExit(f"error: params key {key!r} does not exist in the params file: fix {where}")
        node[last] = value
    return out


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """JSON in insertion order (the table's order), through the library's atomic writer (temp file, then rename)."""
    from diffusion_core.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
