"""Checkpoints: round trips, checksums, missing folders, unsafe pickles, atomic step folders."""

import copy
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_core.checkpoint import (
    CheckpointError,
    find_last_good_checkpoint,
    load_model_dir,
    load_training_state,
    save_checkpoint_dir,
    save_model_dir,
    save_training_state,
    sha256_file,
    step_dir,
)
from diffusion_core.models import EMA, UNet

TINY = dict(image_size=8, base_channels=16, channel_mult=(1, 2), num_heads=2, num_groups=4, num_classes=3,
            attention_resolutions=(4,))


def trained_pair(seed=0):
    """A UNet with non-trivial weights and an EMA whose weights differ from it."""
    torch.manual_seed(seed)
    model = UNet(**TINY)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema.update(model)
    return model.eval(), ema


def outputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    return model(x, torch.tensor([1, 500]), torch.tensor([0, 3]))


def test_save_load_round_trip(tmp_path):
    model, ema = trained_pair()
    save_model_dir(tmp_path / "ckpt", model, {"diffusion": {"num_timesteps": 1000}}, ema_model=ema)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model"] == model.config and config["diffusion"] == {"num_timesteps": 1000}
    assert set(config["checksums"]) == {"model.safetensors", "ema.safetensors"}
    assert config["checksums"]["model.safetensors"] == sha256_file(tmp_path / "ckpt" / "model.safetensors")

    raw, cfg = load_model_dir(tmp_path / "ckpt", use_ema=False)
    assert cfg == config and not raw.training
    torch.testing.assert_close(outputs(raw), outputs(model), rtol=0, atol=0)
    averaged, _ = load_model_dir(tmp_path / "ckpt")
    torch.testing.assert_close(outputs(averaged), outputs(ema.module), rtol=0, atol=0)
    assert not torch.allclose(outputs(averaged), outputs(model))
    # no EMA saved: use_ema falls back to the raw weights
    save_model_dir(tmp_path / "plain", model, {})
    only, _ = load_model_dir(tmp_path / "plain", use_ema=True)
    torch.testing.assert_close(outputs(only), outputs(model), rtol=0, atol=0)
    assert not list(tmp_path.rglob("*.tmp"))  # no temp files left behind


def test_channels_last_model_saves(tmp_path):
    model, _ = trained_pair()
    save_model_dir(tmp_path / "cl", model.to(memory_format=torch.channels_last), {})
    loaded, _ = load_model_dir(tmp_path / "cl")
    torch.testing.assert_close(outputs(loaded), outputs(model), atol=1e-5, rtol=1e-4)


def test_weights_hash_ignores_memory_format_and_sees_one_changed_value():
    """train_diffusion's worker report hashes the weights: a channels_last model (its 1x1 skip convs keep a
    stride(-1) != 1) hashes as the same weights in the default format, and one changed value changes the hash."""
    from diffusion_core.training import weights_sha256

    model, _ = trained_pair()
    plain = weights_sha256(model)
    assert weights_sha256(copy.deepcopy(model).to(memory_format=torch.channels_last)) == plain
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    assert weights_sha256(changed) != plain


def test_corrupt_byte_is_a_checksum_error(tmp_path):
    model, _ = trained_pair()
    save_model_dir(tmp_path, model, {})
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit in the last tensor's payload: safetensors itself would still load it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum.*model.safetensors"):
        load_model_dir(tmp_path)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model_dir(tmp_path / "empty")
    model, _ = trained_pair()
    save_model_dir(tmp_path / "m", model, {})
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model_dir(tmp_path / "m")
    assert issubclass(CheckpointError, RuntimeError)


