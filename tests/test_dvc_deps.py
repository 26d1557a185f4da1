"""dvc.yaml: every stage depends on each pipeline/ module it imports, directly or through another (a change to the
params schema or the tracking code must rerun the stages that use it, as a change to diffusion_core/ does)."""

import ast

import pytest
import yaml

from .stages import ROOT

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _module(name: str) -> str | None:
    """The dependency path of top-level pipeline module `name`: pipeline/name.py, or the package pipeline/name."""
    if (ROOT / "pipeline" / f"{name}.py").exists():
        return f"pipeline/{name}.py"
    return f"pipeline/{name}" if (ROOT / "pipeline" / name / "__init__.py").exists() else None


def _pipeline_imports(dep: str) -> set[str]:
    """Dependency paths of the pipeline modules that `dep` (a file, or a package: all its files) imports (absolute
    `pipeline.x`, relative `.x` from a top-level module, `from pipeline import x`)."""
    path = ROOT / dep
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    names = set()
    for f in files:
        top = f.parent == ROOT / "pipeline"  # relative imports inside a package stay inside it
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if (node.level == 1 and top) or base == "pipeline" or base.startswith("pipeline."):
                    names |= ({base.removeprefix("pipeline.").split(".")[0]} if base not in ("", "pipeline")
                              else {a.name for a in node.names})
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
    return {m for m in map(_module, names) if m is not None} - {dep}


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += sorted(_pipeline_imports(f))
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_the_pipeline_code_it_runs(name):
    stage = STAGES[name]
    module = stage["cmd"].split("-m ", 1)[1].split()[0].replace(".", "/") + ".py"
    needed = _closure(module)
    assert len(needed) >= 3, needed  # the stage module, _stage.py, config at least
    missing = sorted(needed - set(stage["deps"]))
    assert not missing, f"dvc.yaml stage {name} runs {missing} but does not list them in deps"
