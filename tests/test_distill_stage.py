"""Stage `distill` on configs/tiny.yaml's data, in-process (one worker; the Ray path is the shared skeleton's, run by
the tiny `dvc repro` of test_pipeline_e2e.py): the student family folder and its card, sampling it by path, bitwise
resume after a stop at a round's end or inside a round, a NaN that keeps the last good checkpoint, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_core.checkpoint import find_last_good_checkpoint
from diffusion_core.generation import SamplingSpec, generate
from diffusion_core.model_folders import load_diffusion_dir
from diffusion_core.training import Trainer
from pipeline import distill, train_diffusion

from .stages import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
CKPTS = Path("checkpoints") / "distill"
IN_PROCESS = {"num_workers": 1, "use_ray": False}


@pytest.fixture(scope="module")
def teacher(prepared, tmp_path_factory) -> Path:
    """A folder with tiny.yaml's data and a 6-step tiny teacher in models/diffusion (in-process, tracking off)."""
    cwd = tmp_path_factory.mktemp("teacher")
    shutil.copytree(prepared / "data", cwd / "data")
    raw = yaml.safe_load(TINY.read_text())
    raw["tracking"]["enabled"] = False
    raw["train_diffusion"].update(steps=6, sample_every=0, scaling={**raw["train_diffusion"]["scaling"], **IN_PROCESS})
    raw["distill"]["scaling"].update(IN_PROCESS)
    (cwd / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert train_diffusion.main(["--params", "tiny.yaml"]) == 0
    return cwd


def _workdir(teacher: Path, dest: Path, **cfg) -> Path:
    shutil.copytree(teacher, dest, ignore=shutil.ignore_patterns("checkpoints", "mlruns", "mlflow.db"))
    raw = yaml.safe_load((dest / "tiny.yaml").read_text())
    raw["distill"].update(cfg)
    (dest / "tiny.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


def _distill(cwd: Path, monkeypatch) -> int:
    monkeypatch.chdir(cwd)
    return distill.main(["--params", "tiny.yaml"])


def _student_bytes(cwd: Path) -> bytes:
    return (cwd / "models" / "student" / "model.safetensors").read_bytes()


def test_student_folder_card_and_sampling_by_path(teacher, tmp_path, monkeypatch):
    cwd = _workdir(teacher, tmp_path / "w")
    assert _distill(cwd, monkeypatch) == 0
    config = json.loads((cwd / "models/student/config.json").read_text())
    assert config["model"]["kind"] == "student_family" and config["model"]["steps"] == [2, 1]
    assert config["student"]["sampler"] == "ddim" and config["student"]["teacher_steps"] == 4
    assert config["diffusion"] == json.loads((cwd / "models/diffusion/config.json").read_text())["diffusion"]
    card = (cwd / "models/student/README.md").read_text()
    for words in ("models/diffusion", "progressive distillation", "2, 1 DDIM steps", "guidance scale w in [1, 3]"):
        assert words in card, words
    prov = json.loads((cwd / "models/student/provenance.json").read_text())
    assert "models/diffusion" in json.dumps(prov)  # the teacher's config hash and run are the student's inputs
    metrics = json.loads((cwd / "metrics/distill.json").read_text())
    assert metrics["steps"] == 8 and metrics["steps_per_round"] == 4 and metrics["rounds"] == [2, 1]
    bundle = load_diffusion_dir(cwd / "models/student")
    teacher_model = load_diffusion_dir(cwd / "models/diffusion").model
    for steps in (1, 2):
        r = generate(bundle, 4, SamplingSpec("ddim", steps, guidance="cfg", scale=2.0), classes=[0, 1])
        assert r["nfe"] == steps and r["images"].shape == (4, 8, 8, 1)
        member = bundle.model.member(steps)
        moved = [k for k, v in teacher_model.state_dict().items() if not torch.equal(v, member.state_dict()[k])]
        assert moved  # the member was trained away from the teacher's weights it started from


def test_stopped_inside_a_round_or_at_its_end_resumes_bitwise(teacher, tmp_path, monkeypatch):
    """A stop after step 3 (inside round 1, checkpoint at 2) or step 5 (round 2, the round-1 end checkpoint at 4)
    then a rerun ends with the same student bytes as a run never stopped."""
    full = _workdir(teacher, tmp_path / "full")
    assert _distill(full, monkeypatch) == 0
    real = Trainer.train_step
    for stop in (3, 5):
        cwd = _workdir(teacher, tmp_path / f"stop{stop}")

        def dying(self, *a, stop=stop, **k):
            if self.step == stop:
                raise KeyboardInterrupt
            return real(self, *a, **k)

        monkeypatch.setattr(Trainer, "train_step", dying)
        assert _distill(cwd, monkeypatch) != 0
        assert not (cwd / "models/student").exists()
        assert find_last_good_checkpoint(cwd / CKPTS).name == f"step-0000000{stop - 1}"
        monkeypatch.setattr(Trainer, "train_step", real)
        assert _distill(cwd, monkeypatch) == 0
        assert _student_bytes(cwd) == _student_bytes(full), stop


def test_nan_loss_keeps_the_last_good_checkpoint_and_writes_no_student(teacher, tmp_path, monkeypatch, capsys):
    cwd = _workdir(teacher, tmp_path / "w")
    from diffusion_core import objectives

    real = objectives.DistillationObjective.__call__
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        loss, extra = real(self, *a, **k)
        return (loss * float("nan") if calls["n"] == 6 else loss), extra

    monkeypatch.setattr(objectives.DistillationObjective, "__call__", poisoned)
    assert _distill(cwd, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: loss is nan at step 6:") and "lower distill.lr" in err[-1]
    assert find_last_good_checkpoint(cwd / CKPTS).name == "step-00000004"
    assert not (cwd / "models/student").exists()


@pytest.mark.parametrize("change,words", [
    ({"rounds": [4, 1]}, "distill: rounds must halve"),
    ({"steps": 9}, "distill: steps 9 must split evenly over the 2 rounds"),
    ({"space": "latent"}, "distill.space is 'latent' but models/diffusion was trained in 'pixel'"),
    ({"rounds": [64, 32]}, "student_steps must be in 1..50 (the teacher takes 2 * student_steps of the schedule's 100"),
])
def test_bad_params_are_one_line_errors_before_training(teacher, tmp_path, monkeypatch, capsys, change, words):
    cwd = _workdir(teacher, tmp_path / "w", **change)
    assert _distill(cwd, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err
    assert not (cwd / "models/student").exists()


def test_a_missing_teacher_says_which_stage_to_run(teacher, tmp_path, monkeypatch, capsys):
    cwd = _workdir(teacher, tmp_path / "w")
    shutil.rmtree(cwd / "models/diffusion")
    assert _distill(cwd, monkeypatch) == 2
    assert "run train_diffusion first" in capsys.readouterr().err


def test_evaluate_samples_the_student_when_the_sweep_selected_it(teacher, tmp_path, monkeypatch):
    """A sweep selection with model: student makes evaluate sample models/student (one call per step)."""
    from types import SimpleNamespace

    from pipeline import evaluate

    cwd = _workdir(teacher, tmp_path / "w")
    assert _distill(cwd, monkeypatch) == 0
    selected = {"setting": "student-ddim-1-eta0-cfg2-n10", "model": "student", "sampler": "ddim", "steps": 1,
                "eta": 0.0, "spacing": "trailing", "options": {}, "guidance": "cfg", "scale": 2.0, "num_samples": 10,
                "seed_sets": 1, "fd_domain": 1.0, "trials": ["t"], "rule": "r", "seeds": [0, 10]}
    (cwd / "metrics/sweep.json").write_text(json.dumps({"selected": selected}))
    cfg = SimpleNamespace(setting="sweep", seed=100, num_samples=4, batch_size=4, bf16=False, channels_last=False)
    setting = evaluate.resolve_setting(cfg, cwd / "metrics/sweep.json")
    assert setting["model"] == "student"
    out = evaluate._sample(cfg, setting, 1, torch.device("cpu"))
    assert out["nfe"] == 1 and out["images"].shape == (4, 8, 8, 1)
    assert evaluate._summary_line(setting, {"fd_domain": 1.0, "num_samples": 4, "nfe": 1}, []).startswith(
        "evaluate: the distilled student's ddim-1")


def test_consistency_method_writes_one_student_for_every_step_count_and_resumes_bitwise(teacher, tmp_path,
                                                                                     monkeypatch):
    """method: consistency trains one network (no family) that samples with its own sampler at each of `rounds`
    steps, one call a step; a run stopped after a checkpoint and rerun ends with the same bytes."""
    from diffusion_core.generation import default_sampler

    cfg = {"method": "consistency", "rounds": [1, 2, 4], "consistency_grid": 4, "steps": 6}
    full = _workdir(teacher, tmp_path / "full", **cfg)
    assert _distill(full, monkeypatch) == 0
    config = json.loads((full / "models/student/config.json").read_text())
    assert config["model"]["kind"] == "unet" and config["model"]["guidance_input"] is True
    assert config["student"]["sampler"] == "consistency" and config["student"]["grid_steps"] == 4
    assert "consistency distillation" in (full / "models/student/README.md").read_text()
    bundle = load_diffusion_dir(full / "models/student")
    assert default_sampler(bundle) == "consistency"
    for steps in (1, 2, 4):
        r = generate(bundle, 4, SamplingSpec("consistency", steps, guidance="cfg", scale=2.0), classes=[0, 1])
        assert r["nfe"] == steps
    with pytest.raises(Exception, match="distilled for 1, 2, 4 steps"):
        generate(bundle, 4, SamplingSpec("consistency", 3, guidance="cfg", scale=2.0))
    cwd = _workdir(teacher, tmp_path / "stopped", **cfg)
    real = Trainer.train_step

    def dying(self, *a, **k):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "train_step", dying)
    assert _distill(cwd, monkeypatch) != 0
    monkeypatch.setattr(Trainer, "train_step", real)
    assert _distill(cwd, monkeypatch) == 0
    assert _student_bytes(cwd) == _student_bytes(full)
