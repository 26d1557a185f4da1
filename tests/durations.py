"""Record each test file's wall seconds from a pytest JUnit XML report into tests/durations.json, the order in
which `make test` hands files to its xdist workers (tests/conftest.py: longest first).

    python -m pytest ... --junitxml=.pytest_cache/junit.xml   # `make test` writes it
    python -m tests.durations .pytest_cache/junit.xml          # `make test-durations`
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

DURATIONS = Path(__file__).resolve().parent / "durations.json"


def file_seconds(junit: Path, key: str = "time") -> dict[str, float]:
    """{test file name: summed seconds of its test cases (setup and teardown of module fixtures included)}: wall
    seconds, or with key "cpu_seconds" the CPU seconds TEST_CPU_CGROUP=1 recorded (tests/conftest.py; files without
    them left out)."""
    totals: dict[str, float] = defaultdict(float)
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")
        name = next((f"{part}.py" for part in module if part.startswith("test_")), None)
        if key == "time":
            value = case.get("time")
        else:
            value = next((p.get("value") for p in case.iter("property") if p.get("name") == key), None)
        if name is not None and value is not None:
            totals[name] += float(value or 0)
    return dict(totals)


def load() -> dict[str, float]:
    """The recorded seconds per file ({} when none are recorded)."""
    return json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_file():
        print("usage: python -m tests.durations JUNIT_XML (a report of the whole suite)", file=sys.stderr)
        return 2
    seconds = {k: round(v, 1) for k, v in sorted(file_seconds(Path(args[0])).items(), key=lambda kv: -kv[1])}
    DURATIONS.write_text(json.dumps(seconds, indent=1) + "\n")
    print(f"{DURATIONS}: {len(seconds)} files, {sum(seconds.values()):.0f} s in all")
    cpu = file_seconds(Path(args[0]), "cpu_seconds")
    if cpu:  # a TEST_CPU_CGROUP=1 run: where the CPU went, not recorded
        print(f"CPU seconds (TEST_CPU_CGROUP): {sum(cpu.values()):.0f} in all")
        for name, value in sorted(cpu.items(), key=lambda kv: -kv[1]):
            print(f"{value:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
