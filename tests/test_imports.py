import subprocess
import sys


def test_library_imports_without_engines():
    """`import diffusion_core` (and its submodules) must not pull in ray, mlflow or dvc."""
    code = (
        "import sys, diffusion_core, diffusion_core.samplers, diffusion_core.models, diffusion_core.checkpoint, "
        "diffusion_core.data, diffusion_core.config, diffusion_core.tracking, diffusion_core.pretrained\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'dvc'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"engines imported: {out.stdout}"
