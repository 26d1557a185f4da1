"""An MLP trained for well under a minute on the Swiss roll must sample the Swiss roll."""

import numpy as np
import pytest
import torch
from sklearn.datasets import make_swiss_roll

from diffusion_core import GaussianDiffusion, NoiseSchedule
from diffusion_core.models import EMA, MLPDenoiser
from diffusion_core.resample import UniformSampler
from diffusion_core.samplers import sample


def swiss_roll(n, seed):
    pts, _ = make_swiss_roll(n_samples=n, noise=0.3, random_state=seed)
    return torch.tensor(pts[:, [0, 2]] / 10.0, dtype=torch.float32)


def sliced_wasserstein(a, b, n_proj=256, seed=0):
    """Mean over random directions of the 1-D Wasserstein-2 distance between the projected samples."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g)
    dirs = dirs / dirs.norm(dim=0)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = swiss_roll(20000, seed=1)
    diff = GaussianDiffusion(NoiseSchedule.from_name("linear", 1000))
    model = MLPDenoiser(dim=2, hidden=128, num_layers=4)
    ema = EMA(model, decay=0.995)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=2500)
    ts = UniformSampler(diff.num_timesteps)
    g = torch.Generator().manual_seed(0)
    for step in range(2500):
        x0 = data[torch.randint(0, len(data), (512,), generator=g)]
        t, w = ts.sample(512, generator=g)
        loss = (diff.training_losses(model, x0, t)["loss"] * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
        ema.update(model)
    return diff, ema.module.eval()


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 50), ("dpmpp2m", 20)])
def test_mlp_samples_the_swiss_roll(trained, sampler, steps):
    diff, model = trained
    fresh = swiss_roll(2000, seed=2)
    x = sample(diff, model, (2000, 2), sampler=sampler, steps=steps, clip_denoised=False,
               generator=torch.Generator().manual_seed(3))
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(4)) * fresh.std(0)
    swd_model, swd_noise = sliced_wasserstein(x, fresh), sliced_wasserstein(noise, fresh)
    data_vs_data = sliced_wasserstein(swiss_roll(2000, seed=5), fresh)
    assert swd_model < 0.35 * swd_noise, (swd_model, swd_noise, data_vs_data)
