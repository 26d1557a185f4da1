"""`python -m bench.profile [--steps N] [--setting fp32|bf16|...]`: top operators of one training step
(ours and diffusers) and of one batch-256 forward pass, by self CPU time (torch.profiler)."""

from __future__ import annotations

import argparse

from torch.profiler import ProfilerActivity, profile

from .models import BASE_SETTINGS
from .train import diffusers_step, our_step


def top_ops(fn, steps: int, rows: int) -> str:
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--setting", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--who", nargs="+", default=["ours", "diffusers"])
    args = ap.parse_args(argv)
    makers = {"ours": our_step, "diffusers": diffusers_step}
    for s in (s for s in BASE_SETTINGS if s.name in args.setting):
        for who in args.who:
            step, _ = makers[who](s)
            print(f"== {who} training step, {s.name}, {args.steps} steps ==")
            print(top_ops(step, args.steps, args.rows))


if __name__ == "__main__":
    main()
