"""Formulations (eps, x0, v, mu, edm): targets, conversions, Min-SNR weights and EDM's noise distribution."""

import math

import pytest
import torch

from diffusion_core import GaussianDiffusion, NoiseSchedule
from diffusion_core.formulations import EDM, FORMULATIONS, Formulation
from diffusion_core.resample import ObjectiveSampler, make_timestep_sampler
from diffusion_core.samplers import SamplingSpec, sample
from tests.gaussian import GaussianDenoiser

ALL = ["eps", "x0", "v", "mu", "edm"]
OPTIONS = {"edm": {"sigma_data": 0.6}}


def _diff(p, name="cosine", **kw):
    return GaussianDiffusion(NoiseSchedule.from_name(name, 1000), p, formulation_options=OPTIONS.get(p, {}), **kw)


def _batch(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = 0.6 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x0, noise, t


def test_registry_holds_every_formulation_once():
    assert list(FORMULATIONS) == ALL
    assert all(issubclass(c, Formulation) and FORMULATIONS[c.name] is c for c in FORMULATIONS.values())


@pytest.mark.parametrize("p", ALL)
def test_target_converts_back_to_x0_and_eps(p):
    """A network that outputs the training target exactly yields the true x0 and eps (the forward process's)."""
    d = _diff(p)
    x0, noise, t = _batch()
    x_t = d.q_sample(x0, t, noise)
    target = d.formulation.target(d.levels(t, x_t), x0, noise, x_t)
    assert torch.allclose(d.x0_from_output(x_t, t, target), x0, atol=1e-6)
    ok = t > 0  # at t=0 (ab ~ 1) eps is ill-conditioned in every formulation
    assert torch.allclose(d.eps_from_output(x_t, t, target)[ok], noise[ok], atol=1e-4)


@pytest.mark.parametrize("p", ALL)
def test_x0_weight_relates_the_losses(p):
    """||F - target||^2 = lambda_t ||x0_hat - x0||^2 for an arbitrary output F (conversions are affine in F)."""
    d = _diff(p)
    x0, noise, t = _batch(seed=1)
    x_t = d.q_sample(x0, t, noise)
    target = d.formulation.target(d.levels(t, x_t), x0, noise, x_t)
    out = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lhs = ((out - target) ** 2).sum(1)
    rhs = d.formulation.x0_weight(d.levels(t)) * ((d.x0_from_output(x_t, t, out) - x0) ** 2).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-6)


@pytest.mark.parametrize("p", ALL)
def test_min_snr_loss_is_min_snr_times_x0_error(p):
    """Min-SNR-gamma means min(SNR, gamma) ||x0_hat - x0||^2 whatever the network predicts (Hang et al. eq. 5)."""
    d = _diff(p, min_snr_gamma=5.0)
    x0, noise, t = _batch(seed=3)
    x_t = d.q_sample(x0, t, noise)
    target = d.formulation.target(d.levels(t, x_t), x0, noise, x_t)
    out = target + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss = d.losses_from_output(out, x0, x_t, t, noise)["loss"]
    x0_err = ((d.x0_from_output(x_t, t, out) - x0) ** 2).mean(1)
    assert torch.allclose(loss, d.snr(t).clamp(max=5.0) * x0_err, rtol=1e-6)


def test_edm_with_unit_sigma_data_is_minus_v():
    d_edm = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000), "edm", formulation_options={"sigma_data": 1.0})
    d_v = _diff("v")
    x0, noise, t = _batch(seed=5)
    x_t = d_v.q_sample(x0, t, noise)
    assert torch.allclose(d_edm.model_input(x_t, t), x_t, atol=1e-9)
    assert torch.allclose(d_edm.formulation.target(d_edm.levels(t, x_t), x0, noise, x_t),
                          -d_v.formulation.target(d_v.levels(t, x_t), x0, noise, x_t), atol=1e-6)


def test_edm_network_input_has_unit_variance_for_data_of_std_sigma_data():
    """c_in makes Var(net input) = 1 at every noise level when Var(x0) = sigma_data^2 (Karras et al. eq. 7)."""
    d = _diff("edm")
    g = torch.Generator().manual_seed(6)
    x0 = 0.6 * torch.randn(20000, 1, generator=g, dtype=torch.float64)
    for ti in (0, 300, 700, 999):
        t = torch.full((20000,), ti)
        x_in = d.model_input(d.q_sample(x0, t), t)
        assert abs(x_in.std().item() - 1.0) < 0.02, ti


def test_edm_timestep_distribution_is_the_discretized_lognormal():
    d = _diff("edm")
    probs = d.formulation.timestep_probs(d.schedule)
    assert probs.shape == (1000,) and abs(probs.sum().item() - 1) < 1e-9
    log_s = -0.5 * torch.log(d.schedule.snr)
    mean = (probs * log_s).sum().item()
    std = math.sqrt((probs * (log_s - mean) ** 2).sum().item())
    assert abs(mean - -1.2) < 0.05 and abs(std - 1.2) < 0.05  # the grid spans ln s in about [-5, 10]
    sampler = make_timestep_sampler("uniform", 1000, probs)
    assert isinstance(sampler, ObjectiveSampler)
    t, w = sampler.sample(50000, generator=torch.Generator().manual_seed(7))
    assert torch.equal(w, torch.ones(50000))  # part of the objective: no importance weights
    assert abs(log_s[t].mean().item() - mean) < 0.03
    with pytest.raises(ValueError, match="timestep_sampler"):
        make_timestep_sampler("loss_aware", 1000, probs)


def test_bad_formulation_settings_name_the_fix():
    with pytest.raises(ValueError, match="accepted: eps, x0, v, mu, edm"):
        _diff("flow")
    with pytest.raises(ValueError, match="sigma_data"):
        EDM(sigma_data=0.0)
    with pytest.raises(ValueError, match="edm"):
        GaussianDiffusion(NoiseSchedule.from_name("cosine", 100), "edm", "learned_range", "hybrid")


def test_edm_samples_gaussian_data_with_the_exact_denoiser():
    """The preconditioned denoiser goes through every sampler's conversions: DDIM-100 reproduces the data."""
    d = _diff("edm")
    mean, std = torch.tensor([0.5, -0.3]), torch.tensor([0.25, 0.6])
    model = GaussianDenoiser(d.schedule, mean, std, "edm", sigma_data=0.6)
    x = sample(d, model, (4000, 2), SamplingSpec("ddim", steps=100), generator=torch.Generator().manual_seed(8),
               clip_denoised=False)
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert torch.allclose(x.std(0) / std, torch.ones(2), atol=0.05)
