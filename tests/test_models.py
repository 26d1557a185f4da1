"""Models: shapes, gradients, odd sizes, null class, bf16 autocast, channels_last, EMA algebra, KL closed form."""

import json
import math

import pytest
import torch
from torch import nn

from diffusion_core.models import EMA, AutoencoderKL, DiT, FeatureNet, MLPDenoiser, NoisyClassifier, UNet, build_model
from diffusion_core.models.autoencoder import DiagonalGaussian
from diffusion_core.models.dit import DiTBlock, sincos_positions
from diffusion_core.models.layers import AttentionBlock, ResBlock, timestep_embedding

TINY = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, num_groups=4)
TINY28 = {**TINY, "channel_mult": (1, 2, 2)}  # 28 -> 14 -> 7


def randomize_zero_params(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialized layers random weights so outputs depend on every path (zero output proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def check_backward(model: nn.Module, out: torch.Tensor) -> None:
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000.0) * i / 4) for i in range(4)]
    expected = [[math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs] for ti in (0, 3, 999)]
    torch.testing.assert_close(emb, torch.tensor(expected), atol=1e-4, rtol=1e-4)
    # float timesteps (e.g. continuous-time samplers) are accepted and agree with integer ones
    torch.testing.assert_close(timestep_embedding(t.float(), 8), emb)


def test_attention_block_matches_explicit_softmax_attention():
    block = randomize_zero_params(AttentionBlock(8, num_heads=2, num_groups=4))
    x = torch.randn(2, 8, 3, 5)
    tokens = block.norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
    q, k, v = block.qkv(tokens).split(8, dim=-1)
    heads = []
    for h in range(2):  # head h owns channels 4h..4h+3 of q, k and v
        qh, kh, vh = (a[..., 4 * h:4 * h + 4] for a in (q, k, v))
        heads.append(torch.softmax(qh @ kh.transpose(1, 2) / 2.0, dim=-1) @ vh)
    expected = x + block.proj(torch.cat(heads, dim=-1)).transpose(1, 2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_resblock_scale_shift_and_identity_init():
    block = ResBlock(4, 4, emb_dim=6, num_groups=2)
    x, emb = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    torch.testing.assert_close(block(x, emb), x)  # zero-initialized conv2: the block starts as the identity
    randomize_zero_params(block)
    scale, shift = block.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x)))) * (1 + scale) + shift
    torch.testing.assert_close(block(x, emb), x + block.conv2(torch.nn.functional.silu(h)))


@pytest.mark.parametrize("size,attn", [(28, (7,)), (8, (4,)), (7, (7, 4))])
def test_unet_shapes_odd_sizes_and_backward(size, attn):
    model = randomize_zero_params(UNet(in_channels=3, image_size=size, attention_resolutions=attn,
                                       **TINY28))
    assert any(isinstance(m, AttentionBlock) for m in model.modules())
    x = torch.randn(2, 3, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    check_backward(model, out)


def test_unet_final_conv_is_zero_initialized():
    model = UNet(image_size=8, attention_resolutions=(), **TINY)
    assert torch.count_nonzero(model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))) == 0


def test_unet_learn_sigma_doubles_channels_and_out_channels():
    model = UNet(in_channels=4, image_size=8, learn_sigma=True, attention_resolutions=(), **TINY)
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([3, 4])).shape == (2, 8, 8, 8)
    model = UNet(in_channels=1, out_channels=3, image_size=8, learn_sigma=True, **TINY)
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([3, 4])).shape == (2, 6, 8, 8)


def test_unet_class_labels_and_null_class():
    model = randomize_zero_params(UNet(image_size=8, num_classes=3, attention_resolutions=(4,), **TINY)).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 5, 5, 5])
    out = model(x, t, torch.tensor([0, 1, 2, 3]))  # 3 = the null class
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((4,), 3)))  # y=None means the null class
    torch.testing.assert_close(out[3:], model(x[3:], t[3:], None))
    assert not torch.allclose(out[0], model(x[:1], t[:1], torch.tensor([1]))[0])  # labels change the output
    assert model.embed.class_embed.num_embeddings == 4
    with pytest.raises(IndexError):
        model(x, t, torch.full((4,), 4))  # beyond the null class
    with pytest.raises(ValueError, match="unconditional"):
        UNet(image_size=8, **TINY)(x, t, torch.zeros(4, dtype=torch.long))


def test_unet_timestep_changes_output_and_scalar_t_broadcasts():
    model = randomize_zero_params(UNet(image_size=8, attention_resolutions=(), **TINY)).eval()
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([500, 500])))
    torch.testing.assert_close(model(x, torch.tensor(7)), model(x, torch.tensor([7, 7])))


