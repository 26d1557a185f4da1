"""bench.claims_study's bookkeeping on made-up figures: paired differences over seeds, the table, params overrides,
and that configs/claims.yaml is a valid pixel config with a model per row."""

import math

import pytest
import yaml

from bench import claims_study as cs
from pipeline.config import load_params

from .stages import ROOT


def _res(bpd: float, fd: float) -> dict:
    T = 1000
    return {"bpd": bpd, "bpd_se": 0.1, "vb_per_t": [0.5] + [0.0] * (T - 2) + [bpd - 0.5],
            "samples": {str(k): {"fd_domain": fd * k / 50, "fid_inception": 10 * fd} for k in (50, 100, T)}}


def _merged() -> dict:
    rows = {"fixed_small (L_simple)": {"0": _res(5.0, 1.0), "1": _res(6.0, 1.2)},
            "learned (L_hybrid)": {"0": _res(3.0, 0.9), "1": _res(3.5, 1.0)}}
    return {"num_timesteps": 1000, "training_seeds": [0, 1], "rows": rows}


def test_paired_difference_is_the_mean_and_standard_error_of_per_seed_differences():
    mean, se, n = cs.paired(_merged(), "learned (L_hybrid)", "fixed_small (L_simple)", lambda r: r["bpd"])
    # per seed: 3 - 5 = -2, 3.5 - 6 = -2.5
    assert n == 2 and mean == pytest.approx(-2.25) and se == pytest.approx(0.25)
    mean, se, n = cs.paired(_merged(), "learned (L_hybrid)", "missing row", lambda r: r["bpd"])
    assert n == 0 and math.isnan(mean)
    fd = cs._figure(_merged()["rows"]["learned (L_hybrid)"]["1"], "fd_domain@T", 1000)
    assert fd == pytest.approx(20.0)


def test_table_and_claims_carry_every_row_and_comparison():
    table = cs.table(_merged())
    assert "| learned (L_hybrid) | 3.250 ± 0.354 | 0.500 ± 0.000 | 2.750 ± 0.354 |" in table
    claims = cs.claims(_merged())
    assert "| bound: learned variances (L_hybrid) vs fixed small | -2.250 ± 0.250 | 2 |" in claims
    assert len(claims.splitlines()) == 2 + len(cs.CLAIMS)


def test_model_params_set_dotted_keys_and_refuse_unknown_ones():
    base = yaml.safe_load((ROOT / "configs" / "claims.yaml").read_text())
    out = cs.model_params(base, cs.MODELS["vlb_cosine"], seed=2)
    assert out["diffusion"]["loss"] == "vlb" and out["train_diffusion"]["seed"] == 2
    assert base["diffusion"]["loss"] == "simple"  # a copy
    with pytest.raises(SystemExit, match="diffusion.varience"):
        cs.model_params(base, {"diffusion.varience": "x"}, seed=0)


def test_the_study_config_is_a_pixel_image_config_and_every_row_names_a_model(tmp_path):
    for model, overrides in cs.MODELS.items():
        raw = cs.model_params(yaml.safe_load((ROOT / "configs" / "claims.yaml").read_text()), overrides, seed=0)
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
        params = load_params(tmp_path / "p.yaml")  # valid, every combination the library accepts
        assert params.train_diffusion.space == "pixel" and params.schedule.num_timesteps == 1000, model
    assert {m for m, _ in cs.ROWS.values()} == set(cs.MODELS)
