"""Layering (docs/architecture.md): diffusion_core is a library that needs no engine and knows nothing of the
pipeline; pipeline/ may import diffusion_core, never the other way."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "diffusion_core"
ENGINES = ("ray", "mlflow", "dvc", "pydantic", "yaml")  # the last two: the `pipeline` extra (params schema)


def test_every_library_module_imports_without_engines_or_pipeline():
    """Import each diffusion_core module in a fresh interpreter; none may pull in an engine, the params
    schema's packages (pydantic, yaml: the `pipeline` extra) or pipeline itself."""
    code = (
        "import sys, pkgutil, importlib, diffusion_core\n"
        "mods = [m.name for m in pkgutil.walk_packages(diffusion_core.__path__, 'diffusion_core.')]\n"
        "[importlib.import_module(m) for m in mods]\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {ENGINES + ('pipeline',)!r})\n"
        "print(len(mods), ','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, _, bad = out.stdout.strip().partition(" ")
    assert int(count) >= 30, f"walked only {count} modules"
    assert bad == "", f"imported by the library: {bad}"


def test_library_source_never_names_pipeline_or_engines():
    """Static check, lazy imports included: no `import pipeline|ray|mlflow|dvc|pydantic|yaml`
    anywhere under diffusion_core/."""
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(CORE.parent)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ENGINES + ("pipeline",)]
    assert offenders == [], offenders
