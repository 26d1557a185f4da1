"""Static safety checks: servers the docs start bind to 127.0.0.1; nothing loads pickles unsafely."""

from __future__ import annotations

import re

from .stages import ROOT

DOCS = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")), ROOT / "dvc.yaml"]
SOURCES = sorted(p for d in ("diffusion_core", "pipeline", "bench") for p in (ROOT / d).rglob("*.py"))


def _command_lines(pattern: str) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        if doc.is_file():
            out += [(doc.name, line) for line in doc.read_text().splitlines() if re.search(pattern, line)]
    return out


def test_mlflow_servers_in_the_docs_bind_to_localhost():
    lines = _command_lines(r"^\s*(?:\$\s*)?(?:[A-Z_]+=\S+\s+)*(?:python -m )?mlflow (ui|server)\b")
    assert lines, "no `mlflow ui`/`mlflow server` command found in the docs"
    for doc, line in lines:
        assert re.search(r"--host[ =]127\.0\.0\.1\b", line), f"{doc}: {line.strip()}"


def test_ray_heads_in_the_docs_bind_dashboard_and_node_to_localhost():
    lines = _command_lines(r"^\s*(?:\$\s*)?(?:[A-Z_]+=\S+\s+)*ray start\b.*--head")  # command lines, not prose
    assert lines, "no `ray start --head` command found in the docs"
    for doc, line in lines:
        assert (re.search(r"--dashboard-host[ =]127\.0\.0\.1\b", line) or "--include-dashboard=false" in line), \
            f"{doc}: {line.strip()}"
        assert re.search(r"--node-ip-address[ =]127\.0\.0\.1\b", line), f"{doc}: {line.strip()}"
    # Ray's GCS and raylet listen on every interface anyway: the docs must never switch its token check off
    disabling = _command_lines(r"RAY_AUTH_MODE=disabled")
    assert not disabling, disabling


def test_local_ray_starts_without_a_dashboard():
    src = (ROOT / "pipeline" / "_ray.py").read_text()
    local_inits = [m.group(0) for m in re.finditer(r"ray\.init\((?:[^()]|\([^()]*\))*\)", src)
                   if "num_cpus" in m.group(0)]
    assert local_inits and all("include_dashboard=False" in call for call in local_inits), local_inits


def test_no_unsafe_deserialisation_in_the_product():
    """Weights load from safetensors; torch.load only with weights_only=True; no pickle/yaml.load/eval of files."""
    bad = []
    for path in SOURCES:
        text = path.read_text()
        rel = path.relative_to(ROOT)
        for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                bad.append(f"{rel}: {m.group(0)}")
        for pat in (r"\bpickle\.loads?\(", r"\bcloudpickle\.loads?\(", r"\bdill\.loads?\(", r"\bjoblib\.load\(",
                    r"\bnp\.load\([^)]*allow_pickle=True", r"\byaml\.load\((?![^)]*Loader=_Loader)",
                    r"\byaml\.unsafe_load\(", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("):
            bad += [f"{rel}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert not bad, bad
