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


def _module_imports(root: Path) -> dict[str, set[str]]:
    """{module: the project modules it imports}, lazy imports in functions included, `if TYPE_CHECKING:` blocks
    not (they never run); `from . import x` names the submodule x where x is one."""
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for pkg in ("diffusion_core", "pipeline") for p in (root / pkg).rglob("*.py")}
    graph = {}
    for mod, path in paths.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = {id(n) for node in ast.walk(tree)
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
                continue
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            target = ".".join(filter(None, [base, node.module]))
            subs = {f"{target}.{a.name}" for a in node.names} & paths.keys()
            deps |= subs if subs and node.module is None else {target} | subs
        graph[mod] = {d for d in deps if d in paths and d != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, out = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    """No two modules of diffusion_core/ or pipeline/ import each other, directly or round a longer circle."""
    graph = _module_imports(CORE.parent)
    assert len(graph) > 60 and "diffusion_core.formulations" in graph["diffusion_core.diffusion"]
    assert _cycles(graph) == []
    circle = {**graph, "diffusion_core.schedules": graph["diffusion_core.schedules"] | {"diffusion_core.diffusion"}}
    assert _cycles(circle)  # the finder finds one: schedules -> diffusion -> schedules
