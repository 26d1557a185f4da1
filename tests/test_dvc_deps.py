"""dvc.yaml: every stage depends on each pipeline/ module it imports, directly or through another (a change to the
params schema or the tracking code must rerun the stages that use it, as a change to diffusion_core/ does)."""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _pipeline_imports(path: Path) -> set[str]:
    """pipeline/*.py files that `path` imports (absolute `pipeline.x`, relative `.x`, `from pipeline import x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base == "pipeline" or base.startswith("pipeline."):
                mods = [base.removeprefix("pipeline.")] if base not in ("", "pipeline") else \
                    [a.name for a in node.names]
                found |= {f"pipeline/{m}.py" for m in mods if (ROOT / "pipeline" / f"{m}.py").exists()}
        elif isinstance(node, ast.Import):
            found |= {f"pipeline/{a.name.split('.')[1]}.py" for a in node.names
                      if a.name.startswith("pipeline.") and (ROOT / "pipeline" / f"{a.name.split('.')[1]}.py").exists()}
    return found


def _closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += sorted(_pipeline_imports(ROOT / f))
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_the_pipeline_code_it_runs(name):
    stage = STAGES[name]
    module = stage["cmd"].split("-m ", 1)[1].split()[0].replace(".", "/") + ".py"
    needed = _closure(module)
    assert len(needed) >= 3, needed  # the stage module, _stage.py, config.py at least
    missing = sorted(needed - set(stage["deps"]))
    assert not missing, f"dvc.yaml stage {name} runs {missing} but does not list them in deps"
