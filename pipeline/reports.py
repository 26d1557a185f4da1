"""Sweep reports: the trial table and the per-setting summary (mean and spread over seed sets) as CSV, the
comparison plots as PNG (matplotlib, Agg), and the rule that selects the best setting; files written atomically.

Trial rows are dicts with the columns of `SWEEP_COLUMNS`, setting rows (`summarize`) those of `SUMMARY_COLUMNS`;
missing metrics are None (empty in the CSV, skipped in plots).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from typing import Any, Iterable, Sequence

from diffusion_core.io import atomic_path, atomic_write_text

SWEEP_COLUMNS = ("trial", "setting", "seed_set", "axis", "status", "schedule", "parameterization", "train_steps",
                 "model", "sampler", "steps", "eta", "spacing", "options", "guidance", "scale", "num_samples",
                 "nfe", "classifier_nfe", "fd_domain", "fid_inception", "kid_inception", "kid_inception_std",
                 "inception_samples", "kd_domain", "kd_domain_std", "precision_domain", "recall_domain",
                 "class_accuracy", "nll_bpd", "nll_bpd_se", "nll_bpd_given_class", "nll_bpd_given_class_se", "loss",
                 "wall_seconds")
SETTING_KEYS = ("model", "sampler", "steps", "eta", "spacing", "options", "guidance", "scale", "num_samples")
AVERAGED = ("fd_domain", "fid_inception", "kid_inception", "kd_domain", "precision_domain", "recall_domain",
            "class_accuracy", "nfe", "classifier_nfe", "wall_seconds")
FD_METRICS = ("fd_domain", "fid_inception")  # the Fréchet distances a setting is compared and selected by
SUMMARY_COLUMNS = ("setting", *SETTING_KEYS, "seed_sets", "nfe", "classifier_nfe", "fd_domain", "fd_domain_std",
                   "fd_domain_min", "fd_domain_max", "fid_inception", "fid_inception_std", "fid_inception_min",
                   "fid_inception_max", "inception_samples", "inception_sets", "kid_inception", "kd_domain",
                   "precision_domain", "recall_domain", "class_accuracy", "wall_seconds", "trials")
TRAINING_KEYS = ("training", "schedule", "parameterization", "train_steps")
CROSS_COLUMNS = ("setting", *TRAINING_KEYS, *SUMMARY_COLUMNS[1:])


def _ok(v: Any) -> bool:
    return v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] = SWEEP_COLUMNS) -> None:
    """One row per dict, header `columns`; None -> empty cell; floats with 6 significant digits."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    atomic_write_text(path, buf.getvalue())


def _cell(v) -> str:
    if isinstance(v, dict):  # sampler options
        return ";".join(f"{k}={x:g}" for k, x in sorted(v.items()))
    return "" if not _ok(v) else f"{v:.6g}" if isinstance(v, float) else v


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    plt = _figure()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def _setting(r: dict) -> str:
    return "none" if r.get("scale") is None else f"{r['guidance']} {r['scale']:g}"


def reference_setting(rows: Iterable[dict]) -> tuple | None:
    """(guidance, scale, eta) most sampling trials share: the setting the FD-vs-NFE lines compare samplers at."""
    counts: dict[tuple, int] = defaultdict(int)
    for r in rows:
        counts[(r["guidance"], r["scale"], r["eta"])] += 1
    return max(counts, key=counts.get) if counts else None


