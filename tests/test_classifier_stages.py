"""Noisy classifier (classifier guidance) and feature net (domain FID): training math, and the classifier stage's
refusals and its non-finite-loss stop. Both stages' tiny runs (train_classifier on 2 Ray workers) are checked on
the outputs of the e2e pipeline's `dvc repro` (tests/test_pipeline_e2e.py), which runs them with configs/tiny.yaml."""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_core.classifiers import evaluate_noisy_classifier, quarter_key, random_shift, timestep_quarters
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.objectives import NoisyClassifierObjective
from diffusion_core.resample import LossAwareSampler, UniformSampler
from diffusion_core.schedules import NoiseSchedule
from diffusion_core.training import Trainer, TrainOptions

from . import zygote
from .stages import TINY, stage_env


class Recorder(torch.nn.Module):
    """A classifier that records what it is shown and answers with a linear map of its input."""

    def __init__(self, in_features: int, num_classes: int = 3):
        super().__init__()
        self.lin = torch.nn.Linear(in_features, num_classes)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t, t):
        self.seen.append((x_t.detach().clone(), t.clone()))
        return self.lin(x_t.flatten(1))


class FixedT(UniformSampler):
    """Timestep sampler that always draws `t` (weight 1)."""

    def __init__(self, num_timesteps: int, t: int):
        super().__init__(num_timesteps)
        self.t = t

    def sample(self, batch_size, generator=None, device="cpu"):
        return torch.full((batch_size,), self.t, dtype=torch.long, device=device), torch.ones(batch_size, device=device)


def _diffusion(T: int = 1000) -> GaussianDiffusion:
    return GaussianDiffusion(NoiseSchedule.from_name("cosine", T))


def test_classifier_step_is_cross_entropy_on_q_sample():
    d = _diffusion()
    x0, y = torch.rand(16, 1, 4, 4) * 2 - 1, torch.randint(0, 3, (16,))
    clf = Recorder(16)
    g = torch.Generator().manual_seed(7)
    t, _ = UniformSampler(1000).sample(16, generator=g)  # the trainer draws t first, the objective then eps
    losses, extras = NoisyClassifierObjective(d)(clf, x0, y, t, g)
    g = torch.Generator().manual_seed(7)  # replay the same draws
    t, _ = UniformSampler(1000).sample(16, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t, t_model = clf.seen[0]
    torch.testing.assert_close(x_t, d.q_sample(x0, t, eps))
    assert torch.equal(t_model, d.model_timesteps(t))
    logits = clf.lin(x_t.flatten(1))
    torch.testing.assert_close(losses, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    assert torch.equal(extras["train_accuracy"], logits.argmax(1) == y)


@pytest.mark.parametrize("t, lo, hi", [(0, 0.0, 0.05), (999, 0.99, 1.01)])
def test_classifier_input_noise_grows_with_t(t, lo, hi):
    """At t=0 the classifier sees x0 up to sqrt(1 - alpha_bar_0) noise; at T-1 it sees (almost) pure noise."""
    d = _diffusion()
    x0 = torch.rand(256, 1, 8, 8) * 2 - 1
    clf = Recorder(64)
    NoisyClassifierObjective(d)(clf, x0, torch.zeros(256, dtype=torch.long), torch.full((256,), t),
                                torch.Generator().manual_seed(0))
    x_t = clf.seen[0][0]
    noise_std = (x_t - d.schedule.alphas_cumprod[t].sqrt().float() * x0).std().item()
    assert lo <= noise_std <= hi
    assert noise_std == pytest.approx((1 - d.schedule.alphas_cumprod[t]).sqrt().item(), rel=0.1)


def test_importance_weights_and_loss_aware_history():
    d = _diffusion(20)
    x0, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))

    class Weighted(UniformSampler):
        def sample(self, batch_size, generator=None, device="cpu"):
            t, _ = super().sample(batch_size, generator, device)
            return t, torch.full((batch_size,), 2.0)

    import copy

    clf = Recorder(16)
    trainer = Trainer(clf, NoisyClassifierObjective(d), "uniform", TrainOptions(lr=1e-2))
    trainer.sampler = Weighted(20)
    before = copy.deepcopy(clf.lin)
    stats = trainer.train_step(x0, y)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(before(clf.seen[0][0].flatten(1)), y, reduction="none")
    torch.testing.assert_close(stats.losses, 2.0 * ce)  # the step's loss is mean(w * CE)
    assert stats.loss == pytest.approx(float(2.0 * ce.mean()))
    trainer = Trainer(Recorder(16), NoisyClassifierObjective(d), "loss_aware", TrainOptions(lr=1e-2))
    assert isinstance(trainer.sampler, LossAwareSampler)
    trainer.train_step(x0, y)
    assert int(trainer.sampler.counts.sum()) == 8 and trainer.step == 1


