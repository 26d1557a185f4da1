"""bf16 "auto": on only where the hardware computes bf16; emulated bf16 made the default training 17x slower."""

import pytest

from diffusion_core import precision


@pytest.mark.parametrize("flags,expected", [
    ({"avx2", "fma"}, False),                     # an AVX2-only x86 (the AMD EPYC where bf16 ran 17x slower)
    ({"avx512f", "avx512bw"}, False),             # AVX-512 without its BF16 extension (Skylake-SP)
    ({"avx512f", "avx512_bf16"}, True),           # Cooper Lake, Zen 4
    ({"amx_tile", "amx_bf16"}, True),             # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, True),              # aarch64 with FEAT_BF16
])
def test_auto_follows_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")
    assert precision.resolve_bf16("auto", "cpu") is expected
    assert precision.resolve_bf16(True, "cpu") is True and precision.resolve_bf16(False, "cpu") is False


def test_cpu_flags_agree_with_torch():
    """Independent of our /proc/cpuinfo parsing: torch's own dispatch level names a feature our flags must hold."""
    import platform

    import torch

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 Linux only")
    needs = {"AVX512": "avx512f", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability())
    if needs is None:
        pytest.skip("torch reports no AVX level")
    assert needs in precision.cpu_flags()


def test_bad_setting_is_refused():
    with pytest.raises(ValueError, match="true, false or auto"):
        precision.resolve_bf16("yes")
