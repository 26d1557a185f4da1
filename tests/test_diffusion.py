import math

import diffusers  # test-only oracle (dev dependency); a missing install must fail, not skip
import pytest
import torch

from diffusion_core import GaussianDiffusion, NoiseSchedule
from diffusion_core.losses import discretized_gaussian_log_likelihood, normal_kl
from diffusion_core.resample import LossAwareSampler, UniformSampler, make_timestep_sampler


def _diff(name="linear", T=1000, **kw):
    return GaussianDiffusion(NoiseSchedule.from_name(name, T), **kw)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): product of two Gaussians in x_{t-1}."""
    d = _diff("cosine", dtype=None) if False else _diff("cosine")
    s = d.schedule
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(64, 3, generator=g, dtype=torch.float64)
    t = torch.randint(1, 1000, (64,), generator=g)
    mean, var, _ = d.q_posterior(x0, x_t, t)
    ab_prev, a, b = s.alphas_cumprod[t - 1][:, None], s.alphas[t][:, None], s.betas[t][:, None]
    prec = 1 / (1 - ab_prev) + a / b
    bayes_mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + a.sqrt() * x_t / b) / prec
    assert torch.allclose(mean, bayes_mean, rtol=1e-9, atol=1e-12)
    assert torch.allclose(var.expand_as(mean), (1 / prec).expand_as(mean), rtol=1e-9)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-10)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_eps_x0_v_round_trips_float64(name):
    d = _diff(name)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(256, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(256, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 999, (256,), generator=g)  # t=999 of cosine has ab ~ 1e-8: x0 from eps is ill-conditioned
    x_t = d.q_sample(x0, t, eps)
    assert torch.allclose(d.x0_from_eps(x_t, t, eps), x0, atol=1e-8)
    assert torch.allclose(d.eps_from_x0(x_t, t, x0), eps, atol=1e-8)
    v = d.v_from_x0_eps(x0, eps, t)
    assert torch.allclose(d.x0_from_v(x_t, t, v), x0, atol=1e-9)
    dv = GaussianDiffusion(d.schedule, parameterization="v")
    assert torch.allclose(dv.eps_from_output(x_t, t, v), eps, atol=1e-9)
    mean, _, _ = d.q_posterior(x0, x_t, t)
    dmu = GaussianDiffusion(d.schedule, parameterization="mu")
    assert torch.allclose(dmu.x0_from_output(x_t, t, mean), x0, atol=1e-6)


def test_q_sample_matches_diffusers_add_noise():
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    d = _diff("cosine")
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(32, 1, 8, 8, generator=g), torch.randn(32, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    assert torch.allclose(d.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_ddpm_posterior_step_matches_diffusers(t):
    """diffusers' DDPMScheduler.step = posterior mean (from predicted x0) + sqrt(posterior var) * z."""
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  variance_type="fixed_small")
    d = _diff("linear")
    g = torch.Generator().manual_seed(4)
    x_t, eps = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    got = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(5)).prev_sample
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    tt = torch.full((8,), t)
    out = d.p_mean_variance_from_output(eps, x_t, tt)
    ours = out["mean"] + d.schedule.posterior_variance[t].sqrt().float() * z
    assert torch.allclose(ours, got, rtol=1e-4, atol=1e-5)


def test_discretized_likelihood_sums_to_one_over_bins():
    """Integrated over all 256 bins of [-1, 1] (edge bins open), the decoder's probabilities sum to 1."""
    bins = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in [(0.0, -3.0), (0.3, -6.0), (-0.99, -1.0), (0.5, math.log(0.004))]:
        lp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
        assert bool(torch.isfinite(lp).all())


