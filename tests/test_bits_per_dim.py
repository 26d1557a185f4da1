"""The variational bound of the exact Gaussian denoiser, checked term by term against closed forms."""

import math

import pytest
import torch

from diffusion_core import GaussianDiffusion, NoiseSchedule
from tests.gaussian import GaussianDenoiser

S, D, N = 0.2, 16, 384


def _quantized_gaussian(n, generator):
    x = (torch.randn(n, D, generator=generator, dtype=torch.float64) * S).clamp(-1, 1)
    return torch.round((x + 1) * 127.5) / 127.5 - 1


def _entropy_bits():
    """Entropy of N(0, S^2) quantized to the 256 bins of [-1, 1] (edge bins open): the best any model can do."""
    edges = (torch.arange(1, 256, dtype=torch.float64) - 0.5) / 127.5 - 1 + 1 / 255  # bin boundaries
    cdf = torch.special.ndtr(edges / S)
    p = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), cdf, torch.ones(1, dtype=torch.float64)]))
    p = p[p > 0]
    return -(p * torch.log2(p)).sum().item()


def _closed_form_kl_bits(diff, model):
    """E[KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))] per dim for t >= 1, in bits.

    = 0.5 [log(sigma^2 / beta_tilde) + beta_tilde / sigma^2 - 1] + coef1^2 Var(x0|x_t) / (2 sigma^2).
    """
    s = diff.schedule
    t = torch.arange(1, s.num_timesteps)
    sigma2 = diff.model_log_variance(t, torch.zeros(len(t), 1, dtype=torch.float64)).view(-1).exp()
    bt = s.posterior_variance[t]
    var_x0 = model.posterior_var_x0(t)[:, 0]
    kl = 0.5 * (torch.log(sigma2 / bt) + bt / sigma2 - 1) + s.posterior_mean_coef1[t] ** 2 * var_x0 / (2 * sigma2)
    return kl / math.log(2)


@pytest.mark.parametrize("variance,looseness", [("fixed_large", (0.05, 0.5)), ("fixed_small", (0.4, 1.3))])
def test_bound_terms_match_closed_forms(variance, looseness):
    sched = NoiseSchedule.from_name("cosine", 1000)
    diff = GaussianDiffusion(sched, variance=variance)
    model = GaussianDenoiser(sched, torch.zeros(D), torch.full((D,), S))
    g = torch.Generator().manual_seed(0)
    x0 = _quantized_gaussian(N, g)
    terms = diff.bound_terms(model, x0, generator=g)
    mc = terms["vb"].mean(0)[1:]  # per-t Monte Carlo average over N samples x D dims
    closed = _closed_form_kl_bits(diff, model)
    big = closed > 1e-3
    assert torch.allclose(mc[big], closed[big], rtol=0.1), (mc[big] / closed[big]).aminmax()
    assert mc.sum().item() == pytest.approx(closed.sum().item(), rel=0.03)
    # the prior term: KL(N(sqrt(ab_T) x0, 1 - ab_T) || N(0, 1)) is ~0 for cosine's ab_T ~ 0
    assert terms["prior"].abs().max() < 1e-4
    h = _entropy_bits()
    total = terms["total"].mean().item()
    lo, hi = looseness
    assert h + lo < total < h + hi, (total, h)  # the bound exceeds the entropy by the fixed-variance gap


def test_decoder_term_uses_t1_posterior_variance():
    """At t=0 the decoder's log-variance is log beta_tilde_1 (improved-diffusion), not a clamp near zero."""
    sched = NoiseSchedule.from_name("linear", 1000)
    diff = GaussianDiffusion(sched)
    lv = diff.model_log_variance(torch.tensor([0]), torch.zeros(1, 1))
    assert lv.item() == pytest.approx(math.log(sched.posterior_variance[1].item()), rel=1e-6)


def test_bits_per_dim_penalizes_a_worse_model():
    sched = NoiseSchedule.from_name("cosine", 1000)
    diff = GaussianDiffusion(sched, variance="fixed_large")
    good = GaussianDenoiser(sched, torch.zeros(D), torch.full((D,), S))
    bad = GaussianDenoiser(sched, torch.zeros(D), torch.full((D,), 2 * S))
    x0 = _quantized_gaussian(128, torch.Generator().manual_seed(1))
    b_good = diff.bits_per_dim(good, x0, generator=torch.Generator().manual_seed(2)).mean()
    b_bad = diff.bits_per_dim(bad, x0, generator=torch.Generator().manual_seed(2)).mean()
    assert b_bad > b_good + 0.05


def test_clipping_x0_caps_the_cosine_last_steps_amplified_error_and_stays_a_bound():
    """Cosine's last step (beta clipped to 0.999: alpha_bar falls 1000-fold) hands an eps error delta to the mean as
    coef1 sqrt((1 - ab) / ab) delta, about 31 delta: the last term of the exact denoiser plus an offset delta is the
    closed form plus coef1^2 (1 - ab) / ab delta^2 / (2 sigma^2). With x0 clipped to [-1, 1] (the process pixel
    sampling runs) the mean lies within 2 coef1 of the true posterior mean, which caps that part of the KL at
    (2 coef1)^2 / (2 sigma^2); where nothing is clipped the two bounds agree."""
    sched = NoiseSchedule.from_name("cosine", 1000)
    diff = GaussianDiffusion(sched)  # fixed_small: sigma^2 = beta_tilde
    exact = GaussianDenoiser(sched, torch.zeros(D), torch.full((D,), S))
    delta = 0.2

    def offset(x_t, t, y=None):
        return exact(x_t, t) + delta

    g = torch.Generator().manual_seed(3)
    x0 = _quantized_gaussian(N, g)
    T, last = sched.num_timesteps, sched.num_timesteps - 1
    t = torch.full((N,), last)
    x_t = diff.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=x0.dtype))
    out = offset(x_t, t)
    raw = diff.vb_terms_bpd(out, x0, x_t, t).mean().item()
    clipped = diff.vb_terms_bpd(out, x0, x_t, t, clip_denoised=True).mean().item()
    ab, coef1, sigma2 = sched.alphas_cumprod[last], sched.posterior_mean_coef1[last], sched.posterior_variance[last]
    want = (_closed_form_kl_bits(diff, exact)[last - 1]
            + coef1 ** 2 * (1 - ab) / ab * delta ** 2 / (2 * sigma2) / math.log(2)).item()
    assert raw == pytest.approx(want, rel=0.05) and raw > 10
    assert 0 <= clipped <= ((2 * coef1) ** 2 / (2 * sigma2) / math.log(2)).item() + 1e-12
    terms = diff.bound_terms(exact, x0[:64], generator=torch.Generator().manual_seed(4), clip_denoised=True)
    plain = diff.bound_terms(exact, x0[:64], generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(terms["vb"][:, :T // 2], plain["vb"][:, :T // 2])  # x0 predictions inside [-1, 1]
    assert terms["total"].mean() <= plain["total"].mean() + 1e-9
