"""Every registered sampler against independent facts: Gaussian data's closed form, the exact probability-flow ODE
solution for a Gaussian (errors fall at the solver's order), diffusers' schedulers on the same denoiser, NFE."""

import math

import diffusers  # test-only oracle (dev dependency); a missing install must fail, not skip
import pytest
import torch

from diffusion_core import GaussianDiffusion, NoiseSchedule
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.samplers import SAMPLERS, SPACINGS, SamplingSpec, get_sampler, sample
from diffusion_core.samplers.dpm_solver import _differences, _ode_step
from diffusion_core.samplers.grids import KARRAS_RHO, grid_timesteps
from tests.gaussian import GaussianConsistency, GaussianDenoiser

MEAN, STD = torch.tensor([0.5, -0.3, 0.0, 0.2]), torch.tensor([0.25, 0.4, 0.3, 0.5])
STOCHASTIC = {"ddim": {"eta": 1.0}, "euler": {"s_churn": 20.0}, "heun": {"s_churn": 20.0}}
# samplers of a denoiser E[x0 | x_t]; `consistency` samples a consistency function (its own oracle below)
DENOISER_SAMPLERS = sorted(set(SAMPLERS) - {"consistency"})


def _setup(name="cosine"):
    sched = NoiseSchedule.from_name(name, 1000)
    return GaussianDiffusion(sched), GaussianDenoiser(sched, MEAN, STD)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("sampler", DENOISER_SAMPLERS)
def test_every_sampler_and_grid_reproduces_gaussian_data(sampler, spacing):
    """With the exact denoiser, every sampler on every grid draws the data's mean and std.

    The last step returns E[x0 | x_t] at the grid's lowest timestep t1, so the std to expect is
    sqrt(s^2 - Var(x0 | x_t1)) (up to 7% below the data's on a 50-step trailing grid, t1 = 19). The discretization
    error is of the solver's order: first-order samplers get 250 points, the others 100 (measured at 100 points:
    first-order ones 4-8% low, the others within 3%, dpmpp2m_sde 6% high on leading/linspace).
    """
    diff, model = _setup()
    steps = 250 if sampler in ("ddpm", "ddim", "euler") else 100
    x = sample(diff, model, (4000, 4), SamplingSpec(sampler, steps=steps, spacing=spacing), clip_denoised=False,
               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), MEAN, atol=0.03), (x.mean(0), MEAN)
    _check_std(x, model, grid_timesteps(diff.schedule, steps, spacing, -5.1)[0])


def _check_std(x, model, t1, tol=0.07):
    expected = (STD.double() ** 2 - model.posterior_var_x0(torch.tensor([int(t1)]))[0]).sqrt().float()
    assert torch.allclose(x.std(0) / expected, torch.ones(4), atol=tol), (x.std(0), expected)


@pytest.mark.parametrize("sampler,options", sorted(STOCHASTIC.items()))
def test_stochastic_options_keep_gaussian_data(sampler, options):
    diff, model = _setup()
    x = sample(diff, model, (4000, 4), SamplingSpec(sampler, steps=250, options=options), clip_denoised=False,
               generator=torch.Generator().manual_seed(1))
    assert torch.allclose(x.mean(0), MEAN, atol=0.03)
    _check_std(x, model, grid_timesteps(diff.schedule, 250, "trailing", -5.1)[0])


def _exact_ode_end(sched, x_T, t_start, t_end):
    """The probability-flow ODE keeps u = (x_t - alpha m) / sqrt(alpha^2 s^2 + sigma^2) for Gaussian data."""
    a0, aT = sched.alphas_cumprod[t_end], sched.alphas_cumprod[t_start]
    u = (x_T - aT.sqrt() * MEAN.double()) / (aT * STD.double() ** 2 + 1 - aT).sqrt()
    return a0.sqrt() * MEAN.double() + (a0 * STD.double() ** 2 + 1 - a0).sqrt() * u