def test_seeds_weighted_loss_equals_weighted_eps_loss():
    """omega_t ||mu_w - eta_t||^2 = omega_t beta_t^2 / (alpha_t (1 - ab_t)) ||eps_w - eps||^2 (seeds, DDPM)."""
    d = _diff("linear", loss="weighted", variance="fixed_large")
    g = torch.Generator().manual_seed(6)
    x0, noise = (torch.randn(16, 5, generator=g, dtype=torch.float64),
                 torch.randn(16, 5, generator=g, dtype=torch.float64))
    eps_hat = torch.randn(16, 5, generator=g, dtype=torch.float64)
    t = torch.randint(1, 1000, (16,), generator=g)
    losses = d.training_losses(lambda x, tt, y: eps_hat, x0, t, noise=noise)
    s = d.schedule
    omega = 1 / s.betas[t]  # fixed_large: sigma_t^2 = beta_t for t >= 1
    omega_bar = omega * s.betas[t] ** 2 / (s.alphas[t] * (1 - s.alphas_cumprod[t]))
    assert torch.allclose(losses["loss"], omega_bar * ((eps_hat - noise) ** 2).mean(1), rtol=1e-8)


def test_min_snr_weight_for_eps():
    d = _diff("cosine", min_snr_gamma=5.0)
    t = torch.tensor([0, 100, 500, 900])
    snr = d.schedule.snr[t]
    assert torch.allclose(d.min_snr_weight(t), snr.clamp(max=5.0) / snr)
    assert d.min_snr_weight(t)[0] < 1 and d.min_snr_weight(t)[-1] == 1


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "mu"])
def test_perfect_prediction_has_zero_simple_loss(parameterization):
    """The model that outputs the true target for the drawn noise has L_simple = 0 in every parameterization."""
    d = _diff("cosine", parameterization=parameterization)
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    t = torch.randint(1, 999, (8,), generator=g)

    def oracle(x_t, tt, y):
        if parameterization == "eps":
            return noise
        if parameterization == "x0":
            return x0
        if parameterization == "v":
            return d.v_from_x0_eps(x0, noise, t)
        return d.q_posterior(x0, x_t, t)[0]

    losses = d.training_losses(oracle, x0, t, noise=noise)
    assert losses["loss"].abs().max() < 1e-12


def test_hybrid_loss_stops_gradient_of_vb_into_mean():
    d = _diff("cosine", variance="learned_range", loss="hybrid")
    g = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    out = torch.randn(4, 4, generator=g, requires_grad=True)
    t = torch.randint(0, 1000, (4,), generator=g)
    x_t = d.q_sample(x0, t, noise)
    d.losses_from_output(out, x0, x_t, t, noise)["loss"].sum().backward()
    mse_grad = 2 * (out[:, :2] - noise).detach() / 2  # d/d out of mean((out - eps)^2) over 2 dims
    assert torch.allclose(out.grad[:, :2], mse_grad, atol=1e-6)
    assert out.grad[:, 2:].abs().sum() > 0  # the vb term trains the variance channels


def test_refuses_learned_range_with_simple_loss():
    with pytest.raises(ValueError, match="learned_range.*hybrid"):
        _diff("cosine", variance="learned_range", loss="simple")
    with pytest.raises(ValueError, match="accepted: eps, x0, v, mu"):
        _diff("cosine", parameterization="score")


def test_loss_aware_sampler_weights_are_unbiased():
    T = 20
    s = LossAwareSampler(T, history=3)
    g = torch.Generator().manual_seed(9)
    assert torch.allclose(s.probs(), UniformSampler(T).probs())
    true_loss = torch.linspace(0.1, 5.0, T, dtype=torch.float64)
    for _ in range(4):
        s.update(torch.arange(T), true_loss)
    assert s.warmed_up()
    p = s.probs()
    assert p.sum().item() == pytest.approx(1.0)
    assert p[-1] > 10 * p[0]  # importance follows sqrt(E[L^2]), mixed with 0.1% uniform
    # E_p[w_t L_t] with w_t = 1/(T p_t) is the uniform mean of L_t
    assert (p * (1 / (T * p)) * true_loss).sum().item() == pytest.approx(true_loss.mean().item(), rel=1e-12)
    t, w = s.sample(10000, generator=g)
    assert torch.allclose(w.double(), 1 / (T * p[t]), rtol=1e-6)
    emp = (w.double() * true_loss[t]).mean().item()
    assert emp == pytest.approx(true_loss.mean().item(), rel=0.05)
    s2 = make_timestep_sampler("loss_aware", T)
    s2.load_state_dict(s.state_dict())
    assert torch.equal(s2.probs(), p)
