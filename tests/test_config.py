"""params loader: typed sections, one-line errors naming the key path, property test over random input."""

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import (
    SECTIONS,
    ConfigError,
    load_params,
    params_hash,
    section_keys,
    validate_params,
)

from .stages import ROOT, params_raw


def _err(raw) -> str:
    """The one-line error of params.yaml with `raw` merged in."""
    with pytest.raises(ConfigError) as e:
        validate_params(params_raw(raw) if isinstance(raw, dict) else raw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield prefix + k


@pytest.mark.parametrize("name", ["params.yaml", "configs/tiny.yaml", "configs/tiny_rgb.yaml", "configs/colour.yaml"])
def test_repo_params_load_and_are_complete(name):
    path = ROOT / name
    params = load_params(path)
    assert set(params.sections) == set(SECTIONS)
    raw = yaml.safe_load(path.read_text())
    for section in SECTIONS:
        # every key is written out, so the file documents every value that changes results
        assert sorted(_flat(raw.get(section) or {})) == sorted(section_keys(section)), f"{name}: section {section}"


# What makes tiny.yaml's run a colour run: the dataset and the one channel count params name (the U-Net's, the
# classifier's and the feature net's come from the data). And what keeps its two repros (pixel, latent) cheap in CI,
# each measured: 16x16 images (cmnist5k has 16 times digits' pixels), a test split of tiny's size (it has 2.8 times
# the images), the autoencoder's batch at tiny's pixels per step, no Ray where tiny's run already tests it (Ray
# Train's start-up was about 45 of a tiny training stage's 60 CPU seconds, evaluate's Ray tasks 10 of 34, a second
# trial actor 18 of the sweep's 77), and fid_inception in evaluate only (the sweep's, the same function, cost 60 CPU
# seconds a repro; tiny's run tests it)
TINY_RGB_CHANGES = {
    "prepare.dataset": ("digits", "cmnist5k"),
    "train_autoencoder.autoencoder.in_channels": (1, 3),
    "prepare.image_size": (None, 16),
    "prepare.test_fraction": (0.2, 0.05),
    "train_autoencoder.batch_size": (64, 16),
    **{f"{stage}.scaling.{key}": value for stage in ("train_classifier", "distill")
       for key, value in (("num_workers", (2, 1)), ("use_ray", (True, False)))},
    "sweep.max_concurrent": (2, 1),
    "sweep.inception_samples": (8, 0),
    "evaluate.num_workers": (2, 1),
}


def _changed(base: str, other: str) -> dict:
    """{dotted key: (value in base, value in other)} for each key whose value differs; both files hold the same keys."""
    def flat(path: str) -> dict:
        raw = yaml.safe_load((ROOT / path).read_text())
        return {k: _get(raw, k) for k in _flat(raw)}

    a, b = flat(base), flat(other)
    assert set(a) == set(b), f"keys in one file only: {sorted(set(a) ^ set(b))}"
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def test_tiny_rgb_is_tiny_in_colour():
    """configs/tiny_rgb.yaml is configs/tiny.yaml but for TINY_RGB_CHANGES: a key added to or changed in one file
    and not the other fails here, so the colour e2e run keeps testing what the grey one does."""
    assert _changed("configs/tiny.yaml", "configs/tiny_rgb.yaml") == TINY_RGB_CHANGES


def test_colour_is_the_default_run_in_colour():
    """configs/colour.yaml (README's colour run) is params.yaml with the colour dataset and 3 channels, an L2
    reconstruction loss (under L1 the 3-channel autoencoder keeps the background and drops the strokes: their
    per-pixel median is the background) and a class-accuracy floor under the colour feature net's own accuracy
    (docs/results.md), nothing else: its figures compare with the grey default run's."""
    assert _changed("params.yaml", "configs/colour.yaml") == {
        "prepare.dataset": ("mnist5k", "cmnist5k"), "train_autoencoder.autoencoder.in_channels": (1, 3),
        "train_autoencoder.recon_loss": ("l1", "l2"), "sweep.select.min_class_accuracy": (0.97, 0.85)}


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def test_unknown_key_suggests_and_lists_accepted():
    msg = _err({"prepare": {"datset": "digits"}})
    assert "unknown key 'prepare.datset'" in msg and "did you mean 'dataset'" in msg and "test_fraction" in msg


def test_no_data_param_that_changes_nothing():
    """data.shuffle_buffer was a DVC param dependency no stage read (training draws seeded batches by index from
    its rank's shards in memory): it is refused now, naming the keys that do something."""
    with pytest.raises(ConfigError, match=r"unknown key 'data.shuffle_buffer'.*accepted: on_bad_shard, verify_checks"):
        validate_params(params_raw({"data": {"shuffle_buffer": 1000}}), ["data"])


def test_unknown_nested_key_and_section():
    msg = _err({"train_autoencoder": {"autoencoder": {"latent_chanels": 2}}})
    assert "train_autoencoder.autoencoder.latent_chanels" in msg and "latent_channels" in msg
    assert "did you mean 'prepare'" in _err({"prepar": {}})


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"prepare": {"test_fraction": 1.5}}, "prepare.test_fraction must be a number in (0, 1), got 1.5"),
        ({"prepare": {"test_fraction": 0}}, "prepare.test_fraction must be a number in (0, 1)"),
        ({"prepare": {"samples_per_shard": "100"}}, "prepare.samples_per_shard must be an integer > 0, got '100'"),
        ({"prepare": {"samples_per_shard": True}}, "prepare.samples_per_shard must be an integer > 0, got true"),
        ({"prepare": {"dataset": "mnsit"}}, "prepare.dataset must be one of mnist5k"),
        ({"schedule": {"name": "cosin"}}, "did you mean 'cosine'"),
        ({"schedule": {"num_timesteps": 1}}, "schedule.num_timesteps must be an integer >= 2"),
        ({"diffusion": {"min_snr_gamma": 0}}, "diffusion.min_snr_gamma must be a number > 0 or null"),
        ({"data": {"on_bad_shard": "ignore"}}, "data.on_bad_shard must be one of error, skip"),
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled must be true or false"),
        ({"train_autoencoder": {"autoencoder": {"downsample": 2}}}, "downsample must be one of 4, 8"),
        ({"train_autoencoder": {"lr": float("nan")}}, "train_autoencoder.lr must be a number > 0"),
        ({"train_autoencoder": {"autoencoder": {"channel_mult": [1, 0]}}}, "channel_mult.1 must be an integer > 0"),
        ({"project": {"device": "gpu"}}, "project.device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'"),
        ({"sweep": {"gpus_per_trial": -1}}, "sweep.gpus_per_trial must be a number >= 0"),
        ({"prepare": [1, 2]}, "section 'prepare' must be a mapping"),
        ([1, 2], "top level must be a mapping"),
    ],
)
def test_wrong_type_and_out_of_range(raw, needle):
    assert needle in _err(raw)


