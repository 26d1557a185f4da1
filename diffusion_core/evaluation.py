"""Sample-set evaluation: cached reference statistics and the metrics of one sample set (the `sweep` stage's grid
and short training runs are pipeline concerns: `pipeline/grid.py`).

Engine-free (no ray, no mlflow): the stages wire these into Ray Tune / Ray tasks and MLflow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .metrics import class_accuracy
from .metrics.errors import MetricsError
from .model_folders import DiffusionBundle

REFERENCE_FILE = "reference-{}.npz"  # same name as fidelity_scores(cache_dir=...) uses
DOMAIN, INCEPTION = "domain", "inception"


# ----------------------------------------------------------------------------------------------- reference stats


def reference_path(ref_dir: str | Path, name: str) -> Path:
    return Path(ref_dir) / REFERENCE_FILE.format(name)


def load_reference(ref_dir: str | Path, name: str, required: bool = True):
    """ReferenceStats of extractor `name` (domain | inception) from the reference_stats stage's folder."""
    from .metrics.fidelity import ReferenceStats

    path = reference_path(ref_dir, name)
    if not path.is_file():
        if required:
            raise MetricsError(f"reference statistics {path} not found: run the reference_stats stage "
                               f"(dvc repro reference_stats)")
        return None
    return ReferenceStats.load(path)


# ----------------------------------------------------------------------------------------------- metrics


def sample_metrics(images: np.ndarray, labels: np.ndarray, reference, extractor, inception=None,
                   inception_reference=None, batch_size: int = 256, inception_samples: int | None = None) -> dict:
    """README's metrics of one sample set (uint8 [N, H, W, C], labels [N], -1 = unconditional).

    fd_domain, kd_domain, kd_domain_std, precision_domain, recall_domain from the domain extractor; class_accuracy
    by its feature net when every sample has a requested class (else None); fid_inception, kid_inception and
    inception_samples (how many images they saw: the first `inception_samples`, default all) only when an
    Inception extractor and its reference are given (never faked).
    """
    from .metrics.fidelity import fidelity_metrics

    m = fidelity_metrics(images, reference, extractor, batch_size=batch_size)
    out = {"fd_domain": m["fd"], "kd_domain": m["kd"], "kd_domain_std": m["kd_std"],
           "precision_domain": m["precision"], "recall_domain": m["recall"], "class_accuracy": None}
    labels = np.asarray(labels)
    net = extractor.net
    if len(labels) and (labels >= 0).all() and labels.max() < net.config["num_classes"]:
        out["class_accuracy"] = class_accuracy(net, images, labels, batch_size=batch_size)
    if inception is not None and inception_reference is not None:
        n = len(images) if inception_samples is None else min(int(inception_samples), len(images))
        if n < 2:
            raise MetricsError(f"fid_inception needs at least 2 samples, got inception_samples={n}")
        mi = fidelity_metrics(images[:n], inception_reference, inception, prc=False, batch_size=batch_size)
        out.update(fid_inception=mi["fd"], kid_inception=mi["kd"], kid_inception_std=mi["kd_std"],
                   inception_samples=n)
    return out


def nll_on_test(bundle: DiffusionBundle, x_test: torch.Tensor, y_test: torch.Tensor | None, num: int,
                batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Bits/dim bounds on the first `num` test images of a pixel image model, each with its standard error (`_se`).

    An unconditional model: `nll_bpd` = -log p(x). A class-conditional one: `nll_bpd_given_class` = -log p(x|y)
    with the test labels, and `nll_bpd` = -log p(x) through the null class only if the model folder says it was
    trained with label dropout (its null class is the unconditional model); an untrained null class has no bound.
    {} for latent or point models, or fewer than 2 images.
    """
    if num < 2 or bundle.is_latent or bundle.config["data"].get("kind", "image") != "image":
        return {}
    from .metrics import nll_bpd

    n = min(num, len(x_test))
    runs = {"nll_bpd": None}
    if bundle.num_classes is not None:
        if y_test is None:
            raise ValueError("a class-conditional model's nll_bpd_given_class needs the test labels")
        runs = {"nll_bpd_given_class": y_test[:n]}
        if float(bundle.config["data"].get("label_dropout", 0.0)) > 0:
            runs["nll_bpd"] = None  # y=None is the null class
    out = {}
    for name, labels in runs.items():
        out[name], out[f"{name}_se"] = nll_bpd(bundle, x_test[:n], batch_size=batch_size, labels=labels,
                                               generator=torch.Generator().manual_seed(seed))
    return out


__all__ = ["DOMAIN", "INCEPTION", "REFERENCE_FILE", "load_reference", "nll_on_test", "reference_path",
           "sample_metrics"]