@pytest.mark.parametrize("sampler,order", [("ddim", 1), ("euler", 1), ("heun", 2), ("dpmpp2m", 2), ("dpmpp3m", 2)])
def test_global_error_falls_at_the_solver_order(sampler, order):
    """float64 trajectory from t=999 to the last grid point t=0 (linspace grid), against the exact ODE solution.

    Multistep solvers start with lower-order steps, so DPM-Solver++(3M)'s global error is second order (its third
    order shows in the local error, next test); Heun measures 3 here (2 expected).
    """
    diff, model = _setup()
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errs = []
    for n in (32, 64, 128):
        states = {}
        sample(diff, model, x_T.shape, SamplingSpec(sampler, steps=n, spacing="linspace"), x_T=x_T, clip_denoised=False,
               lambda_min=None, callback=lambda i, x, x0: states.__setitem__(i, x))
        errs.append(float((states[1] - _exact_ode_end(diff.schedule, x_T, 999, 0)).abs().max()))
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert min(rates) > order - 0.3, (errs, rates)


@pytest.mark.parametrize("k,local_order,d2_weight", [(1, 2, 2.0), (2, 3, 2.0), (3, 4, 2.0), (3, 3, 1.0)])
def test_dpm_solver_pp_local_error_has_its_order(k, local_order, d2_weight, monkeypatch):
    """One DPM-Solver++ step of order k from exact history on the exact Gaussian trajectory: error O(h^(k+1)).

    d2_weight 1 is the reference code's / diffusers' third-order step: its local error is only O(h^3).
    """
    from diffusion_core.samplers import dpm_solver

    monkeypatch.setattr(dpm_solver, "D2_WEIGHT", d2_weight)
    m, s, u = 0.4, 0.5, torch.tensor([1.3], dtype=torch.float64)

    def state(lam):  # exact trajectory point and exact x0 prediction at log-SNR 2*lam
        a2 = 1 / (1 + math.exp(-2 * lam))
        a, sig = math.sqrt(a2), math.sqrt(1 - a2)
        x = a * m + math.sqrt(a2 * s ** 2 + sig ** 2) * u
        return x, m + a * s ** 2 / (a2 * s ** 2 + sig ** 2) * (x - a * m), a, sig

    errs = []
    for h in (0.1, 0.05, 0.025):
        lam0 = -1.0
        hist = [(state(lam0 - j * h)[1], lam0 - j * h) for j in (2, 1)]
        x, x0, _, s_s = state(lam0)
        exact, _, a_t, s_t = state(lam0 + h)
        errs.append(float((_ode_step(x, x0, hist, k, h, lam0, a_t, s_t, s_s) - exact).abs()))
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert abs(min(rates) - local_order) < 0.3 and abs(max(rates) - local_order) < 0.3, (errs, rates)
    assert _differences(torch.ones(1), [], 1, 0.1, 0.0) == (None, None)


def test_euler_is_deterministic_ddim():
    """Euler on dx~/dsigma = (x~ - D)/sigma is DDIM eta 0 (Karras et al. sec. 3; Song et al. eq. 14)."""
    diff, model = _setup()
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    a = sample(diff, model, x_T.shape, SamplingSpec("euler", steps=20), x_T=x_T, clip_denoised=False)
    b = sample(diff, model, x_T.shape, SamplingSpec("ddim", steps=20), x_T=x_T, clip_denoised=False)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_euler_and_heun_match_diffusers(name):
    diff, model = _setup("linear")
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(4))
    cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.HeunDiscreteScheduler
    ref = cls(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
              timestep_spacing="trailing")
    ours = sample(diff, model, x_T.shape, SamplingSpec(name, steps=20, spacing="trailing"), x_T=x_T,
                  clip_denoised=False, lambda_min=None)
    ref.set_timesteps(20)
    x = x_T * float((1 + ref.sigmas[0] ** 2).sqrt())  # diffusers works in x~ = x_t / alpha
    for t in ref.timesteps:
        eps = model(ref.scale_model_input(x, t), torch.full((256,), int(round(float(t)))))
        x = ref.step(eps, t, x).prev_sample
    assert ((ours - x).norm() / x.norm()).item() < 1e-4


