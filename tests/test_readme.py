"""Code blocks of docs/library.md (linked from README.md) run as written (loop lengths shortened where noted)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "docs" / "library.md"


def _block(heading: str) -> str:
    """The first ```python block after `heading`."""
    text = README.read_text()
    after = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_swiss_roll_block_trains_and_samples_points(one_thread):
    code = _block("## The Swiss roll")
    assert "for step in range(2000):" in code
    ns: dict = {}
    exec(compile(code.replace("range(2000):", "range(200):"), "docs/library.md", "exec"), ns)  # noqa: S102
    points, data = ns["points"], ns["data"]
    assert points.shape == (2000, 2) and torch.isfinite(points).all()
    assert data.shape == (10_000, 2) and data.abs().max() <= 1.0
    assert 0.2 < points.std(0).min() and points.abs().max() < 3  # spread out, not collapsed or diverged
