"""Sample-quality metrics: torch-fidelity distances on Inception-v3 and domain features, NLL, class accuracy.

Names say what they measure (README "Metrics"): `fid_inception`, `kid_inception`, `fd_domain`, `kd_domain`,
`precision_domain`, `recall_domain`, `nll_bpd` (`nll_bpd_given_class`), `class_accuracy`. torch-fidelity is
imported only when a fidelity function runs.
"""

from .errors import MetricsError
from .images import UInt8Images, as_uint8_nchw
from .nll import class_accuracy, nll_bpd

_FIDELITY = {"DOMAIN_EXTRACTOR", "INCEPTION_EXTRACTOR", "ReferenceStats", "domain_extractor", "extract_features",
             "fidelity_metrics", "fidelity_scores", "frechet_distance", "inception_extractor", "load_feature_net",
             "reference_stats", "register_domain_extractor"}


def __getattr__(name):  # lazy: `import torch_fidelity` costs seconds and is not needed for NLL or accuracy
    if name in _FIDELITY:
        from . import fidelity

        return getattr(fidelity, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MetricsError", "UInt8Images", "as_uint8_nchw", "class_accuracy", "nll_bpd", *sorted(_FIDELITY)]