@pytest.mark.parametrize("sampler,kw", [("dpmpp3m", dict(solver_order=3, algorithm_type="dpmsolver++")),
                                        ("dpmpp2m_sde", dict(solver_order=2, algorithm_type="sde-dpmsolver++"))])
def test_multistep_solvers_match_diffusers(sampler, kw, monkeypatch):
    from diffusion_core.samplers import dpm_solver

    monkeypatch.setattr(dpm_solver, "D2_WEIGHT", 1.0)  # diffusers' third-order step (see dpm_solver's docstring)
    diff, model = _setup("linear")
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(5))
    n = 20
    ours = sample(diff, model, x_T.shape, SamplingSpec(sampler, steps=n, spacing="trailing"), x_T=x_T,
                  clip_denoised=False, lambda_min=None, generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(6)  # our noise draws, in order: one per step but the last
    noises = ([torch.randn(x_T.shape, generator=g) for _ in range(n - 1)] if get_sampler(sampler).stochastic({})
              else None)
    ref = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                timestep_spacing="trailing", final_sigmas_type="zero", **kw)
    ref.set_timesteps(n)
    x = x_T.clone()
    for k, t in enumerate(ref.timesteps):
        step_kw = {"variance_noise": noises[k] if k < n - 1 else torch.zeros_like(x)} if noises else {}
        x = ref.step(model(x, torch.full((256,), int(t))), t, x, **step_kw).prev_sample
    assert ((ours - x).norm() / x.norm()).item() < 1e-4


def test_karras_grid_is_diffusers_karras_sigmas_snapped_to_timesteps():
    sched = NoiseSchedule.from_name("linear", 1000)
    ref = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="linear", use_karras_sigmas=True)
    ref.set_timesteps(25)
    assert ref.config.use_karras_sigmas and KARRAS_RHO == 7.0
    log_sigma = -0.5 * torch.log(sched.snr)
    nearest = [int((log_sigma - math.log(float(s))).abs().argmin()) for s in ref.sigmas[:-1]]
    ours = grid_timesteps(sched, 25, "karras").tolist()
    assert ours == sorted(set(nearest)) and len(ours) == 25


def test_logsnr_grid_is_uniform_in_log_snr():
    sched = NoiseSchedule.from_name("cosine", 1000)
    t = grid_timesteps(sched, 20, "logsnr", lambda_min=-5.1)
    lam = 0.5 * torch.log(sched.snr[t])
    steps = lam[:-1] - lam[1:]
    assert len(t) == 20 and lam.min() >= -5.1
    # near t=999 one cosine timestep spans ~0.1 in lambda, so the first steps snap coarsely
    inner = steps[2:-1]
    assert (inner.max() - inner.min()) / inner.mean() < 0.2, steps
    assert int(t[0]) == 0 and abs(float(lam[0] - lam[-1]) - float(steps.sum())) < 1e-9


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("cfg", [False, True])
def test_nfe_is_counted_for_every_sampler(sampler, cfg):
    """The registry's NFE formula equals the network calls the sampler makes (CFG: two per step)."""
    diff, model = _setup()
    calls = []

    def counting(x, t, y=None):
        calls.append(x.shape[0])
        return model(x, t)

    guidance = ClassifierFreeGuidance(2.0, null_class=3) if cfg else None
    y = torch.zeros(8, dtype=torch.long) if cfg else None
    sample(diff, counting, (8, 4), SamplingSpec(sampler, steps=12, options=STOCHASTIC.get(sampler) or {}),
           clip_denoised=False, guidance=guidance, y=y, generator=torch.Generator().manual_seed(7))
    assert sum(calls) / 8 == get_sampler(sampler).nfe(12, cfg=cfg)
    spec = get_sampler(sampler)
    assert spec.nfe(spec.steps_for_nfe(20, cfg), cfg) <= 20 < spec.nfe(spec.steps_for_nfe(20, cfg) + 1, cfg)