def summarize(rows: Sequence[dict], axis: str = "sampling") -> list[dict]:
    """One row per setting of `axis` (its trials differ only by seed set): metrics averaged over the seed sets,
    fd_domain's sample standard deviation (None for one set), min and max; in first-seen order. Rows of the
    training x sampling axis keep their training setting, schedule and parameterization (CROSS_COLUMNS)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("axis", "sampling") == axis:
            groups.setdefault(r["setting"], []).append(r)
    out = []
    for name, rs in groups.items():
        row = {"setting": name, **{k: rs[0].get(k) for k in (*SETTING_KEYS, *TRAINING_KEYS) if k in rs[0]},
               "seed_sets": len(rs), "trials": ";".join(r["trial"] for r in rs)}
        for k in AVERAGED:
            vals = [r[k] for r in rs if _ok(r.get(k))]
            row[k] = sum(vals) / len(vals) if vals else None
        for k in FD_METRICS:
            fds = [r[k] for r in rs if _ok(r.get(k))]
            row[f"{k}_min"], row[f"{k}_max"] = (min(fds), max(fds)) if fds else (None, None)
            row[f"{k}_std"] = (math.sqrt(sum((v - row[k]) ** 2 for v in fds) / (len(fds) - 1))
                               if len(fds) > 1 else None)
        inc = [r for r in rs if _ok(r.get("fid_inception"))]
        row["inception_sets"] = len(inc)
        row["inception_samples"] = min((r["inception_samples"] for r in inc), default=None)
        out.append(row)
    return out


def converged_reference(settings: Sequence[dict], metric: str = "fd_domain") -> dict | None:
    """The DDPM setting with the most steps at the common guidance/eta setting and the most common sample count:
    the band the FD-vs-NFE plot draws (DDPM at the full schedule when the sweep has it)."""
    ref, n = reference_setting(settings), _common_n(settings)
    ddpm = [r for r in settings if r["sampler"] == "ddpm" and (r["guidance"], r["scale"], r["eta"]) == ref
            and r["num_samples"] == n and _ok(r.get(metric))]
    return max(ddpm, key=lambda r: r["steps"]) if ddpm else None


def select_setting(settings: Sequence[dict], num_samples: int, max_nfe: float | None,
                   min_class_accuracy: float, min_seed_sets: int = 1, metric: str = "fd_domain",
                   models: Sequence[str] = ("diffusion", "student")) -> dict | None:
    """The rule evaluate follows: the lowest mean `metric` (fd_domain or fid_inception) among settings with
    `num_samples` samples per set (FD is biased by N; for fid_inception, the Inception sample count of the most
    common one) measured on at least `min_seed_sets` sets (the minimum of noisier means is biased low), NFE <=
    max_nfe (None: any) and mean class_accuracy >= min_class_accuracy; None if none does. A setting without
    class_accuracy (unconditional) passes that clause only when min_class_accuracy is 0. `models`: the folders the
    pick may sample (a row without `model` is models/diffusion's; `student`: distill's)."""
    if metric not in FD_METRICS:
        raise ValueError(f"selection metric must be one of {FD_METRICS}, got {metric!r}")
    sets = "inception_sets" if metric == "fid_inception" else "seed_sets"
    n_inc = _common_n([r for r in settings if _ok(r.get("inception_samples"))], "inception_samples")

    def ok(r):
        acc = r.get("class_accuracy")
        return ((r.get("model") or "diffusion") in models
                and r["num_samples"] == num_samples and (r.get(sets) or 1) >= min_seed_sets
                and _ok(r.get(metric)) and _ok(r.get("nfe"))
                and (metric != "fid_inception" or r.get("inception_samples") == n_inc)
                and (max_nfe is None or r["nfe"] <= max_nfe + 1e-9)
                and ((_ok(acc) and acc >= min_class_accuracy) or min_class_accuracy == 0))
    passing = [r for r in settings if ok(r)]
    return min(passing, key=lambda r: r[metric]) if passing else None


def _common_n(rows: Sequence[dict], key: str = "num_samples"):
    ns = [r[key] for r in rows]
    return max(ns, key=ns.count, default=None)


def plot_fd_vs_nfe(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Mean fd_domain (left) and, where measured, fid_inception (right) over seed sets against NFE, both axes log,
    error bars one standard deviation over the sets, one line per sampler and grid at the common guidance/eta
    setting; other settings (other guidance scales) as loose grey markers; the converged reference (the DDPM setting
    with most steps) as a horizontal band, mean +- std. Point labels give the sample count where it differs from the
    most common one. `rows` are `summarize`'s setting rows."""
    plt = _figure()
    metrics = [m for m in FD_METRICS if m == "fd_domain" or any(_ok(r.get(m)) for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(7 * len(metrics), 4.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _fd_panel(ax, rows, metric)
    _save(fig, path)


def _fd_panel(ax, rows: Sequence[dict], metric: str) -> None:
    rows = [r for r in rows if _ok(r.get(metric)) and _ok(r.get("nfe"))]
    ref = reference_setting(rows)
    n_key = "inception_samples" if metric == "fid_inception" else "num_samples"
    _reference_band(ax, converged_reference(rows, metric), metric)
    common_n = _common_n(rows, n_key)
    _sampler_lines(ax, [r for r in rows if (r["guidance"], r["scale"], r["eta"]) == ref], common_n, metric, n_key)
    for r in (r for r in rows if (r["guidance"], r["scale"], r["eta"]) != ref):
        ax.plot(r["nfe"], r[metric], "x", color="grey")
        ax.annotate(f"{r['sampler']} {_setting(r)}" + (f" eta {r['eta']:g}" if r["eta"] else ""),
                    (r["nfe"], r[metric]), fontsize=6, color="grey")
    _nfe_axis(ax, rows)
    if rows and min(r[metric] for r in rows) > 0:  # guidance points far above the lines: all stay readable
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_fmt(FormatStrFormatter("%g"))
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(f"{metric} (lower is better, log scale)")
    if ref is not None:
        sets = max((r.get("inception_sets" if metric == "fid_inception" else "seed_sets") or 1 for r in rows),
                   default=1)
        ax.set_title(f"{metric} vs NFE at guidance {_setting({'guidance': ref[0], 'scale': ref[1]})}, eta "
                     f"{ref[2]:g}\nmean +- std over up to {sets} seed set(s) of {common_n}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def sampler_of(r: dict) -> str:
    """What a sweep row's line is named by: its sampler, or `student` for distill's students (their own DDIM)."""
    return "student" if r.get("model") == "student" else (r.get("sampler") or "train")


def _sampler_lines(ax, rows: Sequence[dict], common_n: int | None, metric: str = "fd_domain",
                   n_key: str = "num_samples") -> None:
    """One line per sampler and grid (a grid other than trailing is named; distill's students are `student`),
    error bars one std over the seed sets; a point's sample count is written where it differs from common_n."""
    def line_of(r):
        sp = r.get("spacing") or "trailing"
        return sampler_of(r) if sp == "trailing" else f"{sampler_of(r)} ({sp})"

    for sampler in sorted({line_of(r) for r in rows}):
        line = sorted((r for r in rows if line_of(r) == sampler), key=lambda r: r["nfe"])
        err = [r.get(f"{metric}_std") or 0.0 for r in line]
        ax.errorbar([r["nfe"] for r in line], [r[metric] for r in line], yerr=err, fmt="o-", capsize=3,
                    label=sampler)
        for r in line:
            if r[n_key] != common_n:
                ax.annotate(f"n={r[n_key]}", (r["nfe"], r[metric]), fontsize=7)


def _reference_band(ax, band: dict | None, metric: str = "fd_domain") -> None:
    """The converged reference as a grey band, mean +- std over its seed sets (nothing without one)."""
    if band is None:
        return
    sd = band.get(f"{metric}_std") or 0.0
    sets = band.get("inception_sets" if metric == "fid_inception" else "seed_sets") or 1
    label = f"DDPM-{band['steps']} ({band['nfe']:.0f} NFE), {sets} set(s)" + (f" +- {sd:.3g}" if sd else "")
    ax.axhspan(band[metric] - sd, band[metric] + sd, color="grey", alpha=0.25, label=label)
    ax.axhline(band[metric], color="grey", lw=1)


def _nfe_axis(ax, rows: Sequence[dict]) -> None:
    """Log x axis ticked at the NFEs measured (not at every power of ten)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xticks(sorted({int(round(r["nfe"])) for r in rows}))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_guidance(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """fd_domain and class_accuracy against guidance scale, a line per (guidance kind, sampler, steps) that has
    more than one scale (all groups when none has)."""
    plt = _figure()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if r.get("scale") is not None and _ok(r.get("fd_domain")):
            groups[(r["guidance"], sampler_of(r), r["steps"], r["eta"])].append(r)
    if any(len(rs) > 1 for rs in groups.values()):  # single-scale groups say nothing about the scale's effect
        groups = {k: rs for k, rs in groups.items() if len(rs) > 1}
    for (g, s, n, eta), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["scale"])
        label = f"{g} {s}-{n}" + (f" eta {eta:g}" if eta else "")
        ax1.plot([r["scale"] for r in rs], [r["fd_domain"] for r in rs], "o-", label=label)
        acc = [r for r in rs if _ok(r.get("class_accuracy"))]
        ax2.plot([r["scale"] for r in acc], [r["class_accuracy"] for r in acc], "o-", label=label)
    ax1.set(xlabel="guidance scale", ylabel="fd_domain", title="fidelity vs guidance scale")
    ax2.set(xlabel="guidance scale", ylabel="class_accuracy", title="class accuracy vs guidance scale", ylim=(0, 1.02))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    _save(fig, path)


def plot_precision_recall(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """precision_domain against recall_domain, one colour per sampler, each point labelled by steps/guidance."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 5))
    rows = [r for r in rows if _ok(r.get("precision_domain")) and _ok(r.get("recall_domain"))]
    for sampler in sorted({sampler_of(r) for r in rows}):
        rs = [r for r in rows if sampler_of(r) == sampler]
        ax.scatter([r["recall_domain"] for r in rs], [r["precision_domain"] for r in rs], label=sampler)
        for r in rs:
            ax.annotate(r.get("setting") or r["trial"], (r["recall_domain"], r["precision_domain"]), fontsize=6)
    ax.set(xlabel="recall_domain", ylabel="precision_domain", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title="precision vs recall (domain features)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    _save(fig, path)


def plot_training_x_sampling(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """fd_domain of each short-trained model (a marker colour per training setting) under each sampling setting of
    sweep.training.samplers (x axis, with its NFE), mean +- one std over the seed sets: which formulation or schedule
    lets which sampler work. `rows` are `summarize(rows, CROSS_AXIS)`'s setting rows; an empty plot says so."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows = [r for r in rows if _ok(r.get("fd_domain"))]
    samplings = list(dict.fromkeys(r["setting"].split("/", 1)[1] for r in rows))
    trainings = list(dict.fromkeys(r["training"] for r in rows))
    width = 0.8 / max(1, len(trainings))
    for j, training in enumerate(trainings):
        pts = [(samplings.index(r["setting"].split("/", 1)[1]), r) for r in rows if r["training"] == training]
        ax.errorbar([i - 0.4 + width * (j + 0.5) for i, _ in pts], [r["fd_domain"] for _, r in pts],
                    yerr=[r.get("fd_domain_std") or 0.0 for _, r in pts], fmt="o", capsize=3, label=training)
    nfe = {r["setting"].split("/", 1)[1]: r["nfe"] for r in rows}
    ax.set_xticks(range(len(samplings)))
    ax.set_xticklabels([f"{s}\n{nfe[s]:.0f} NFE" for s in samplings], fontsize=7, rotation=20)
    sets = max((r.get("seed_sets") or 1 for r in rows), default=1)
    fds = [r["fd_domain"] for r in rows if r["fd_domain"] > 0]
    if fds and max(fds) > 5 * min(fds):  # an untrained formulation next to a good one: both stay readable
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_fmt(FormatStrFormatter("%g"))
    ax.set(ylabel="fd_domain (lower is better)",
           title=f"short trainings x samplers: mean +- std over up to {sets} seed set(s)" if rows else
           "no finished training trial was crossed with samplers (sweep.training.samplers empty, or all pruned)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_training(history: dict[str, list[dict]], path: str | os.PathLike) -> None:
    """Validation fd_domain against training step, one line per training trial (pruned trials end early)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(history.items()):
        pts = [p for p in points if _ok(p.get("fd_domain"))]
        if pts:
            ax.plot([p["step"] for p in pts], [p["fd_domain"] for p in pts], "o-", label=name)
    ax.set(xlabel="training step", ylabel="fd_domain (validation)", title="training-time axis (ASHA)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


__all__ = ["CROSS_COLUMNS", "SUMMARY_COLUMNS", "SWEEP_COLUMNS", "converged_reference", "plot_fd_vs_nfe",
           "plot_guidance", "plot_precision_recall", "plot_training", "plot_training_x_sampling", "reference_setting",
           "select_setting", "summarize", "write_csv"]