def test_learned_range_needs_vlb_loss():
    assert "learned_range" in _err({"diffusion": {"variance": "learned_range", "loss": "simple"}})
    p = validate_params(params_raw({"diffusion": {"variance": "learned_range", "loss": "hybrid"}}))
    assert p.diffusion.loss == "hybrid"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare:\n  dataset: [digits\n")
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_params(bad)


def test_sections_subset_frozen_and_floats(tmp_path):
    f = tmp_path / "p.yaml"
    text = (ROOT / "params.yaml").read_text().replace("dataset: mnist5k", "dataset: digits", 1)
    head, _, tail = text.partition("train_autoencoder:")
    tail = tail.replace("lr: 1.0e-3", "lr: 1e-4", 1).replace("kl_weight: 1.0e-6", "kl_weight: 5", 1)
    f.write_text(head + "train_autoencoder:" + tail)
    p = load_params(f, sections=["prepare"])
    assert p.prepare.dataset == "digits" and p.sections == ("prepare",)
    with pytest.raises(ConfigError, match="not loaded"):
        _ = p.train_autoencoder
    with pytest.raises(ValueError, match="frozen"):
        p.prepare.dataset = "mnist"
    full = load_params(f)
    assert full.train_autoencoder.lr == 1e-4 and full.train_autoencoder.kl_weight == 5.0  # YAML 1e-4 is a float


def test_params_hash_stable():
    a = {"prepare": {"seed": 1, "dataset": "digits"}}
    b = {"prepare": {"dataset": "digits", "seed": 1}}
    assert params_hash(a) == params_hash(b) != params_hash({"prepare": {"seed": 2, "dataset": "digits"}})
    prepare = validate_params(params_raw(), ["prepare"]).prepare
    assert params_hash(prepare) == params_hash(prepare.model_dump(mode="json"))


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["digits", "mnist5k", "cosine", "eps", "l1", "skip", "learned_range", "vlb"]),
)
keys = st.one_of(st.text(max_size=8),
                 st.sampled_from(sorted({k.split(".")[-1] for s in SECTIONS for k in section_keys(s)} | set(SECTIONS))))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(keys, kids, max_size=4),
                      max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(values, st.dictionaries(st.sampled_from(sorted(SECTIONS)), st.dictionaries(keys, values, max_size=5),
                                         max_size=4)))
