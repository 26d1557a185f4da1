"""diffusion_core.metrics: torch-fidelity distances on domain and Inception features,
reference caching, NLL, accuracy."""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest
import torch
from scipy import linalg

import diffusion_core.metrics.fidelity as F
from diffusion_core.evaluation import nll_on_test
from diffusion_core.metrics import MetricsError, class_accuracy, nll_bpd
from diffusion_core.model_folders import load_diffusion_dir
from tests.tiny_models import make_diffusion_dir, make_feature_net, make_latent_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, seed: int, size: int = 8) -> torch.Tensor:
    """uint8 [n, 1, size, size]: one Gaussian blob per image at a random place and width (a structured image set)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    c = torch.rand(n, 2, generator=g) * (size - 1)
    w = 1.0 + 2.0 * torch.rand(n, generator=g)
    img = torch.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / (2 * w[:, None, None] ** 2))
    return (img * 255).round().to(torch.uint8)[:, None]


def noised(x: torch.Tensor, std: float, seed: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x.float() + std * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def net():
    return make_feature_net(num_classes=3)


def test_domain_metrics_self_vs_noised_and_ranges(net):
    real = blobs(120, 0)
    same = F.fidelity_scores(real, real, feature_net=net, inception=False)  # KID subsets = the whole sets
    other = F.fidelity_scores(noised(real, 60.0), real, feature_net=net, inception=False)
    assert set(same) == {"fd_domain", "kd_domain", "kd_domain_std", "precision_domain", "recall_domain"}
    # subsets of the whole sets are all the same pair: no spread to report (it used to be float noise, ~1e-9)
    assert same["kd_domain_std"] is None and other["kd_domain_std"] is None
    assert abs(same["fd_domain"]) < 1e-9 and other["fd_domain"] > 1e-3
    assert same["precision_domain"] == 1.0 and same["recall_domain"] == 1.0
    for key in ("precision_domain", "recall_domain"):
        assert 0.0 <= other[key] <= 1.0
    assert other["precision_domain"] < 0.9

    # unbiased MMD^2 of a set against itself is -(2/n)(mean diag K - mean offdiag K), K = (x.y/d + 1)^3: ~0, < 0
    with torch.no_grad():
        f = net.features(real.float() / 127.5 - 1).double()
    k = (f @ f.T / f.shape[1] + 1) ** 3
    n = len(f)
    offdiag = (k.sum() - k.diagonal().sum()) / (n * (n - 1))
    expected = float(-2 / n * (k.diagonal().mean() - offdiag))
    assert same["kd_domain"] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert other["kd_domain"] > 0 > same["kd_domain"]
    # smaller subsets than the sets: a real spread, of the order of the KID difference between disjoint halves
    ext = F.domain_extractor(net)
    ref = F.reference_stats(real, ext)
    half = F.fidelity_metrics(noised(real, 60.0), ref, ext, kid_subset_size=60, prc=False)
    halves = [F.fidelity_metrics(noised(real, 60.0)[i::2], ref, ext, kid_subset_size=60, prc=False)["kd"]
              for i in (0, 1)]
    assert half["kd_std"] is not None and half["kd_std"] > 1e-3 * abs(half["kd"])
    assert 0.02 < half["kd_std"] / max(abs(halves[0] - halves[1]), 1e-12) < 50, (half["kd_std"], halves)


def test_frechet_distance_matches_scipy_and_torch_fidelity(net):
    import torch_fidelity

    real, gen = blobs(80, 1), noised(blobs(60, 2), 30.0)
    ext = F.domain_extractor(net)
    ref = F.reference_stats(real, ext)
    ours = F.fidelity_metrics(gen, ref, ext, kid_subset_size=50)["fd"]

    # independent: features straight from the net, then ||mu1-mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))
    with torch.no_grad():
        f1 = net.features(gen.float() / 127.5 - 1).double().numpy()
        f2 = net.features(real.float() / 127.5 - 1).double().numpy()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert ours == pytest.approx(expected, rel=1e-4, abs=1e-9)

    # the registered extractor through torch-fidelity's own entry point
    tf = torch_fidelity.calculate_metrics(input1=F.UInt8Images(gen), input2=F.UInt8Images(real),
                                          feature_extractor=F.DOMAIN_EXTRACTOR, feature_net=net, fid=True, cuda=False,
                                          verbose=False, save_cpu_ram=True)
    assert tf["frechet_inception_distance"] == pytest.approx(expected, rel=1e-3, abs=1e-9)


@pytest.mark.parametrize("n", [30, 300])  # fewer samples than dimensions (a rank-deficient S1), and more
def test_frechet_distance_equals_torch_fidelitys_on_either_side_of_the_dimension(n):
    """The Gram-matrix trace term against torch-fidelity's fid_statistics_to_metric (a general eigenproblem of
    S1 S2), on correlated features of 128 dimensions whose sets differ in mean and covariance."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(n)
    mix = torch.randn(128, 128, generator=g, dtype=torch.float64) / 8
    real = torch.randn(500, 128, generator=g, dtype=torch.float64) @ mix
    gen = torch.randn(n, 128, generator=g, dtype=torch.float64) @ (mix + 0.05 * torch.randn(128, 128, generator=g,
                                                                                          dtype=torch.float64)) + 0.1
    st = fid_features_to_statistics(real)
    ref = F.ReferenceStats(real.float(), st["mu"], st["sigma"], "x", "x", "")
    theirs = fid_statistics_to_metric(fid_features_to_statistics(gen), st, False)["frechet_inception_distance"]
    ours = F.frechet_distance(gen, ref)
    assert theirs > 1.0 and ours == pytest.approx(theirs, rel=1e-6)  # measured 4e-8 at n = 30
    assert F.frechet_distance(real, ref) == pytest.approx(0.0, abs=1e-9)