def test_quarters_and_evaluation_bookkeeping():
    assert timestep_quarters(1000) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert [quarter_key(*q) for q in timestep_quarters(100)] == ["acc_t0_25", "acc_t25_50", "acc_t50_75", "acc_t75_100"]
    assert timestep_quarters(10)[-1][1] == 10

    class Oracle(torch.nn.Module):
        """Right when t < T/2 (reads the label from pixel 0), else always class 0."""

        num_classes = 4

        def forward(self, x_t, t):
            right = torch.nn.functional.one_hot(self.labels[: len(x_t)], 4).float()
            wrong = torch.nn.functional.one_hot(torch.zeros(len(x_t), dtype=torch.long), 4).float()
            return torch.where((t < 500)[:, None], right, wrong)

    y = torch.arange(400) % 4
    oracle = Oracle()
    oracle.labels = y
    acc = evaluate_noisy_classifier(oracle, _diffusion(), torch.zeros(400, 1, 2, 2), y, batch_size=400)
    assert acc["acc_t0_250"] == acc["acc_t250_500"] == 1.0
    assert acc["acc_t500_750"] == acc["acc_t750_1000"] == 0.25 == acc["chance"]
    assert acc["accuracy"] == pytest.approx(0.625)


def test_random_shift_translates():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    out = random_shift(x, 1, torch.Generator().manual_seed(0), fill=0.0)
    assert out.shape == x.shape and out.sum() == 1.0 and out[0, 0, 1:4, 1:4].sum() == 1.0
    assert random_shift(x, 0) is x


# ----------------------------------------------------------------------------------------------- stages end to end


def _env() -> dict:
    # 8x8 images: a second thread only adds synchronisation, and on a busy machine it costs 10x
    return stage_env(OMP_NUM_THREADS="1")


def _stage(cwd: Path, module: str, params: Path) -> subprocess.CompletedProcess:
    return zygote.run([sys.executable, "-m", f"pipeline.{module}", "--params", str(params)], cwd=cwd, env=_env(),
                      timeout=600)


def _runs(cwd: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(cwd / "mlflow.db") as db:
        return db.execute("SELECT name, status FROM runs").fetchall()


def test_train_classifier_refuses_a_space_other_than_the_diffusion_models(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["train_classifier"]["space"] = "latent"  # train_diffusion.space is pixel in tiny.yaml
    raw["tracking"]["enabled"] = False
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    res = _stage(tmp_path, "train_classifier", tmp_path / "p.yaml")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "train_classifier.space" in res.stderr and "train_diffusion.space" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_train_classifier_non_finite_loss_stops_at_that_step_and_keeps_the_model(bad, prepared, tmp_path,
                                                                                  monkeypatch, capsys):
    """In-process, one worker: a good run writes models/classifier; a rerun (another seed) whose 5th step's loss is
    made non-finite stops there with one line naming the step, leaves the good model folder byte-identical, writes
    no metrics, and its MLflow run is FAILED."""
    import shutil

    import diffusion_core.objectives as objectives
    from pipeline import train_classifier

    cwd = tmp_path / "w"
    shutil.copytree(prepared / "data", cwd / "data")
    raw = yaml.safe_load(TINY.read_text())
    raw["train_classifier"].update(steps=10)
    raw["train_classifier"]["scaling"].update(num_workers=1, use_ray=False)
    (cwd / "a.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["train_classifier"]["seed"] = 1
    (cwd / "b.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(cwd)
    assert train_classifier.main(["--params", "a.yaml"]) == 0
    model_dir = cwd / "models" / "classifier"
    good = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    (cwd / "metrics" / "train_classifier.json").unlink()
    capsys.readouterr()

    real, calls = objectives.NoisyClassifierObjective.__call__, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        losses, extras = real(*a, **k)
        if calls["n"] == 5:
            losses = losses * float(bad)  # the losses of step 5 only
        return losses, extras

    monkeypatch.setattr(objectives.NoisyClassifierObjective, "__call__", poisoned)
    assert train_classifier.main(["--params", "b.yaml"]) == 2
    assert calls["n"] == 5  # no step after the bad one
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1] and "Traceback" not in err
    assert errors[0].startswith(f"error: classifier loss is {bad} at step 5"), errors[0]
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == good
    assert not (cwd / "metrics" / "train_classifier.json").exists()
    assert sorted(_runs(cwd)) == [("train_classifier", "FAILED"), ("train_classifier", "FINISHED")]