def test_unet_bf16_autocast_close_to_fp32():
    model = randomize_zero_params(UNet(image_size=28, attention_resolutions=(7,), **TINY28)).eval()
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 900]), None
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, y)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()  # autocast really ran in bf16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_unet_channels_last_matches_contiguous():
    model = randomize_zero_params(UNet(image_size=28, attention_resolutions=(7,), **TINY28)).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 400])
    ref = model(x, t)
    model_cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last), t), ref, atol=1e-5, rtol=1e-4)


def test_mlp_denoiser():
    model = randomize_zero_params(MLPDenoiser(dim=2, hidden=32, num_layers=2, num_classes=3, learn_sigma=True))
    x, t = torch.randn(5, 2), torch.randint(0, 1000, (5,))
    out = model(x, t, torch.tensor([0, 1, 2, 3, 3]))
    assert out.shape == (5, 4)
    torch.testing.assert_close(out[3:], model(x[3:], t[3:]))  # y=None is the null class
    check_backward(model, out)
    assert MLPDenoiser(hidden=16)(x, t).shape == (5, 2)


def test_noisy_classifier():
    model = randomize_zero_params(NoisyClassifier(in_channels=1, image_size=7, num_classes=10, **TINY))
    x = torch.randn(3, 1, 7, 7)
    logits = model(x, torch.tensor([0, 10, 999]))
    assert logits.shape == (3, 10)
    assert not torch.allclose(logits[0], model(x[:1], torch.tensor([500]))[0])  # time-conditioned
    check_backward(model, logits)


def test_feature_net():
    model = FeatureNet(in_channels=1, image_size=28, num_classes=10, width=8, feature_dim=16)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert model.features(x).shape == (3, 16)
    logits = model(x)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(logits, model.head(model.features(x)))
    check_backward(model, logits)


@pytest.mark.parametrize("mult,side", [((1, 2, 2), 8), ((1, 2, 2, 2), 4)])
def test_autoencoder_shapes_and_padding(mult, side):
    model = AutoencoderKL(in_channels=1, image_size=28, latent_channels=3, base_channels=8, channel_mult=mult,
                          num_groups=4)
    assert model.latent_shape == (3, side, side) and model.config["padded_size"] == 32
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 3, side, side)
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    assert rec.shape == x.shape
    check_backward(model, rec.square().mean() + post.kl().mean())
    assert AutoencoderKL(image_size=8, base_channels=8, num_groups=4).latent_shape == (4, 2, 2)  # no padding needed


def test_autoencoder_sampling_is_seeded():
    model = AutoencoderKL(image_size=8, base_channels=8, num_groups=4)
    x = torch.randn(2, 1, 8, 8)
    a, _ = model(x, generator=torch.Generator().manual_seed(1))
    b, _ = model(x, generator=torch.Generator().manual_seed(1))
    c, _ = model(x, sample_posterior=False)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_diagonal_gaussian_kl_closed_form():
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, summed over dimensions
    s = torch.exp(0.5 * logvar)
    expected = (-torch.log(s) + (s**2 + mean**2) / 2 - 0.5).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), expected)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, s), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(post.kl(), ref.flatten(1).sum(1))
    # logvar clamp to [-30, 20]
    clamped = DiagonalGaussian(torch.cat([mean, torch.full_like(logvar, 50.0)], dim=1))
    assert clamped.logvar.max() == 20.0
    z = DiagonalGaussian(torch.cat([torch.zeros(20000, 1), torch.full((20000, 1), math.log(4.0))], 1)).sample(
        torch.Generator().manual_seed(0))
    assert abs(z.std().item() - 2.0) < 0.05


