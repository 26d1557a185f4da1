"""`make test`'s file order comes from recorded seconds (tests/durations.py), not a hand-kept list."""

import json
from types import SimpleNamespace

from tests import conftest, durations

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_fast" name="a" time="1.5"/><testcase classname="tests.test_fast" name="b" time="2.0"/>
<testcase classname="tests.test_slow.TestGroup" name="c" time="40.25"/>
<testcase classname="conftest" name="x" time="9"/>
</testsuite></testsuites>"""


def test_junit_seconds_are_summed_per_file_and_recorded_longest_first(tmp_path, monkeypatch):
    (tmp_path / "junit.xml").write_text(JUNIT)
    assert durations.file_seconds(tmp_path / "junit.xml") == {"test_fast.py": 3.5, "test_slow.py": 40.25}
    monkeypatch.setattr(durations, "DURATIONS", tmp_path / "durations.json")
    assert durations.main([str(tmp_path / "junit.xml")]) == 0
    assert list(json.loads((tmp_path / "durations.json").read_text())) == ["test_slow.py", "test_fast.py"]
    assert durations.main([str(tmp_path / "missing.xml")]) == 2


def test_collection_puts_the_longest_recorded_files_first_and_keeps_each_files_order(tmp_path, monkeypatch):
    monkeypatch.setattr(durations, "DURATIONS", tmp_path / "durations.json")
    (tmp_path / "durations.json").write_text(json.dumps({"test_b.py": 50.0, "test_c.py": 10.0}))
    items = [SimpleNamespace(path=tmp_path / f, name=n) for f, n in
             [("test_a.py", "a1"), ("test_c.py", "c1"), ("test_b.py", "b1"), ("test_a.py", "a2"), ("test_b.py", "b2")]]
    conftest.pytest_collection_modifyitems(items)
    assert [i.name for i in items] == ["b1", "b2", "c1", "a1", "a2"]


def test_cpu_seconds_properties_are_summed_per_file_where_recorded(tmp_path):
    junit = JUNIT.replace('name="a" time="1.5"/>', 'name="a" time="1.5"><properties>'
                          '<property name="cpu_seconds" value="3.25"/></properties></testcase>')
    junit = junit.replace('name="c" time="40.25"/>', 'name="c" time="40.25"><properties>'
                          '<property name="cpu_seconds" value="70"/></properties></testcase>')
    (tmp_path / "junit.xml").write_text(junit)
    assert durations.file_seconds(tmp_path / "junit.xml", "cpu_seconds") == {"test_fast.py": 3.25, "test_slow.py": 70.0}
    assert durations.file_seconds(tmp_path / "junit.xml") == {"test_fast.py": 3.5, "test_slow.py": 40.25}
