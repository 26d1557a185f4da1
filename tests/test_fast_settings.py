"""The fast settings (bf16 autocast, channels_last, precomputed coefficient tables) keep results correct."""

import pytest
import torch

from diffusion_core.diffusion import COEFFICIENTS, GaussianDiffusion, extract
from diffusion_core.models import UNet
from diffusion_core.samplers import SamplingSpec, sample
from diffusion_core.schedules import NoiseSchedule

from .test_models import randomize_zero_params

SMALL = dict(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, num_heads=2, num_groups=4,
             attention_resolutions=(7,))


def model_and_batch(seed=0, b=8):
    torch.manual_seed(seed)
    model = randomize_zero_params(UNet(**SMALL), seed)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 1, 28, 28, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (b,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return model, x0, t, noise


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("parameterization,loss,variance", [("eps", "simple", "fixed_small"),
                                                            ("v", "hybrid", "learned_range")])
def test_bf16_autocast_training_loss_close_to_fp32(parameterization, loss, variance):
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000), parameterization, variance, loss)
    torch.manual_seed(0)
    model = randomize_zero_params(UNet(**SMALL, learn_sigma=d.learn_sigma))
    _, x0, t, noise = model_and_batch()
    ref = d.training_losses(model, x0, t, noise=noise)["loss"]
    ref.mean().backward()
    g32 = grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # the forward process runs inside autocast: schedule math and the loss must stay float32
        assert d.q_sample(x0, t, noise).dtype == torch.float32
        terms = d.training_losses(model, x0, t, noise=noise)
    assert all(v.dtype == torch.float32 for v in terms.values())
    terms["loss"].mean().backward()
    g16 = grads(model)
    torch.testing.assert_close(terms["loss"], ref, rtol=0.05, atol=0.01)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99


def test_channels_last_output_and_grads_equal_contiguous():
    model, x0, t, _ = model_and_batch()
    out = model(x0, t)
    out.square().mean().backward()
    g = grads(model)
    model.zero_grad()
    cl = model.to(memory_format=torch.channels_last)
    out_cl = cl(x0.contiguous(memory_format=torch.channels_last), t)
    out_cl.square().mean().backward()
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads(cl), g, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficient_tables_equal_extract(dtype):
    """The cached per-dtype tables give exactly what indexing the float64 table and casting gives."""
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))
    r = d.respaced(d.schedule.respace(torch.arange(0, 1000, 20)))
    for diff in (d, r):
        x = torch.zeros(5, 1, 2, 2, dtype=dtype)
        t = torch.tensor([0, 1, 7, 30, diff.num_timesteps - 1])
        for name, fn in COEFFICIENTS.items():
            assert torch.equal(diff.coef(name, t, x), extract(fn(diff.schedule), t, x)), name
            assert diff.coef(name, t, x).dtype == dtype
        assert torch.equal(r.coef("posterior_mean_coef1", t, x, train=True),
                           extract(r.train_schedule.posterior_mean_coef1, t, x))


def test_bf16_sampling_close_to_fp32():
    """A bf16-autocast network inside the float32 sampler loop gives samples close to the fp32 ones."""
    model, _, _, _ = model_and_batch()
    model.eval()
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 1000))

    def bf16(x, t, y=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, t, y).float()

    for sampler in ("ddim", "dpmpp2m"):
        spec = SamplingSpec(sampler, steps=8)
        ref = sample(d, model, (4, 1, 28, 28), spec, generator=torch.Generator().manual_seed(1))
        fast = sample(d, bf16, (4, 1, 28, 28), spec, generator=torch.Generator().manual_seed(1),
                      device="cpu")
        assert ref.dtype == fast.dtype == torch.float32
        assert (fast - ref).abs().mean() < 0.05, sampler


def test_group_norm_on_a_channels_last_input_equals_nn_group_norm_and_keeps_the_layout():
    """The library's GroupNorm detours a channels_last CPU input through the contiguous kernel (faster there): same
    values as nn.GroupNorm (forward and gradients), output still channels_last."""
    from diffusion_core.models.layers import group_norm

    torch.manual_seed(0)
    ours = group_norm(32, 8)
    ref = torch.nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 32, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    assert set(ours.state_dict()) == {"weight", "bias"}
