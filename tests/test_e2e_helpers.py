"""tests/e2e.py's shared repro: run once per session whichever test asks first, and a failure reported to every
test that asks, not run again (dvc and the checkout stubbed: the real repro is test_pipeline_e2e's)."""

from pathlib import Path

import pytest

from tests import e2e


def _stub(monkeypatch, fail: bool) -> list[Path]:
    calls = []

    def checkout(work: Path, params: Path) -> Path:
        (work / "params.yaml").write_text(params.read_text())
        return work

    def dvc(work: Path, *args: str, **kw) -> str:
        calls.append(work)
        if fail:
            raise AssertionError("dvc repro failed:\nstage 'prepare' exploded")
        return "Running stage 'prepare'"

    monkeypatch.setattr(e2e, "scratch_checkout", checkout)
    monkeypatch.setattr(e2e, "dvc", dvc)
    return calls


def test_the_repro_runs_once_and_every_caller_gets_its_checkout(tmp_path, tmp_path_factory, monkeypatch):
    params = tmp_path / "ok_params.yaml"
    params.write_text("a: 1\n")
    calls = _stub(monkeypatch, fail=False)
    first = e2e.shared_repro(tmp_path_factory, params)
    second = e2e.shared_repro(tmp_path_factory, params)
    assert first == second and len(calls) == 1
    work, log = first
    assert (work / "params.yaml").read_text() == "a: 1\n" and log == "Running stage 'prepare'"


def test_a_failed_repro_fails_each_later_caller_with_its_output_and_is_not_rerun(tmp_path, tmp_path_factory,
                                                                                   monkeypatch):
    params = tmp_path / "bad_params.yaml"
    params.write_text("a: 2\n")
    calls = _stub(monkeypatch, fail=True)
    with pytest.raises(AssertionError, match="exploded"):
        e2e.shared_repro(tmp_path_factory, params)
    with pytest.raises(pytest.fail.Exception, match="(?s)bad_params.yaml failed.*exploded"):
        e2e.shared_repro(tmp_path_factory, params)
    assert len(calls) == 1
