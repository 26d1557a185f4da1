"""Peak: 2048^3 matmul rate in fp32 and bf16, the ceiling the other figures are compared to."""

from __future__ import annotations

import torch

from .common import interleaved, load

N = 2048


def run(quick: bool = False) -> dict:
    a32, b32 = torch.randn(N, N), torch.randn(N, N)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    inner = 3 if quick else 5

    def mm(a, b):
        def f():
            for _ in range(inner):
                torch.mm(a, b)
        return f

    t = interleaved({"fp32": mm(a32, b32), "bf16": mm(a16, b16)}, repeats=3 if quick else 7, warmup=1)
    flops = 2 * N ** 3 * inner
    out = {"n": N, "load_after": load()}
    for k, v in t.items():
        out[f"{k}_gflops"] = round(flops / v["median_s"] / 1e9, 1)
        out[f"{k}_best_gflops"] = round(flops / v["min_s"] / 1e9, 1)
    return out
