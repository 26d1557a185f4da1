"""Guidance against closed forms on class-conditional Gaussian data (Dhariwal & Nichol 2021, Ho & Salimans 2022).

Data x0 | y ~ N(m_y, s^2 I), K classes equally likely. At a noise level (alpha, sigma), x_t | k ~ N(alpha m_k, v I)
with v = alpha^2 s^2 + sigma^2, so every quantity guidance uses is exact:
  eps_k(x) = sigma (x - alpha m_k) / v                         (the class-k denoiser, as eps)
  eps_null(x) = sum_k p(k | x) eps_k(x)                        (the unconditional one: the mixture)
  grad_x log p(y | x) = alpha (m_y - sum_k p(k | x) m_k) / v   (the exact noisy classifier's gradient)
Classifier guidance with scale s moves eps to eps - sigma s grad (Dhariwal & Nichol alg. 2), which on these data is
eps + s (eps_y - eps_null); classifier-free guidance with scale w is the eps of p(x|y)^w p(x)^(1-w):
(1 - w) eps_null + w eps_y, whatever the network predicts (eps, x0, v, mu, EDM's F: each affine in eps at fixed
x_t). The tests compare the library's guided predictions with these, for every formulation and several scales.
"""

import pytest
import torch

from diffusion_core import GaussianDiffusion, NoiseSchedule
from diffusion_core.guidance import ClassifierFreeGuidance, ClassifierGuidance, cfg_label_dropout
from diffusion_core.samplers import SamplingSpec, sample
from diffusion_core.samplers.common import Predictor

from .gaussian import GaussianMixtureDenoiser, GaussianNoisyClassifier

MEANS = torch.tensor([[-1.0, 0.5, 0.0], [1.0, 0.0, -0.5], [0.0, -1.0, 1.0]], dtype=torch.float64)
STD, K, SIGMA_DATA = 0.4, 3, 0.4
SCHED = NoiseSchedule.from_name("cosine", 1000)
FORMULATIONS = ["eps", "x0", "v", "mu", "edm"]


def _setup(parameterization="eps"):
    options = {"sigma_data": SIGMA_DATA} if parameterization == "edm" else {}
    diff = GaussianDiffusion(SCHED, parameterization, formulation_options=options)
    model = GaussianMixtureDenoiser(SCHED, MEANS, STD, parameterization, sigma_data=SIGMA_DATA)
    return diff, model, GaussianNoisyClassifier(SCHED, MEANS, STD)


