"""`python -m bench [--quick] [--only peak train sample reader] [--compile]`: print the table, write results.json.

Groups not re-run keep their previous figures in results.json (each group records when and under what load
it was measured); the top-level ratios are recomputed from whatever is there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from . import GROUPS
from .common import atomic_write_json, load, machine

RESULTS = Path(__file__).with_name("results.json")
TARGETS = {"train_speedup_vs_diffusers": 1.3, "train_fraction_of_bf16_peak": 0.20,
           "sample_speedup_vs_diffusers_ddim50": 1.2, "sample_speedup_vs_diffusers_dpmpp20": 1.2,
           "sampler_overhead_fraction": 0.02, "ray_2workers_vs_single_process": 0.85,
           "reader_speedup_vs_training": 10.0}
LOWER_IS_BETTER = {"sampler_overhead_fraction"}


def run_group(name: str, quick: bool, compile: bool, previous: dict) -> dict:
    import importlib

    mod = importlib.import_module(f"bench.{name}")
    t0 = time.perf_counter()
    kw = {"compile": compile} if name == "train" else {}
    fig = mod.run(quick=quick, **kw)
    if name == "e2e":  # keep the slow full-repro figures (python -m bench.e2e); --quick only re-times the no-op
        fig = {**previous.get("groups", {}).get("e2e", {}), **fig}
    fig["measured_at"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    fig["wall_s"] = round(time.perf_counter() - t0, 1)
    fig["quick"] = quick
    return fig


def ratios(groups: dict) -> tuple[dict, dict]:
    """Top-level ratios (None where the figures are missing) and the reason for each None."""
    r, why = {}, {}
    peak, train, samp, reader, system = (groups.get(k) for k in GROUPS[:5])
    if train:
        r["train_speedup_vs_diffusers"] = round(train["ours_images_per_s"] / train["diffusers_images_per_s"], 3)
    if train and peak:
        r["train_fraction_of_bf16_peak"] = round(train["ours_gflops"] / peak["bf16_best_gflops"], 4)
    if samp:
        r["sample_speedup_vs_diffusers_ddim50"] = samp["ddim50"]["speedup"]
        r["sample_speedup_vs_diffusers_dpmpp20"] = samp["dpmpp20"]["speedup"]
        r["sampler_overhead_fraction"] = max(samp["ddim50"]["ours"]["overhead_fraction"],
                                             samp["dpmpp20"]["ours"]["overhead_fraction"])
    if reader and train:
        r["reader_speedup_vs_training"] = round(reader["images_per_s"] / train["ours_images_per_s"], 1)
    if system:
        r["ray_2workers_vs_single_process"] = system["distributed"]["ratio"]
    for k in TARGETS:
        if k not in r:
            r[k] = None
            why[k] = "group not measured yet: run `python -m bench`"
    return r, why


def table(res: dict) -> str:
    lines = [f"bench {res['date']}  torch {res['machine']['torch']}  diffusers {res['machine']['diffusers']}  "
             f"load {res['load_average']}", ""]
    g = res["groups"]
    if "peak" in g:
        p = g["peak"]
        lines.append(f"peak GEMM 2048^3: fp32 {p['fp32_gflops']} GFLOP/s, bf16 {p['bf16_gflops']} GFLOP/s")
    if "train" in g:
        t = g["train"]
        lines.append(f"train step b{t['batch']} ({t['gflop_per_image']['ours']} vs {t['gflop_per_image']['diffusers']}"
                     f" GFLOP/img, ratio {t['flop_ratio_ours_over_diffusers']}):")
        for k, v in t["settings"].items():
            lines.append(f"  {k:32s} {v['images_per_s']:8.1f} img/s {v['gflops']:8.1f} GFLOP/s")
        lines.append(f"  best: ours {t['ours_best_setting']} {t['ours_images_per_s']} img/s, "
                     f"diffusers {t['diffusers_best_setting']} {t['diffusers_images_per_s']} img/s")
    if "sample" in g:
        s = g["sample"]
        lines.append(f"sampling b{s['batch']} (ours {s['settings']['ours']}, diffusers {s['settings']['diffusers']}):")
        for k, v in s["forward_b256"].items():
            lines.append(f"  forward {k:24s} {v['images_per_s']:8.1f} img/s")
        for name in ("ddim50", "dpmpp20"):
            o, d = s[name]["ours"], s[name]["diffusers"]
            lines.append(f"  {name:8s} ours {o['images_per_s']:7.2f} img/s "
                         f"(overhead {100 * o['overhead_fraction']:.2f}%)"
                         f"  diffusers {d['images_per_s']:7.2f} img/s (overhead {100 * d['overhead_fraction']:.2f}%)")
    if "reader" in g:
        rd = g["reader"]
        lines.append(f"reader 1 thread: stream {rd['stream_noshuffle_images_per_s']} img/s, shuffled "
                     f"{rd['stream_shuffle1000_images_per_s']}, load_split {rd['load_split_images_per_s']}")
    if "system" in g:
        d, lp = g["system"]["distributed"], g["system"]["latent_vs_pixel"]
        lines.append(f"train_diffusion {d['steps']} steps, global batch {d['global_batch']}: 1 process x 2 threads "
                     f"{d['single_process_2threads']['samples_per_s']} samples/s, 2 Ray workers x 1 thread "
                     f"{d['ray_2workers_1thread']['samples_per_s']} samples/s (Ray start-up "
                     f"{d['ray_2workers_1thread']['startup_s']} s)")
        lines.append(f"peak RSS: training stage (1 process) {d['single_process_2threads']['driver_peak_rss_mib']} MiB,"
                     f" sampling b256 {d['sample_b256_peak_rss_mib']} MiB")
        lines.append(f"latent 4x8x8 vs pixel 1x28x28 (default U-Net): train {lp['latent']['train_images_per_s']} vs "
                     f"{lp['pixel']['train_images_per_s']} img/s (x{lp['train_speedup_latent_over_pixel']}), DDIM-50 "
                     f"{lp['latent']['ddim50_images_per_s']} vs {lp['pixel']['ddim50_images_per_s']} img/s "
                     f"(x{lp['ddim50_speedup_latent_over_pixel']}, latent includes decoding)")
    if "e2e" in g:
        e = g["e2e"]
        full = f"default dvc repro {e['default_repro_s']} s, " if e.get("default_repro_s") else ""
        lines.append(f"end to end: {full}no-op dvc repro {e.get('noop_repro_s')} s")
    if "inception" in g:
        i = g["inception"]
        lines.append(f"FID Inception-v3, b{i['batch']} 28x28 -> 299x299: " + ", ".join(
            f"{n} thread(s) {i[f'threads_{n}']['channels_last']['images_per_s']} img/s channels_last, "
            f"{i[f'threads_{n}']['contiguous']['images_per_s']} contiguous" for n in (1, 2))
            + f"; resize {100 * i['threads_2']['resize_fraction']:.0f}% of it")
    if "backbones" in g:
        b = g["backbones"]
        lines.append(f"train_diffusion backbones, b{b['batch']} latents {b['latent']} ({b['gflop_per_image']} "
                     f"GFLOP/img; bf16 peak {b['peak_bf16_gflops']} GFLOP/s in the same run):")
        for k, v in b["settings"].items():
            lines.append(f"  {k:32s} {v['images_per_s']:8.1f} img/s {v['gflops']:8.1f} GFLOP/s "
                         f"{100 * v['fraction_of_bf16_peak']:5.1f}% of peak")
    lines += ["", f"{'ratio':40s} {'value':>10s} {'target':>8s}  met"]
    for k, target in TARGETS.items():
        v = res[k]
        if v is None:
            lines.append(f"{k:40s} {'null':>10s} {target:>8}  -  ({res['null_reasons'][k]})")
            continue
        ok = v <= target if k in LOWER_IS_BETTER else v >= target
        lines.append(f"{k:40s} {v:>10} {('<' if k in LOWER_IS_BETTER else '>=') + str(target):>8}  "
                     f"{'yes' if ok else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats (whole suite under 10 minutes)")
    ap.add_argument("--only", nargs="+", choices=GROUPS, help="run only these figure groups")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile settings in train (slow to compile)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    previous = json.loads(args.out.read_text()) if args.out.is_file() else {}
    groups = dict(previous.get("groups", {}))
    for name in args.only or GROUPS:
        print(f"[bench] {name} ... (load {load()})", file=sys.stderr, flush=True)
        groups[name] = run_group(name, args.quick, args.compile, previous)
        res = _results(groups, args)
        atomic_write_json(args.out, res)  # after every group: a crash or ^C later keeps what was measured
    print(table(res))
    return 0


def _results(groups: dict, args) -> dict:
    groups = {k: groups[k] for k in GROUPS if k in groups}  # the table in a fixed order
    r, why = ratios(groups)
    return {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
            "load_average": load(), "quick": args.quick, "argv": sys.argv[1:], **r, "null_reasons": why,
            "targets": TARGETS, "groups": groups}


if __name__ == "__main__":
    sys.exit(main())