def test_random_input_gives_params_or_one_line_config_error(raw):
    """Random input, alone or merged into params.yaml: valid params or a one-line ConfigError, never a traceback."""
    for candidate in (raw, params_raw(raw) if isinstance(raw, dict) else raw):
        _params_or_one_line_error(candidate)


def _params_or_one_line_error(raw):
    try:
        p = validate_params(raw)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        return
    # whatever passed must really be valid: re-validating its dump gives the same params
    assert validate_params(p.to_dict()).to_dict() == p.to_dict()
    assert 0 < p.prepare.test_fraction < 1 and p.schedule.num_timesteps >= 2


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the answer of a machine without CUDA")
def test_stage_device_auto_is_the_cpu_here_and_cuda_is_a_one_line_error_naming_the_setting():
    """project.device: auto picks the CPU where torch sees no GPU; cuda (or cuda:N) there is a ConfigError that
    names the setting and the fix, raised before a stage loads anything."""
    from pipeline._stage import stage_device

    project = validate_params(params_raw({"project": {"device": "auto"}})).project
    assert str(stage_device(project)) == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as e:
            stage_device(validate_params(params_raw({"project": {"device": device}})).project)
        assert str(e.value) == f"project.device {device!r}: no CUDA GPU is available on this machine; use cpu " \
                               "(or project.device: auto)"


def test_every_section_with_library_options_hands_over_all_its_fields():
    """A params section that names typed library options (`OPTIONS`) has no field those options lack (it would be
    validated and then silently dropped), and `.to_options()` carries every value over."""
    import dataclasses

    from diffusion_core import options

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = validate_params(raw)
    found = []

    def walk(section):
        for name in type(section).model_fields:
            value = getattr(section, name)
            if hasattr(value, "model_fields"):
                walk(value)
        if type(section).OPTIONS is not None:
            fields = {f.name for f in dataclasses.fields(getattr(options, type(section).OPTIONS))}
            assert set(type(section).model_fields) <= fields, (type(section).__name__, fields)
            opts = section.to_options()
            for name in type(section).model_fields:
                value = getattr(section, name)
                assert getattr(opts, name) == (tuple(value) if isinstance(value, list) else value)
            found.append(type(section).OPTIONS)

    for name in SECTIONS:
        walk(getattr(params, name))
    assert sorted(set(found)) == ["AutoencoderOptions", "DiTOptions", "DiffusionOptions", "NetOptions",
                                  "PrepareOptions", "ScheduleOptions"]


def test_sections_carry_no_defaults_and_a_missing_key_is_a_one_line_error():
    """Every value is written once, in params.yaml: no section field has a default (the sweep's grid blocks, list
    items whose optional keys params.yaml leaves out, aside), and a key left out is refused by name, with the fix."""
    from pydantic import BaseModel

    from pipeline.config import SweepGridConfig

    def defaults(model, prefix):
        for name, f in model.model_fields.items():
            if not f.is_required():
                yield prefix + name
            inner = f.annotation
            if isinstance(inner, type) and issubclass(inner, BaseModel) and inner is not SweepGridConfig:
                yield from defaults(inner, f"{prefix}{name}.")

    assert [k for s, model in SECTIONS.items() for k in defaults(model, f"{s}.")] == []
    raw = params_raw()
    del raw["train_diffusion"]["unet"]["dropout"]
    with pytest.raises(ConfigError) as e:
        validate_params(raw)
    assert str(e.value) == ("params.yaml: missing key 'train_diffusion.unet.dropout' (every key is set in the params "
                            "file: copy it from the repository's params.yaml)")
    del raw["evaluate"]
    with pytest.raises(ConfigError, match="section 'evaluate' is missing"):
        validate_params(raw, ["evaluate"])
