import math

import diffusers  # test-only oracle (dev dependency); a missing install must fail, not skip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_core.schedules import NoiseSchedule, cosine_alpha_bar, spaced_timesteps


def test_linear_endpoints_scale_with_T():
    s = NoiseSchedule.from_name("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    s2 = NoiseSchedule.from_name("linear", 250)
    assert s2.betas[0].item() == pytest.approx(4e-4, rel=1e-12)
    assert s2.betas[-1].item() == pytest.approx(0.08, rel=1e-12)
    assert s.betas.dtype == torch.float64


def test_cosine_alpha_bar_matches_formula():
    T = 1000
    s = NoiseSchedule.from_name("cosine", T)
    t = torch.arange(T, dtype=torch.float64)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f((i + 1) / T) / f(0) for i in range(T)], dtype=torch.float64)
    # the cap beta <= 0.999 only bites at the very end
    assert torch.allclose(s.alphas_cumprod[:-1], expected[:-1], rtol=1e-10, atol=0)
    assert s.betas.max().item() <= 0.999
    assert torch.allclose(cosine_alpha_bar(t / T) / cosine_alpha_bar(torch.zeros(1, dtype=torch.float64)),
                          torch.tensor([f(i / T) / f(0) for i in range(T)], dtype=torch.float64))


def test_sigmoid_schedule_is_monotone_and_ends_near_zero():
    s = NoiseSchedule.from_name("sigmoid", 1000)
    ab = s.alphas_cumprod
    assert bool((ab[1:] < ab[:-1]).all())
    assert ab[0] > 0.99 and ab[-1] < 1e-3


@pytest.mark.parametrize("name,dname", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedule_matches_diffusers(name, dname):
    ours = NoiseSchedule.from_name(name, 1000)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=dname)
    assert torch.allclose(ours.betas.float(), ref.betas, rtol=1e-4, atol=1e-7)
    assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 50, 333])
def test_spacing_matches_diffusers(spacing, steps):
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = spaced_timesteps(1000, steps, spacing)
    assert torch.equal(ours.flip(0), ref.timesteps.long())


@pytest.mark.parametrize("T,steps", [(711, 469), (1000, 3), (1000, 7), (999, 333), (50, 49)])
def test_trailing_spacing_has_exactly_steps_valid_timesteps(T, steps):
    """diffusers' float-step arange gives 470 values, one of them -1, for T=711, steps=469 (found by hypothesis)."""
    ts = spaced_timesteps(T, steps, "trailing")
    assert len(ts) == steps and ts.min() >= 0 and ts.max() == T - 1
    ratio = T / steps
    expected = sorted({round(T - i * ratio) - 1 for i in range(steps)})
    assert ts.tolist() == expected


def test_respace_keeps_alpha_bar_at_kept_steps():
    s = NoiseSchedule.from_name("cosine", 1000)
    r = s.spaced(50, "trailing")
    assert r.num_timesteps == 50 and r.is_respaced
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-12)
    assert torch.allclose(r.alphas_cumprod_prev[1:], s.alphas_cumprod[r.timesteps[:-1]], rtol=1e-12)
    assert r.alphas_cumprod_prev[0] == 1.0


def test_posterior_constants_closed_form():
    s = NoiseSchedule.from_name("linear", 1000)
    t = 500
    ab, abp, b = s.alphas_cumprod[t], s.alphas_cumprod[t - 1], s.betas[t]
    assert s.posterior_variance[t] == pytest.approx((b * (1 - abp) / (1 - ab)).item(), rel=1e-12)
    assert s.snr[t] == pytest.approx((ab / (1 - ab)).item(), rel=1e-12)
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["linear", "cosine", "sigmoid"]), T=st.integers(2, 1200), data=st.data())
def test_respacing_property(name, T, data):
    steps = data.draw(st.integers(1, T))
    spacing = data.draw(st.sampled_from(["leading", "trailing", "linspace"]))
    if name == "linear" and T <= 20:
        with pytest.raises(ValueError, match="linear schedule needs num_timesteps > 20"):
            NoiseSchedule.from_name(name, T)
        return
    s = NoiseSchedule.from_name(name, T)
    r = s.spaced(steps, spacing)
    assert 1 <= r.num_timesteps <= steps
    assert bool(((r.betas > 0) & (r.betas <= 1)).all())
    assert bool((r.alphas_cumprod[1:] < r.alphas_cumprod[:-1]).all())
    assert bool((r.timesteps >= 0).all()) and bool((r.timesteps < T).all())
    assert torch.allclose(r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 500), steps=st.one_of(st.integers(-5, 0), st.integers(501, 2000)))
def test_invalid_steps_are_refused(T, steps):
    with pytest.raises(ValueError, match="steps must be in"):
        spaced_timesteps(T, steps if steps <= 0 else T + steps, "leading")


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="accepted: linear, cosine, sigmoid"):
        NoiseSchedule.from_name("cosinus", 100)
    with pytest.raises(ValueError, match="accepted: leading, trailing, linspace"):
        spaced_timesteps(100, 10, "middle")


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("shift", [2.0, -1.0, math.log(64) - math.log(8)])
def test_logsnr_shift_adds_the_shift_to_log_snr_at_every_step(name, shift):
    base, shifted = NoiseSchedule.from_name(name, 1000), NoiseSchedule.from_name(name, 1000, logsnr_shift=shift)
    # log SNR = log(alpha_bar / (1 - alpha_bar)), computed independently of shift_logsnr's logit; cosine's last
    # step is capped (beta <= 0.999) in both, so compare all but the end
    lsnr = lambda ab: torch.log(ab) - torch.log1p(-ab)  # noqa: E731
    diff = lsnr(shifted.alphas_cumprod) - lsnr(base.alphas_cumprod)
    assert torch.allclose(diff[:-5], torch.full_like(diff[:-5], shift), atol=1e-8)
    assert shifted.name == f"{name}{shift:+g}" and bool(((shifted.betas > 0) & (shifted.betas < 1)).all())


def test_logsnr_shift_survives_the_model_folder_spec():
    from diffusion_core.model_folders import build_diffusion, diffusion_spec
    from diffusion_core.options import DiffusionOptions, ScheduleOptions

    sched = ScheduleOptions(name="cosine", num_timesteps=1000, logsnr_shift=1.5)
    diff = DiffusionOptions(parameterization="v")
    spec = diffusion_spec(sched, diff)
    assert spec["logsnr_shift"] == 1.5
    expected = NoiseSchedule.from_name("cosine", 1000, logsnr_shift=1.5).alphas_cumprod
    assert torch.equal(build_diffusion(spec).schedule.alphas_cumprod, expected)
    del spec["logsnr_shift"]  # folders written before the option: the published schedule
    assert torch.equal(build_diffusion(spec).schedule.alphas_cumprod,
                       NoiseSchedule.from_name("cosine", 1000).alphas_cumprod)


def test_a_non_finite_logsnr_shift_is_refused():
    with pytest.raises(ValueError, match="logsnr_shift"):
        NoiseSchedule.from_name("cosine", 100, logsnr_shift=float("nan"))