def test_reference_stats_cached_and_invalidated(net, tmp_path, monkeypatch):
    real = blobs(40, 3)
    ext = F.domain_extractor(net)
    path = tmp_path / "ref.npz"
    first = F.reference_stats(real, ext, path)
    assert path.is_file()

    def boom(*a, **k):
        raise AssertionError("recomputed despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(F, "extract_features", boom)
        cached = F.reference_stats(real, ext, path)
    assert np.allclose(cached.mu, first.mu) and np.allclose(cached.sigma, first.sigma)
    assert torch.equal(cached.features, first.features)
    changed = F.reference_stats(blobs(40, 4), ext, path)  # another real set: fingerprint differs, recomputed
    assert not np.allclose(changed.mu, first.mu)
    assert F.ReferenceStats.load(path).fingerprint == changed.fingerprint


def random_inception_weights(path):
    """torchvision's Inception-v3 (torch-fidelity's architecture, 1008 logits) with random weights, BatchNorm
    statistics set by one forward pass so the features are not degenerate."""
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = None
    with torch.no_grad():
        m.train()(torch.randn(2, 3, 299, 299))
    torch.save(m.eval().state_dict(), path)
    return m.state_dict()


def test_inception_from_a_local_weights_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached copy of the real weights
    monkeypatch.setattr(socket, "getaddrinfo", _offline)
    weights = tmp_path / "inception.pth"
    state = random_inception_weights(weights)
    ext = F.inception_extractor(weights, download=False)
    assert isinstance(ext, F.FeatureExtractorInceptionV3)  # torch-fidelity's class, fed feature_extractor_weights_path
    # the file's weights, with each batch norm folded into its conv (inference statistics, eps 1e-3): w * g / sd
    key = "Mixed_7c.branch_pool"
    scale = state[f"{key}.bn.weight"] / (state[f"{key}.bn.running_var"] + 1e-3).sqrt()
    torch.testing.assert_close(ext.state_dict()[f"{key}.conv.weight"],
                               state[f"{key}.conv.weight"] * scale[:, None, None, None])
    real, gen = blobs(6, 5), noised(blobs(6, 6), 80.0)
    scores = F.fidelity_scores(gen, real, inception_weights=weights, inception_download=False)
    assert set(scores) == {"fid_inception", "kid_inception", "kid_inception_std"}
    assert np.isfinite(scores["fid_inception"]) and scores["fid_inception"] > 0
    assert np.isfinite(scores["kid_inception"])


def _offline(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")


def test_inception_skipped_offline_without_weights(net, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("DIFFUSION_INCEPTION_DIR", str(tmp_path / "none_installed"))
    monkeypatch.setattr(socket, "getaddrinfo", _offline)  # offline, whatever the test machine
    real = blobs(20, 7)
    with caplog.at_level(logging.WARNING, logger="diffusion_core.metrics.fidelity"):
        scores = F.fidelity_scores(real, real, feature_net=net, kid_subset_size=10)
    assert scores["fid_inception"] is None and scores["kid_inception"] is None
    assert scores["fd_domain"] is not None  # the domain metrics still work offline
    assert "fid_inception/kid_inception skipped" in caplog.text and "could not be downloaded" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusion_core.metrics.fidelity"):
        assert F.inception_extractor(None, download=False) is None
    assert "download disabled" in caplog.text and "inception fetch" in caplog.text
    with pytest.raises(MetricsError, match="missing.pth not found"):  # a file the user named is never skipped
        F.inception_extractor(tmp_path / "missing.pth")


def test_nll_bpd_pixel_model_and_latent_refused(tmp_path):
    bundle = load_diffusion_dir(make_diffusion_dir(tmp_path / "pix"))
    x = blobs(6, 8)
    mean, stderr = nll_bpd(bundle, x, batch_size=6, generator=torch.Generator().manual_seed(0))
    per = bundle.diffusion.bits_per_dim(bundle.model, x.float() / 127.5 - 1, generator=torch.Generator().manual_seed(0),
                                        clip_denoised=True)  # the sampled process: x0 clipped
    assert np.isfinite(mean) and mean > 0 and stderr > 0
    assert mean == pytest.approx(float(per.mean()), rel=1e-6)
    assert stderr == pytest.approx(float(per.std() / np.sqrt(6)), rel=1e-6)
    split = nll_bpd(bundle, x, batch_size=4, generator=torch.Generator().manual_seed(1))  # two batches
    assert abs(split[0] - mean) < 10 * stderr + 1e-3
    latent = load_diffusion_dir(make_latent_dir(tmp_path / "lat"))
    with pytest.raises(MetricsError, match="pixel-space"):
        nll_bpd(latent, torch.zeros(2, 2, 4, 4))


def test_nll_names_say_which_likelihood(tmp_path):
    """-log p(x) is `nll_bpd`; a class-conditional model's -log p(x|y) is `nll_bpd_given_class`, and its null class
    gives `nll_bpd` only when it was trained (label dropout > 0). Each equals nll_bpd with those labels."""
    x, y = blobs(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])

    def bound(bundle, labels=None):  # nll_on_test's seed-0 generator, fresh for each bound
        return nll_bpd(bundle, x, labels=labels, generator=torch.Generator().manual_seed(0))[0]

    uncond = load_diffusion_dir(make_diffusion_dir(tmp_path / "u"))
    out = nll_on_test(uncond, x, y, num=6, seed=0)
    assert set(out) == {"nll_bpd", "nll_bpd_se"}
    assert out["nll_bpd"] == pytest.approx(bound(uncond), rel=1e-6)
    cond = load_diffusion_dir(make_diffusion_dir(tmp_path / "c", num_classes=3, label_dropout=0.1))
    out = nll_on_test(cond, x, y, num=6, seed=0)
    assert set(out) == {"nll_bpd", "nll_bpd_se", "nll_bpd_given_class", "nll_bpd_given_class_se"}
    given, null = bound(cond, y), bound(cond)
    assert out["nll_bpd_given_class"] == pytest.approx(given, rel=1e-6)
    assert out["nll_bpd"] == pytest.approx(null, rel=1e-6) and null != pytest.approx(given, rel=1e-4)
    no_dropout = load_diffusion_dir(make_diffusion_dir(tmp_path / "c0", num_classes=3))
    assert set(nll_on_test(no_dropout, x, y, num=6, seed=0)) == {"nll_bpd_given_class", "nll_bpd_given_class_se"}
    assert nll_on_test(load_diffusion_dir(make_latent_dir(tmp_path / "lat")), x, y, num=6) == {}


def test_class_accuracy(net):
    x = blobs(30, 9)
    with torch.no_grad():
        pred = net(x.float() / 127.5 - 1).argmax(1)
    nhwc = x.permute(0, 2, 3, 1).numpy()  # samples.npz layout
    assert class_accuracy(net, nhwc, pred.numpy()) == 1.0
    assert class_accuracy(net, x, (pred + 1) % 3) == 0.0
    with pytest.raises(MetricsError, match="unconditional"):
        class_accuracy(net, x, -torch.ones(30, dtype=torch.long))