def test_weights_that_do_not_fit_the_config(tmp_path):
    model, _ = trained_pair()
    save_model_dir(tmp_path, model, {})
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["base_channels"] = 8  # the weights were made with 16
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'embed.mlp.0.weight' expected shape"):
        load_model_dir(tmp_path)
    # an extra tensor with a correct checksum is still refused
    config["model"]["base_channels"] = 16
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["stray"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors")
    config["checksums"]["model.safetensors"] = sha256_file(tmp_path / "model.safetensors")
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unexpected key 'stray'"):
        load_model_dir(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        save_model_dir(tmp_path / "x", model, {"checksums": {}})


def test_training_state_round_trip(tmp_path):
    state = {"step": 7, "optimizer": torch.optim.Adam(UNet(**TINY).parameters()).state_dict(),
             "rng": torch.get_rng_state(), "loss": [0.5, 0.25]}
    save_training_state(tmp_path / "state.pt", state)
    loaded = load_training_state(tmp_path / "state.pt")
    assert loaded["step"] == 7 and loaded["loss"] == [0.5, 0.25]
    assert torch.equal(loaded["rng"], state["rng"])
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_state(tmp_path / "missing.pt")


class _Exploit:
    """Unpickling this would create a marker file: the load must refuse before running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_pickle_is_refused_and_not_executed(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "state.pt"
    payload = {"step": 1, "evil": _Exploit(str(marker))}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a safe training-state file"):
        load_training_state(path)
    assert not marker.exists()


def test_checkpoint_dir_and_last_good(tmp_path):
    model, ema = trained_pair()
    root = tmp_path / "checkpoints"
    assert find_last_good_checkpoint(root) is None
    for step in (100, 200, 300):
        save_checkpoint_dir(step_dir(root, step), model, ema, {"step": step}, {"note": "x"})
    assert sorted(p.name for p in root.iterdir()) == ["step-00000100", "step-00000200", "step-00000300"]
    newest = root / "step-00000300"
    assert set(json.loads((newest / "config.json").read_text())["checksums"]) == {
        "model.safetensors", "ema.safetensors", "training_state.pt"}
    assert find_last_good_checkpoint(root) == newest
    assert load_training_state(newest / "training_state.pt")["step"] == 300

    with open(newest / "ema.safetensors", "r+b") as f:  # corrupt the newest
        f.seek(-3, os.SEEK_END)
        f.write(b"\x00\x01\x02")
    (root / "step-00000200" / "training_state.pt").write_bytes(b"truncated")  # and the one before
    assert find_last_good_checkpoint(root) == root / "step-00000100"
    # re-saving an existing step replaces it whole
    save_checkpoint_dir(newest, model, ema, {"step": 301}, {})
    assert find_last_good_checkpoint(root) == newest
    assert load_training_state(newest / "training_state.pt")["step"] == 301


def test_failed_checkpoint_leaves_nothing(tmp_path):
    model, ema = trained_pair()
    root = tmp_path / "checkpoints"
    with pytest.raises((pickle.PicklingError, AttributeError)):  # an unpicklable state: no step folder is left
        save_checkpoint_dir(step_dir(root, 5), model, ema, {"bad": lambda: 0}, {})
    assert list(root.iterdir()) == []
    assert find_last_good_checkpoint(root) is None


def test_resaved_model_folder_never_leaves_its_name_and_killed_saves_are_cleared(tmp_path, monkeypatch):
    """Re-saving onto an existing model folder swaps old and new in one step: no rename moves the old folder away
    (a kill between two renames would leave no model). The temp folders a killed save leaves beside it
    (`.<name>.<8 random chars>.tmp` with half the files, `.<name>.<8 random chars>.old/<name>`)
    are removed by the next save."""
    first, _ = trained_pair(0)
    second, _ = trained_pair(1)
    path = tmp_path / "diffusion"
    save_model_dir(path, first, {})
    for leftover in (".diffusion.ab_cd123.tmp", ".diffusion.zz9_0000.old/diffusion"):  # as a SIGKILL leaves them
        (tmp_path / leftover).mkdir(parents=True)
        (tmp_path / leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".other.ab_cd123.tmp").mkdir()  # another output's temp: not this save's to remove

    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((str(a), str(b))), real(a, b)))
    save_model_dir(path, second, {})
    assert not [r for r in renames if r[0] == str(path)], renames  # the old folder never left `path`
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ab_cd123.tmp", "diffusion"]
    loaded, _ = load_model_dir(path, use_ema=False)
    torch.testing.assert_close(outputs(loaded), outputs(second), rtol=0, atol=0)