def _small_mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_ema_decay_zero_equals_model():
    torch.manual_seed(0)
    model = _small_mlp()
    ema = EMA(model, decay=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model)
    for a, b in zip(ema.module.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(5, 3)
    torch.testing.assert_close(ema.module(x), model.eval()(x))


def test_ema_update_formula_and_buffers_copied():
    torch.manual_seed(0)
    model, d = _small_mlp(), 0.9
    old = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=d)
    model.train()(torch.randn(8, 3) * 3 + 1)  # moves BatchNorm running stats (buffers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    ema.update(model)
    for shadow, o, new in zip(ema.module.parameters(), old, model.parameters()):
        torch.testing.assert_close(shadow, d * o + (1 - d) * new)
    bn_ema, bn = ema.module[1], model[1]
    torch.testing.assert_close(bn_ema.running_mean, bn.running_mean, rtol=0, atol=0)  # copied, not averaged
    assert bn_ema.num_batches_tracked == bn.num_batches_tracked == 1
    # copy_to puts the averaged weights into a model; state_dict round trip restores them
    target = _small_mlp()
    ema.copy_to(target)
    torch.testing.assert_close(target[0].weight, ema.module[0].weight)
    other = EMA(_small_mlp(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == d and other.num_updates == 1
    torch.testing.assert_close(other.module[2].bias, ema.module[2].bias)
    assert not any(p.requires_grad for p in ema.module.parameters())


# ------------------------------------------------------------------------------------------------------- DiT
DIT = dict(in_channels=2, image_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2)


def test_dit_block_attention_matches_explicit_softmax_attention():
    block = randomize_zero_params(DiTBlock(8, num_heads=2, mlp_ratio=2.0, dropout=0.0))
    x = torch.randn(3, 5, 8)
    q, k, v = block.qkv(x).split(8, dim=-1)
    heads = []
    for h in range(2):  # head h owns channels 4h..4h+3 of q, k and v
        qh, kh, vh = (a[..., 4 * h:4 * h + 4] for a in (q, k, v))
        heads.append(torch.softmax(qh @ kh.transpose(1, 2) / 2.0, dim=-1) @ vh)
    torch.testing.assert_close(block.attention(x), block.proj(torch.cat(heads, dim=-1)), atol=1e-5, rtol=1e-5)


def test_dit_block_is_adaln_zero():
    """At init every block is the identity and the model outputs exactly zero (Peebles & Xie sec. 3.2); with the
    modulation trained, shift/scale act on the normalised tokens as x * (1 + scale) + shift."""
    model = DiT(**DIT, num_classes=3)
    x, t, c = torch.randn(4, 2, 8, 8), torch.tensor([0, 5, 50, 99]), torch.randn(4, 16)
    tokens = torch.randn(4, 16, 16)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    assert torch.equal(model(x, t, torch.tensor([0, 1, 2, 3])), torch.zeros(4, 2, 8, 8))
    block = DiTBlock(16, num_heads=2, mlp_ratio=2.0, dropout=0.0)
    with torch.no_grad():  # only the attention branch's gate and shift/scale: gate 1, scale 0.5, shift 2
        block.ada[1].bias[2 * 16:3 * 16] = 1.0
        block.ada[1].bias[16:2 * 16] = 0.5
        block.ada[1].bias[:16] = 2.0
    normed = torch.nn.functional.layer_norm(tokens, (16,), eps=1e-6)
    torch.testing.assert_close(block(tokens, c), tokens + block.attention(normed * 1.5 + 2.0))


def test_dit_output_patch_depends_only_on_its_input_patch_without_blocks():
    """depth 0: tokens never mix, so unpatchify must put each token back where patchify took it from."""
    model = randomize_zero_params(DiT(**{**DIT, "depth": 0})).eval()
    x, t = torch.randn(1, 2, 8, 8), torch.tensor([10])
    base = model(x, t)
    x2 = x.clone()
    x2[0, 1, 2, 5] += 1.0  # row 2, column 5: patch (1, 2) of the 4x4 grid of 2x2 patches
    changed = (model(x2, t) - base).abs().sum(1)[0] > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 4:6] = True
    assert torch.equal(changed, expected)


def test_dit_positions_are_2d_sincos_and_distinguish_every_token():
    pos = sincos_positions(4, 16)
    assert pos.shape == (16, 16)
    torch.testing.assert_close(pos[5, :4], torch.tensor([1.0, 0.1, 0.01, 0.001]).sin())  # token 5 = row 1
    torch.testing.assert_close(pos[5, 8:12], torch.tensor([1.0, 0.1, 0.01, 0.001]).sin())  # and column 1
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0


def test_dit_conditioning_shapes_and_checks():
    model = randomize_zero_params(DiT(**DIT, num_classes=3, learn_sigma=True)).eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 80])
    out = model(x, t, torch.tensor([0, 2]))
    assert out.shape == (2, 4, 8, 8)
    torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([3, 3])))  # y=None is the null class
    assert not torch.allclose(model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1])))
    assert not torch.allclose(model(x, t), model(x, torch.tensor([4, 5])))
    check_backward(model, model(x, t, torch.tensor([0, 2])))
    torch.manual_seed(0)
    plain = randomize_zero_params(DiT(**DIT, num_classes=3))
    torch.manual_seed(0)
    guided = DiT(**DIT, num_classes=3, guidance_input=True)
    guided.load_state_dict(plain.state_dict(), strict=False)  # the teacher's weights, guidance layers left
    y = torch.tensor([1, 2])
    torch.testing.assert_close(guided(x, t, y, torch.tensor([1.0, 3.0])), plain(x, t, y))  # zero w embedding
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(**{**DIT, "image_size": 7})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiT(**{**DIT, "num_heads": 3})