def _batch(t: int, seed: int = 0, n: int = 64):
    """x_t drawn from the data's noisy marginal at t (so every class posterior is exercised), labels y."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, K, (n,), generator=g)
    ab = SCHED.alphas_cumprod[t]
    x = ab.sqrt() * (MEANS[k] + STD * torch.randn(n, 3, generator=g, dtype=torch.float64)) \
        + (1 - ab).sqrt() * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, torch.randint(0, K, (n,), generator=g)


def _closed_form(x, t: int, y):
    """(eps_y, eps_null, grad_x log p(y | x), sigma) at timestep t, from the formulas in the module docstring."""
    ab = SCHED.alphas_cumprod[t]
    alpha, sigma, v = ab.sqrt(), (1 - ab).sqrt(), ab * STD ** 2 + 1 - ab
    centred = x[:, None, :] - alpha * MEANS[None]  # [B, K, D]
    p = torch.softmax(-(centred ** 2).sum(-1) / (2 * v), dim=1)
    eps_k = sigma * centred / v
    eps_null = (p[:, :, None] * eps_k).sum(1)
    grad = alpha * (MEANS[y] - p @ MEANS) / v
    return eps_k[torch.arange(len(y)), y], eps_null, grad, sigma


def _unconditional(model):
    return lambda x, t, y=None: model(x, t, None)


@pytest.mark.parametrize("parameterization", FORMULATIONS)
@pytest.mark.parametrize("scale", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("t", [150, 600, 950])
def test_classifier_guidance_step_is_the_exact_tilted_eps(parameterization, scale, t):
    """On the unconditional model: eps_null - sigma s grad = eps_null + s (eps_y - eps_null); on the conditional
    one: eps_y + s (eps_y - eps_null) (classifier guidance on a conditional model is CFG at 1 + s)."""
    diff, model, clf = _setup(parameterization)
    x, y = _batch(t)
    eps_y, eps_null, grad, sigma = _closed_form(x, t, y)
    torch.testing.assert_close(eps_null - sigma * scale * grad, eps_null + scale * (eps_y - eps_null))
    guided = Predictor(diff, _unconditional(model), y, ClassifierGuidance(clf, scale), False, eps_guidance=True)
    # the classifier's gradient is taken in float32 (ClassifierGuidance.grad): float32's tolerance
    guided = guided(x, t)["eps"]
    torch.testing.assert_close(guided, eps_null - sigma * scale * grad, rtol=1e-5, atol=1e-6)
    on_conditional = Predictor(diff, model, y, ClassifierGuidance(clf, scale), False, eps_guidance=True)
    torch.testing.assert_close(on_conditional(x, t)["eps"], eps_y + scale * (eps_y - eps_null), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parameterization", FORMULATIONS)
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5, 4.0])
def test_classifier_free_guidance_is_the_exact_guided_eps_in_every_formulation(parameterization, scale):
    """The network's outputs are mixed, whatever they are; the eps they give is (1 - w) eps_null + w eps_y."""
    diff, model, _ = _setup(parameterization)
    t = 500
    x, y = _batch(t, seed=1)
    eps_y, eps_null, _, _ = _closed_form(x, t, y)
    out = Predictor(diff, model, y, ClassifierFreeGuidance(scale, null_class=K), False, eps_guidance=True)(x, t)
    torch.testing.assert_close(out["eps"], (1 - scale) * eps_null + scale * eps_y, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_ddpm_classifier_guidance_shifts_the_mean_by_variance_times_gradient(scale):
    """Dhariwal & Nichol alg. 1: mu + s Sigma grad_x log p(y | x_t), Sigma the reverse step's (fixed small)
    variance."""
    diff, model, clf = _setup("v")
    t = 400
    x, y = _batch(t, seed=2)
    _, _, grad, _ = _closed_form(x, t, y)
    plain = Predictor(diff, _unconditional(model), y, None, False, eps_guidance=False)(x, t)
    guided = Predictor(diff, _unconditional(model), y, ClassifierGuidance(clf, scale), False, eps_guidance=False)
    shift = guided(x, t)["mean"] - plain["mean"]
    torch.testing.assert_close(shift, SCHED.posterior_variance[t] * scale * grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_classifier_guided_sampling_equals_cfg_sampling_on_these_data(sampler, scale):
    """With the exact classifier on the unconditional model, classifier guidance at s and CFG at w = s are the
    same eps at every step, so deterministic samplers draw the same samples from the same noise; the classifier
    is called once per step and counted apart from the denoiser."""
    diff, model, clf = _setup("v")
    y = torch.arange(12) % K
    kw = dict(spec=SamplingSpec(sampler, steps=20), seeds=list(range(12)), y=y, clip_denoised=False)
    calls = []

    def counted(x, t, y=None):
        calls.append(len(x))
        return model(x, t, None)

    by_classifier = sample(diff, counted, (12, 3), guidance=ClassifierGuidance(clf, scale), **kw)
    by_cfg = sample(diff, model, (12, 3), guidance=ClassifierFreeGuidance(scale, null_class=K), **kw)
    torch.testing.assert_close(by_classifier, by_cfg, rtol=1e-5, atol=1e-6)
    assert clf.calls == len(calls) == 20 and sum(calls) == 20 * 12
    # and guidance draws toward the class: nearer its mean, on average, than unguided samples from the same noise
    plain = sample(diff, model, (12, 3), **{**kw, "y": torch.full((12,), K)})
    assert (by_cfg - MEANS[y]).norm(dim=1).mean() < 0.7 * (plain - MEANS[y]).norm(dim=1).mean()


def test_label_dropout_drops_the_fraction_asked_to_the_null_class_only():
    y = torch.arange(200_000) % K
    for p in (0.0, 0.1, 0.5):
        out = cfg_label_dropout(y, K, p, generator=torch.Generator().manual_seed(0))
        dropped = out == K
        assert ((out == y) | dropped).all()
        assert abs(dropped.float().mean().item() - p) < 4 * (p * (1 - p) / len(y)) ** 0.5 + 1e-12
    again = cfg_label_dropout(y, K, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, cfg_label_dropout(y, K, 0.1, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kind", ["none", "cfg", "classifier"])
def test_generate_counts_the_classifiers_calls_apart_from_the_denoisers(tmp_path, kind):
    """NFE per sample is the denoiser's (two a step with CFG); classifier guidance adds one classifier call (a
    forward and a backward pass) a step, reported as classifier_nfe."""
    from diffusion_core.generation import generate
    from diffusion_core.model_folders import load_classifier_dir, load_diffusion_dir

    from .tiny_models import make_classifier_dir, make_diffusion_dir

    bundle = load_diffusion_dir(make_diffusion_dir(tmp_path / "d", num_classes=3))
    clf = load_classifier_dir(make_classifier_dir(tmp_path / "c", num_classes=3)) if kind == "classifier" else None
    out = generate(bundle, 6, SamplingSpec("ddim", 5, guidance=kind, scale=2.0), classifier_bundle=clf, batch_size=4)
    assert out["nfe"] == (10 if kind == "cfg" else 5)
    assert out["classifier_nfe"] == (5 if kind == "classifier" else 0)


def test_label_dropout_trains_the_null_class_into_the_unconditional_model():
    """Trained with label dropout through the library's objective on two Gaussian classes, the network's null class
    predicts the mixture's eps (the exact unconditional model), far closer than either class's exact eps is; one
    trained without dropout never saw the null class and does not."""
    from diffusion_core.models import MLPDenoiser
    from diffusion_core.objectives import DiffusionObjective

    means = torch.tensor([[-1.5, 0.0], [1.5, 0.5]], dtype=torch.float64)
    diff = GaussianDiffusion(SCHED, "eps")
    exact = GaussianMixtureDenoiser(SCHED, means, 0.3, "eps")

    def trained(p):
        torch.manual_seed(0)
        net = MLPDenoiser(dim=2, hidden=64, num_layers=3, num_classes=2)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
        objective, g = DiffusionObjective(diff, 2, label_dropout=p), torch.Generator().manual_seed(1)
        for _ in range(800):
            y = torch.randint(0, 2, (256,), generator=g)
            x0 = (means[y] + 0.3 * torch.randn(256, 2, generator=g, dtype=torch.float64)).float()
            t = torch.randint(0, 1000, (256,), generator=g)
            loss, _ = objective(net, x0, y, t, g)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
        return net.eval()

    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 2, (4000,), generator=g)
    t = torch.randint(50, 950, (4000,), generator=g)
    ab = SCHED.alphas_cumprod[t][:, None]
    x_t = ab.sqrt() * (means[y] + 0.3 * torch.randn(4000, 2, generator=g, dtype=torch.float64)) \
        + (1 - ab).sqrt() * torch.randn(4000, 2, generator=g, dtype=torch.float64)
    null = torch.full((4000,), 2)
    target = exact(x_t, t, null)
    class_gap = ((exact(x_t, t, y) - target) ** 2).mean().item()
    nets = {p: trained(p) for p in (0.2, 0.0)}
    with torch.no_grad():
        errors = {p: ((net(x_t.float(), t, null).double() - target) ** 2).mean().item() for p, net in nets.items()}
        fit = ((nets[0.2](x_t.float(), t, y).double() - exact(x_t, t, y)) ** 2).mean().item()  # its classes' error
    assert errors[0.2] < min(0.3 * class_gap, 3 * fit) and errors[0.0] > class_gap, (errors, class_gap, fit)