@pytest.mark.parametrize("parameterization", ["x0", "v", "mu", "edm"])
@pytest.mark.parametrize("sampler", DENOISER_SAMPLERS)
def test_every_sampler_runs_on_every_formulation(sampler, parameterization):
    """The rest of the sampler x formulation matrix (eps: the test above, on every grid): the exact Gaussian
    denoiser written in each formulation's output (x0, v, the DPM's mean mu, EDM's preconditioned F with sigma_data
    0.4), and every sampler draws the data's mean and std from it (the same bounds, on the trailing grid)."""
    sched = NoiseSchedule.from_name("cosine", 1000)
    options = {"sigma_data": 0.4} if parameterization == "edm" else {}
    diff = GaussianDiffusion(sched, parameterization, formulation_options=options)
    model = GaussianDenoiser(sched, MEAN, STD, parameterization, sigma_data=0.4)
    steps = 250 if sampler in ("ddpm", "ddim", "euler") else 100
    x = sample(diff, model, (4000, 4), SamplingSpec(sampler, steps=steps, spacing="trailing"), clip_denoised=False,
               generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), MEAN, atol=0.03), (x.mean(0), MEAN)
    _check_std(x, model, grid_timesteps(diff.schedule, steps, "trailing", -5.1)[0])


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampling_of_the_exact_consistency_function_draws_the_data(steps):
    """With Gaussian data's exact consistency function, multistep consistency sampling draws N(m, s^2) at any step
    count (each fresh noising gives the exact marginal at that level), and one step is the exact ODE map of x_T;
    the same sampler on the posterior-mean denoiser collapses the spread (it is not a sampler of denoisers)."""
    sched = NoiseSchedule.from_name("cosine", 1000)
    diff = GaussianDiffusion(sched, "v")
    f = GaussianConsistency(sched, MEAN, STD, "v")
    x_T = torch.randn(8000, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(spec=SamplingSpec("consistency", steps=steps), clip_denoised=False, lambda_min=None)
    x = sample(diff, f, x_T.shape, generator=torch.Generator().manual_seed(4), x_T=x_T, **kw)
    assert torch.allclose(x.mean(0).float(), MEAN, atol=0.02) and torch.allclose(x.std(0).float(), STD, rtol=0.03)
    if steps == 1:  # the ODE's invariant u at t = 999, carried to the data: m + s u
        ab = sched.alphas_cumprod[999]
        u = (x_T - ab.sqrt() * MEAN.double()) / (ab * STD.double() ** 2 + 1 - ab).sqrt()
        torch.testing.assert_close(x, MEAN.double() + STD.double() * u)
        assert ((x - _exact_ode_end(sched, x_T, 999, 0)).abs().max() / STD.min()) < 0.05  # and ~ its point at t = 0
    collapsed = sample(diff, GaussianDenoiser(sched, MEAN, STD, "v"), x_T.shape,
                       generator=torch.Generator().manual_seed(4), x_T=x_T, **kw)
    assert (collapsed.std(0).float() < 0.9 * STD).all()


@pytest.mark.parametrize("sampler", DENOISER_SAMPLERS)
def test_every_sampler_samples_a_learned_variance_model(sampler):
    """A learned-range model (Improved DDPM: twice the channels, the second half the variance interpolation v)
    samples through every sampler: DDPM ancestral draws with the learned variance, the others read the mean
    channels only. With the exact denoiser and v = 0 (halfway between beta~_t and beta_t in log), every sampler
    draws the data's mean and std (DDPM's with the tolerance of a variance between the two fixed ones)."""
    sched = NoiseSchedule.from_name("cosine", 1000)
    diff = GaussianDiffusion(sched, "eps", variance="learned_range", loss="hybrid")
    model = GaussianDenoiser(sched, MEAN, STD, "eps", extra_var_channels=True)
    steps = 250 if sampler in ("ddpm", "ddim", "euler") else 100
    x = sample(diff, model, (4000, 4), SamplingSpec(sampler, steps=steps, spacing="trailing"), clip_denoised=False,
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, 4) and torch.allclose(x.mean(0), MEAN, atol=0.03), (x.mean(0), MEAN)
    _check_std(x, model, grid_timesteps(diff.schedule, steps, "trailing", -5.1)[0], tol=0.1)
