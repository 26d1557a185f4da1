import diffusers  # test-only oracle (dev dependency); a missing install must fail, not skip
import pytest
import torch

from diffusion_core import GaussianDiffusion, NoiseSchedule
from diffusion_core.guidance import ClassifierFreeGuidance, ClassifierGuidance
from diffusion_core.samplers import SamplingSpec, sample
from tests.gaussian import GaussianDenoiser

MEAN = torch.tensor([0.5, -0.3, 0.0, 0.2])
STD = torch.tensor([0.25, 0.4, 0.3, 0.5])


def _setup(name="cosine", parameterization="eps", variance="fixed_small", extra=False):
    sched = NoiseSchedule.from_name(name, 1000)
    diff = GaussianDiffusion(sched, parameterization=parameterization, variance=variance,
                             loss="hybrid" if variance == "learned_range" else "simple")
    return diff, GaussianDenoiser(sched, MEAN, STD, parameterization, extra_var_channels=extra)


def _check_moments(x, tol_mean=0.03, tol_std=0.05):
    """Mean and per-dim std ratio. Few-step samplers end with x0 = E[x0|x_t] at the last kept t, which removes
    Var(x0|x_t) from the sample variance: a few percent here, more for data with smaller spread."""
    assert torch.allclose(x.mean(0), MEAN, atol=tol_mean), (x.mean(0), MEAN)
    assert torch.allclose(x.std(0) / STD, torch.ones(4), atol=tol_std), (x.std(0), STD)


@pytest.mark.parametrize("name,variance", [("cosine", "fixed_small"), ("linear", "fixed_large"),
                                           ("linear", "fixed_small")])
def test_ddpm_1000_steps_reproduces_gaussian_data(name, variance):
    diff, model = _setup(name, variance=variance)
    x = sample(diff, model, (4000, 4), SamplingSpec("ddpm"), generator=torch.Generator().manual_seed(0),
               clip_denoised=False)
    _check_moments(x)
    # the cosine-end guard skips the steps with log-SNR below 2 * -5.1 (cosine's last few; none of linear's)
    kept = int((0.5 * torch.log(diff.schedule.snr) >= -5.1).sum())
    assert model.calls == kept and 990 < kept <= 1000
    if name == "linear":
        assert kept == 1000


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v", "mu"])
def test_ddim_100_steps_reproduces_gaussian_data(parameterization):
    diff, model = _setup("cosine", parameterization)
    x = sample(diff, model, (4000, 4), SamplingSpec("ddim", steps=100), generator=torch.Generator().manual_seed(1),
               clip_denoised=False)
    _check_moments(x)
    assert model.calls == 100


def test_dpmpp2m_20_steps_reproduces_gaussian_data():
    diff, model = _setup("cosine")
    x = sample(diff, model, (4000, 4), SamplingSpec("dpmpp2m", steps=20), generator=torch.Generator().manual_seed(2),
               clip_denoised=False)
    _check_moments(x, tol_std=0.07)


def test_dpmpp2m_trajectory_matches_diffusers():
    diff, model = _setup("linear")
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(3))
    ours = sample(diff, model, x_T.shape, SamplingSpec("dpmpp2m", steps=20, spacing="trailing"), x_T=x_T,
                  clip_denoised=False, lambda_min=None)
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                timestep_spacing="trailing", solver_order=2,
                                                algorithm_type="dpmsolver++", final_sigmas_type="zero")
    ref.set_timesteps(20)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, torch.full((256,), int(t))), t, x).prev_sample
    assert ((ours - x).norm() / x.norm()).item() < 1e-4


def test_ddim_eta1_equals_ddpm_posterior_variance():
    """DDIM with eta=1 is DDPM ancestral sampling with sigma_t^2 = posterior variance (Song et al. sec. 4.1)."""
    diff, model = _setup("linear")
    kw = dict(clip_denoised=False, seeds=list(range(16)))
    a = sample(diff, model, (16, 4), SamplingSpec("ddim", steps=50, spacing="leading", options={"eta": 1.0}), **kw)
    b = sample(diff, model, (16, 4), SamplingSpec("ddpm", steps=50, spacing="leading"), **kw)
    assert torch.allclose(a, b, atol=1e-4)