ALL_CONFIGS = [
    UNet(image_size=8, num_classes=3, learn_sigma=True, attention_resolutions=(4,), **TINY).config,
    DiT(in_channels=1, image_size=8, patch_size=2, hidden_size=16, depth=2, num_heads=2, num_classes=3,
        learn_sigma=True).config,
    MLPDenoiser(hidden=16, num_layers=2, num_classes=2).config,
    NoisyClassifier(1, 8, 5, **TINY).config,
    FeatureNet(1, 8, 5, width=8, feature_dim=8).config,
    AutoencoderKL(image_size=28, base_channels=8, num_groups=4).config,
]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=[c["kind"] for c in ALL_CONFIGS])
def test_build_model_round_trip(config):
    config = json.loads(json.dumps(config))  # what a config.json gives back
    torch.manual_seed(0)
    a = randomize_zero_params(build_model(config)).eval()
    torch.manual_seed(1)
    b = build_model(config).eval()
    assert b.config == config
    b.load_state_dict(a.state_dict())
    if config["kind"] == "mlp":
        x, args = torch.randn(3, 2), (torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    elif config["kind"] == "feature_net":
        x, args = torch.randn(3, 1, 8, 8), ()
    elif config["kind"] == "autoencoder_kl":
        x, args = torch.randn(3, 1, 28, 28), (False,)
    else:
        x, args = torch.randn(3, 1, 8, 8), (torch.tensor([1, 2, 3]),)
    out_a, out_b = a(x, *args), b(x, *args)
    torch.testing.assert_close(out_a[0] if isinstance(out_a, tuple) else out_a,
                               out_b[0] if isinstance(out_b, tuple) else out_b, rtol=0, atol=0)


def test_build_model_rejects_bad_configs():
    with pytest.raises(ValueError, match="'kind'.*'autoencoder_kl'"):
        build_model({"kind": "transformer"})
    with pytest.raises(ValueError, match="'channels'.*base_channels"):
        build_model({"kind": "unet", "channels": 32})


def test_default_sizes_take_32x32_colour_to_8x8_latents_and_back():
    """params.yaml's networks as the stages build them (their sections, the library's builders), with the
    autoencoder's in_channels set to 3: a 32x32 RGB batch encodes to 8x8 latents (4x downsampling, no padding) and
    decodes to 32x32 RGB; the U-Net (with its attention at 4x4) and the noisy classifier run on those latents."""
    import yaml

    from diffusion_core.builders import (
        build_autoencoder,
        build_denoiser,
        build_diffusion_from_options,
        build_noisy_classifier,
    )
    from pipeline.config import validate_params

    from .stages import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["train_autoencoder"]["autoencoder"]["in_channels"] = 3
    params = validate_params(raw, ["schedule", "diffusion", "train_autoencoder", "train_diffusion", "train_classifier"])
    ae_opts = params.train_autoencoder.autoencoder.to_options()
    torch.manual_seed(0)
    ae = build_autoencoder(ae_opts, 32).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x).mean
        assert z.shape == (2, ae_opts.latent_channels, 8, 8) == (2, *ae.latent_shape)
        assert ae.config["padded_size"] == 32 and ae.decode(z).shape == x.shape
        diffusion = build_diffusion_from_options(params.schedule.to_options(), params.diffusion.to_options())
        unet = build_denoiser(params.train_diffusion.unet.to_options(), tuple(z.shape[1:]), 10, diffusion.learn_sigma)
        # levels 8 and 4; self-attention after each res block of the 4x4 level, as its params comment says
        assert unet.encoder.level_resolutions == [8, 4]
        attn = sum(isinstance(m, AttentionBlock) for m in unet.encoder.down.modules())
        assert attn == params.train_diffusion.unet.num_res_blocks
        t, y = torch.tensor([0, 999]), torch.tensor([3, 7])
        assert unet(z, t, y).shape == (2, ae_opts.latent_channels * (2 if diffusion.learn_sigma else 1), 8, 8)
        clf = build_noisy_classifier(params.train_classifier.classifier.to_options(), tuple(z.shape[1:]), 10)
        assert clf(z, t).shape == (2, 10)
