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
from .pretrained import DiffusionBundle

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
                   inception_reference=None, batch_size: int = 256) -> dict:
    """DESIGN.md metrics of one sample set (uint8 [N, H, W, C], labels [N], -1 = unconditional).

    fd_domain, kd_domain, kd_domain_std, precision_domain, recall_domain from the domain extractor; class_accuracy
    by its feature net when every sample has a requested class (else None); fid_inception, kid_inception only when
    an Inception extractor and its reference are given (never faked).
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
        mi = fidelity_metrics(images, inception_reference, inception, prc=False, batch_size=batch_size)
        out.update(fid_inception=mi["fd"], kid_inception=mi["kd"], kid_inception_std=mi["kd_std"])
    return out


def nll_on_test(bundle: DiffusionBundle, x_test: torch.Tensor, y_test: torch.Tensor | None, num: int,
                batch_size: int = 64, seed: int = 0) -> tuple[float | None, float | None]:
    """(nll_bpd, standard error) on the first `num` test images for pixel image models; (None, None) otherwise."""
    if num < 2 or bundle.is_latent or bundle.config["data"].get("kind", "image") != "image":
        return None, None
    from .metrics import nll_bpd

    n = min(num, len(x_test))
    labels = None if y_test is None or bundle.num_classes is None else y_test[:n]
    return nll_bpd(bundle, x_test[:n], batch_size=batch_size, generator=torch.Generator().manual_seed(seed),
                   labels=labels)


__all__ = ["DOMAIN", "INCEPTION", "REFERENCE_FILE", "load_reference", "nll_on_test", "reference_path",
           "sample_metrics"]