def test_learned_range_at_the_upper_end_is_fixed_large():
    """learned_range with v=+1 interpolates fully to log beta_t, i.e. sigma_t^2 = beta_t (t >= 1)."""
    diff, _ = _setup("cosine", variance="learned_range")
    x = torch.randn(8, 4)
    t = torch.randint(1, 1000, (8,))
    out = torch.cat([torch.randn(8, 4), torch.ones(8, 4)], 1)
    lv = diff.p_mean_variance_from_output(out, x, t)["log_variance"]
    assert torch.allclose(lv, torch.log(diff.schedule.betas[t]).float()[:, None].expand(8, 4), atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("name,dname", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_ddim_trajectory_matches_diffusers(spacing, name, dname):
    diff, model = _setup(name)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    ours = sample(diff, model, x_T.shape, SamplingSpec("ddim", steps=50, spacing=spacing), x_T=x_T, clip_denoised=False,
                  lambda_min=None)
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=dname, timestep_spacing=spacing,
                                  clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(50)
    x = x_T.clone()
    for t in ref.timesteps:
        eps = model(x, torch.full((64,), int(t)))
        x = ref.step(eps, t, x, eta=0.0).prev_sample
    assert ((ours - x).norm() / x.norm()).item() < 1e-4


def test_per_sample_seeds_do_not_depend_on_batch_size():
    diff, model = _setup("cosine")
    seeds = list(range(100, 110))
    stochastic = {"ddpm": {}, "ddim": {"eta": 0.5}, "dpmpp2m_sde": {}, "heun": {"s_churn": 10.0},
                  "euler": {"s_churn": 10.0}}
    for sampler, options in stochastic.items():
        spec, kw = SamplingSpec(sampler, steps=25, options=options), dict(clip_denoised=False)
        whole = sample(diff, model, (10, 4), spec, seeds=seeds, **kw)
        parts = torch.cat([sample(diff, model, (3, 4), spec, seeds=seeds[:3], **kw),
                           sample(diff, model, (7, 4), spec, seeds=seeds[3:], **kw)])
        assert torch.equal(whole, parts)


def test_generator_determinism_and_x_T():
    diff, model = _setup("cosine")
    a = sample(diff, model, (8, 4), SamplingSpec("ddpm", steps=20), generator=torch.Generator().manual_seed(5))
    b = sample(diff, model, (8, 4), SamplingSpec("ddpm", steps=20), generator=torch.Generator().manual_seed(5))
    c = sample(diff, model, (8, 4), SamplingSpec("ddpm", steps=20), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    x_T = torch.randn(8, 4)
    spec = SamplingSpec("ddim", steps=20)
    d1 = sample(diff, model, (8, 4), spec, x_T=x_T, generator=torch.Generator().manual_seed(1))
    d2 = sample(diff, model, (8, 4), spec, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(d1, d2)  # eta=0 DDIM is a deterministic map of x_T


def test_clipping_keeps_samples_in_range():
    diff, _ = _setup("cosine")
    wide = GaussianDenoiser(diff.schedule, torch.zeros(4), torch.full((4,), 2.0))
    x = sample(diff, wide, (256, 4), SamplingSpec("ddim", steps=20), generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0
    x = sample(diff, wide, (256, 4), SamplingSpec("ddim", steps=20), generator=torch.Generator().manual_seed(0),
               clip_denoised=False)
    assert x.abs().max() > 1.5


class _LinearClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 3)

    def forward(self, x, t):
        return self.w(x) * (1 - t.float()[:, None] / 1000)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m"])
def test_classifier_guidance_scale_zero_equals_unguided(sampler):
    diff, model = _setup("cosine")
    kw = dict(spec=SamplingSpec(sampler, steps=20), seeds=list(range(6)), y=torch.tensor([0, 1, 2, 0, 1, 2]))
    plain = sample(diff, model, (6, 4), **kw)
    zero = sample(diff, model, (6, 4), guidance=ClassifierGuidance(_LinearClassifier(), 0.0), **kw)
    assert torch.equal(plain, zero)
    pushed = sample(diff, model, (6, 4), guidance=ClassifierGuidance(_LinearClassifier(), 5.0), **kw)
    assert not torch.allclose(plain, pushed)


def test_classifier_guidance_moves_samples_toward_the_class():
    """log p(y=1|x) = x_0 (up to a constant) tilts N(m, s^2) to N(m + s^2, s^2) in dim 0 under exact guidance."""

    class Tilt(torch.nn.Module):
        def forward(self, x, t):
            return torch.stack([torch.zeros_like(x[:, 0]), x[:, 0]], 1)

    diff, model = _setup("cosine")
    y = torch.ones(4000, dtype=torch.long)
    x = sample(diff, model, (4000, 4), SamplingSpec("ddpm", steps=100), clip_denoised=False, y=y,
               guidance=ClassifierGuidance(Tilt(), 1.0), generator=torch.Generator().manual_seed(0))
    plain = sample(diff, model, (4000, 4), SamplingSpec("ddpm", steps=100), clip_denoised=False,
                   generator=torch.Generator().manual_seed(0))
    shift = (x[:, 0].mean() - plain[:, 0].mean()).item()
    assert 0 < shift < 0.2  # toward the class; a noisy-x_t classifier is not the exact tilt, so only the sign and scale


class _CondGaussian(torch.nn.Module):
    """Exact denoiser whose data mean depends on the class; the null class (index 2) is the mixture mean."""

    def __init__(self, sched):
        super().__init__()
        self.dens = [GaussianDenoiser(sched, MEAN + k, STD) for k in (-0.5, 0.5, 0.0)]

    def forward(self, x, t, y=None):
        if y is None:
            y = torch.full((x.shape[0],), 2)
        out = torch.stack([dd(x, t) for dd in self.dens])
        return out[y, torch.arange(x.shape[0])]


def test_cfg_scale_zero_is_unconditional_and_one_is_conditional():
    diff, _ = _setup("cosine")
    model = _CondGaussian(diff.schedule)
    y = torch.tensor([0, 1] * 4)
    kw = dict(spec=SamplingSpec("ddim", steps=20), seeds=list(range(8)), clip_denoised=False)
    uncond = sample(diff, model, (8, 4), y=torch.full((8,), 2), **kw)
    assert torch.equal(sample(diff, model, (8, 4), y=y, guidance=ClassifierFreeGuidance(0.0, 2), **kw), uncond)
    cond = sample(diff, model, (8, 4), y=y, **kw)
    assert torch.equal(sample(diff, model, (8, 4), y=y, guidance=ClassifierFreeGuidance(1.0, 2), **kw), cond)
    g3 = sample(diff, model, (8, 4), y=y, guidance=ClassifierFreeGuidance(3.0, 2), **kw)
    # w > 1 extrapolates away from the unconditional mean: class 1 moves further up, class 0 further down
    assert (g3[1::2, 0] > cond[1::2, 0]).all() and (g3[0::2, 0] < cond[0::2, 0]).all()


def test_cfg_only_touches_mean_channels_of_learned_variance():
    calls = []

    def model(x, t, y):
        calls.append(y.clone())
        base = torch.where(y[:, None] == 2, torch.zeros_like(x), torch.ones_like(x))
        return torch.cat([base, torch.full_like(x, 0.25) + (y[:, None] == 2)], 1)

    g = ClassifierFreeGuidance(3.0, null_class=2).wrap(model)
    out = g(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]))
    assert torch.allclose(out[:, :2], torch.full((4, 2), 3.0))  # 0 + 3 (1 - 0)
    assert torch.allclose(out[:, 2:], torch.full((4, 2), 0.25))  # the conditional pass's variance channels
    assert len(calls) == 1  # one batched forward for both passes


def test_bad_sampler_arguments():
    diff, model = _setup("cosine")
    with pytest.raises(ValueError,
                       match="unknown sampler 'lms'; accepted: consistency, ddim, ddpm, dpmpp2m, dpmpp2m_sde, "
                             "dpmpp3m, euler, heun"):
        sample(diff, model, (2, 4), SamplingSpec("lms"))
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        sample(diff, model, (2, 4), SamplingSpec(steps=1001))
    with pytest.raises(ValueError, match=r"option eta must be in \[0.0, 1.0\]"):
        sample(diff, model, (2, 4), SamplingSpec(options={"eta": -0.1}))
    with pytest.raises(ValueError, match="sampler 'dpmpp2m' has no option 'eta'; its options: none"):
        sample(diff, model, (2, 4), SamplingSpec("dpmpp2m", options={"eta": 0.5}))
    with pytest.raises(ValueError, match="the spec asks for cfg guidance but no guidance object was given"):
        sample(diff, model, (2, 4), SamplingSpec(guidance="cfg", scale=2.0))
    with pytest.raises(ValueError, match="'heun' has no option 'churn'; its options: s_churn, s_tmin"):
        sample(diff, model, (2, 4), SamplingSpec("heun", options={"churn": 1}))
    with pytest.raises(ValueError, match="unknown spacing 'cosine'; accepted: leading, trailing, linspace, logsnr"):
        sample(diff, model, (2, 4), SamplingSpec(spacing="cosine"))
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        ClassifierFreeGuidance(-1.0, 2)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m", "ddpm"])
def test_cosine_end_guard_keeps_an_imperfect_model_stable(sampler):
    """At cosine's last steps (ab ~ 2e-9) an eps error becomes a huge x0 error; lambda_min avoids starting there.

    Deterministic samplers carry even a 1% error everywhere into the sample. DDPM's noise washes a small error out,
    so it gets the error a trained network really has: worst at the very end of the schedule (t >= 996 here, the
    steps the guard skips), where x_t is almost pure noise (measured on the default latent model: FD 28.7 -> 0.98).
    """
    diff, exact = _setup("cosine")

    def imperfect(x, t, y=None):
        if sampler == "ddpm":
            return exact(x, t) + 0.05 * (t >= 996).float()[:, None]
        return exact(x, t) + 0.01

    kw = dict(spec=SamplingSpec(sampler, steps=50), clip_denoised=False, generator=torch.Generator().manual_seed(0))
    unguarded = sample(diff, imperfect, (2000, 4), lambda_min=None, **kw)
    guarded = sample(diff, imperfect, (2000, 4), **kw)
    # the pitfall is real: the mean moves by more than the data's smallest std (0.25), far more for DDIM/DPM++
    assert (unguarded.mean(0) - MEAN).abs().max() > (0.25 if sampler == "ddpm" else 1.0)
    # 50 ancestral steps with the posterior variance lose ~12% of the spread (sigma_t below the true one)
    _check_moments(guarded, tol_mean=0.1, tol_std=0.15 if sampler == "ddpm" else 0.1)


def test_a_sampler_added_in_one_registration_runs_on_the_grid_sample_hands_it():
    """docs/architecture.md's recipe: a loop over the Grid and one `register`. Deterministic DDIM written that way
    draws exactly the built-in's samples, on the respaced grid the spacing asked for."""
    import math

    from diffusion_core.samplers import SAMPLERS, SamplerSpec
    from diffusion_core.samplers.registry import register

    seen = []

    def ddim0_loop(predict, x, grid, noise, options, callback=None):
        seen.append(grid)
        for i in reversed(range(len(grid))):
            a_prev = grid.alphas_cumprod_prev[i]  # the level this step lands on
            out = predict(x, i)
            x = a_prev ** 0.5 * out["pred_x0"] + max(1 - a_prev, 0.0) ** 0.5 * out["eps"]
        return x

    register(SamplerSpec("ddim0_test", ddim0_loop, "DDIM eta 0, written in a test", "Song et al. 2021"))
    try:
        diff, model = _setup("linear")
        kw = dict(clip_denoised=False)
        mine = sample(diff, model, (64, 4), SamplingSpec("ddim0_test", steps=10, spacing="karras"),
                      generator=torch.Generator().manual_seed(0), **kw)
        ref = sample(diff, model, (64, 4), SamplingSpec("ddim", steps=10, spacing="karras"),
                     generator=torch.Generator().manual_seed(0), **kw)
    finally:
        del SAMPLERS["ddim0_test"]
    assert torch.equal(mine, ref)
    (grid,) = seen
    assert len(grid) == 10 and list(grid.timesteps) == sorted(grid.timesteps) and grid.alphas_cumprod_prev[0] == 1.0
    ab = diff.schedule.alphas_cumprod
    assert all(math.isclose(grid.alphas_cumprod[i], float(ab[t])) for i, t in enumerate(grid.timesteps))
    assert all(grid.alphas_cumprod_prev[i] == grid.alphas_cumprod[i - 1] for i in range(1, 10))
