"""Progressive distillation: the two-step target identity, grids, loss weight, guided teacher, students that learn the
exact teacher's few-step map on Gaussian data, and the models' guidance-scale input."""

import pytest
import torch

from diffusion_core import GaussianDiffusion, NoiseSchedule
from diffusion_core.distillation import model_x0, sample_student, student_grid, teacher_steps, two_step_target
from diffusion_core.guidance import ClassifierFreeGuidance
from diffusion_core.models import MLPDenoiser, UNet, build_model
from diffusion_core.objectives import DistillationObjective
from diffusion_core.samplers import SamplingSpec, sample
from diffusion_core.schedules import spaced_timesteps
from diffusion_core.training import Trainer, TrainOptions
from tests.gaussian import GaussianDenoiser
from tests.tiny_models import TINY, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

T = 1000
MEAN, STD = torch.tensor([0.5, -0.3]), torch.tensor([0.25, 0.4])
# two classes and the null class (last row): x0 | y ~ N(MEANS[y], STDS[y]^2)
MEANS = torch.tensor([[1.0, 0.5], [-0.5, -1.0], [0.25, -0.25]])
STDS = torch.tensor([[0.3, 0.3], [0.3, 0.3], [0.9, 0.9]])


class ClassGaussianDenoiser(GaussianDenoiser):
    """The exact denoiser of x0 | y ~ N(means[y], stds[y]^2); y = None or the last row is the null class."""

    def __init__(self, schedule, means, stds, parameterization):
        super().__init__(schedule, means[-1], stds[-1], parameterization)
        self.means, self.stds = means.double(), stds.double()

    def forward(self, x_t, t, y=None):
        y = torch.full((x_t.shape[0],), len(self.means) - 1) if y is None else y
        self.m, self.s = self.means[y], self.stds[y]
        return super().forward(x_t, t)


def _ddim(schedule, z, x0, t, t_next):
    """DDIM eta 0 written out from alpha_bar, with alpha_bar_{-1} = 1."""
    ab = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod])
    a, a_next = ab[t + 1][:, None], ab[t_next + 1][:, None]
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * (z - a.sqrt() * x0) / (1 - a).sqrt()


def _target_net(diffusion, teacher_x0, student_steps, offset=0.0):
    """An x0-parameterized 'student' that outputs the two-step target (+ offset); counts its calls."""
    def net(x, t_model, y=None):
        net.calls += 1
        t_mid, t_next = teacher_steps(t_model, diffusion.num_timesteps, student_steps)
        return two_step_target(diffusion, teacher_x0, x, t_model, t_mid, t_next) + offset
    net.calls = 0
    return net


@pytest.mark.parametrize("num_timesteps,student_steps", [(1000, 1), (1000, 4), (1000, 8), (1000, 125), (1000, 3),
                                                         (1000, 500), (64, 8), (711, 13)])
def test_student_grid_is_the_trailing_grid_and_the_teacher_takes_the_midpoints(num_timesteps, student_steps):
    grid = student_grid(num_timesteps, student_steps)
    assert torch.equal(grid, spaced_timesteps(num_timesteps, student_steps, "trailing"))
    if num_timesteps % student_steps == 0:  # the evenly spaced grid k T/N - 1, as before grids were rounded
        stride = num_timesteps // student_steps
        assert torch.equal(grid, torch.arange(1, student_steps + 1) * stride - 1)
    t_mid, t_next = teacher_steps(grid, num_timesteps, student_steps)
    teacher = spaced_timesteps(num_timesteps, 2 * student_steps, "trailing")
    assert torch.equal(torch.sort(torch.cat([grid, t_mid])).values, teacher)
    assert torch.equal(t_next, torch.cat([torch.tensor([-1]), grid[:-1]]))  # the next student step, then the end


@pytest.mark.parametrize("student_steps", [0, T // 2 + 1])
def test_student_grid_refuses_steps_without_teacher_midpoints(student_steps):
    with pytest.raises(ValueError, match=f"student_steps must be in 1..{T // 2}"):
        student_grid(T, student_steps)


def test_teacher_steps_refuse_a_timestep_off_the_grid():
    with pytest.raises(ValueError, match="not on the 4-step student grid"):
        teacher_steps(torch.tensor([249, 250]), 1000, 4)


@pytest.mark.parametrize("parameterization", ["v", "eps"])
@pytest.mark.parametrize("schedule_name", ["cosine", "linear"])
def test_one_step_on_the_target_lands_on_the_teachers_two_steps(schedule_name, parameterization):
    sched = NoiseSchedule.from_name(schedule_name, T)
    d = GaussianDiffusion(sched, parameterization=parameterization)
    teacher = GaussianDenoiser(sched, MEAN, STD, parameterization)

    def teacher_x0(z, t):
        return model_x0(teacher, d, z, t)

    g = torch.Generator().manual_seed(0)
    n = 4
    t = student_grid(T, n)[torch.randint(0, n, (64,), generator=g)]
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t_mid, t_next = teacher_steps(t, T, n)
    assert (t_next == -1).any() and (t_next >= 0).any()  # the final step is mixed with the others in one batch
    x_tilde = two_step_target(d, teacher_x0, z, t, t_mid, t_next)
    z_mid = _ddim(sched, z, teacher_x0(z, t), t, t_mid)
    teacher_two = _ddim(sched, z_mid, teacher_x0(z_mid, t_mid), t_mid, t_next)
    assert (_ddim(sched, z, x_tilde, t, t_next) - teacher_two).abs().max() < 1e-10

    # chained over the grid, the targets reproduce the library's 2N-step DDIM sampler, one call per student step
    net = _target_net(d, teacher_x0, n)
    x_T = torch.randn(256, 2, generator=g, dtype=torch.float64)
    student = sample_student(net, GaussianDiffusion(sched, parameterization="x0"), x_T.shape, n, x_T=x_T)
    ref = sample(d, teacher, x_T.shape, SamplingSpec("ddim", steps=2 * n, spacing="trailing"), x_T=x_T,
                 clip_denoised=False, lambda_min=None)
    assert net.calls == n
    assert (student - ref).abs().max() < 1e-10


def test_loss_is_the_truncated_snr_weighted_x0_error():
    sched = NoiseSchedule.from_name("cosine", T)
    d_teacher = GaussianDiffusion(sched, parameterization="v")
    d_student = GaussianDiffusion(sched, parameterization="x0")
    teacher = GaussianDenoiser(sched, MEAN, STD, "v")
    n, offset = 4, torch.tensor([0.1, -0.2], dtype=torch.float64)
    objective = DistillationObjective(teacher, d_student, n, teacher_diffusion=d_teacher)
    probs = objective.timestep_probs()
    assert torch.equal(torch.nonzero(probs).flatten(), student_grid(T, n)) and float(probs.sum()) == 1.0

    def teacher_x0(z, t):
        return objective.teacher_x0(z, t)

    g = torch.Generator().manual_seed(1)
    x0 = MEAN.double() + STD.double() * torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = student_grid(T, n)[torch.randint(0, n, (64,), generator=g)]
    exact, _ = objective(_target_net(d_student, teacher_x0, n), x0, None, t, torch.Generator().manual_seed(2))
    off, extras = objective(_target_net(d_student, teacher_x0, n, offset), x0, None, t,
                            torch.Generator().manual_seed(2))
    assert exact.abs().max() < 1e-20 and extras == {}
    expected = sched.snr[t].clamp(min=1.0) * offset.pow(2).mean()  # max(SNR, 1): eps-like at t = 249, x0 at t = 999
    assert sched.snr[t].min() < 1 < sched.snr[t].max()
    torch.testing.assert_close(off, expected, rtol=1e-9, atol=0)


def test_guided_teacher_is_classifier_free_guidance():
    sched = NoiseSchedule.from_name("cosine", T)
    d = GaussianDiffusion(sched, parameterization="eps")
    teacher = ClassGaussianDenoiser(sched, MEANS, STDS, "eps")
    objective = DistillationObjective(teacher, d, 2, num_classes=2, scale_range=(0.0, 4.0))
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randint(0, 2, (32,), generator=g)
    t = torch.randint(0, T - 10, (32,), generator=g)  # eps -> x0 amplifies rounding by 1/alpha near t = T-1
    for w in (0.0, 1.0, 3.0):
        ours = objective.teacher_x0(z, t, y, torch.full((32,), w, dtype=torch.float64))
        mixed_eps = ClassifierFreeGuidance(w, null_class=2).wrap(teacher)(z, t, y)
        assert (ours - d.x0_from_eps(z, t, mixed_eps)).abs().max() < 1e-10
    with pytest.raises(ValueError, match="scale_range"):
        DistillationObjective(teacher, d, 2, scale_range=(0.0, 4.0))


def _train(student, objective, steps, sample_x0, seed=0):
    """`steps` Trainer steps on fresh batches of sample_x0(generator) -> (x0, y); returns every drawn t."""
    trainer = Trainer(student, objective, "uniform", TrainOptions(lr=3e-3, seed=seed), "cpu")
    g, drawn = torch.Generator().manual_seed(seed + 100), []
    for _ in range(steps):
        drawn.append(trainer.train_step(*sample_x0(g)).t)
    return torch.cat(drawn)


def _mse(a, b):
    return float((a - b).pow(2).sum(1).mean())


def gaussian_distances(steps=300):
    """Two rounds of progressive distillation of the exact eps teacher of N(MEAN, STD^2) on cosine into v-students
    (4 -> 2 -> 1 steps); mean squared distances of students and teacher to the teacher's 4-step DDIM samples."""
    sched = NoiseSchedule.from_name("cosine", T)
    d_teacher, d_student = GaussianDiffusion(sched, "eps"), GaussianDiffusion(sched, "v")
    teacher = GaussianDenoiser(sched, MEAN, STD, "eps")

    def data(g):
        return MEAN + STD * torch.randn(256, 2, generator=g), None

    torch.manual_seed(0)
    two = MLPDenoiser(dim=2, hidden=64, num_layers=2)
    drawn = _train(two, DistillationObjective(teacher, d_student, 2, teacher_diffusion=d_teacher), steps, data)
    one = MLPDenoiser(dim=2, hidden=64, num_layers=2)
    one.load_state_dict(two.state_dict())  # round two starts from its teacher (Salimans & Ho sec. 4)
    _train(one, DistillationObjective(two, d_student, 1), steps, data, seed=1)
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    kw = dict(x_T=x_T, clip_denoised=False, lambda_min=None)
    ref = sample(d_teacher, teacher, x_T.shape, SamplingSpec("ddim", steps=4), **kw)
    return {"drawn": drawn, "frozen": not two.training and not any(p.requires_grad for p in two.parameters()),
            "student2": _mse(sample_student(two.eval(), d_student, x_T.shape, 2, x_T=x_T), ref),
            "teacher2": _mse(sample(d_teacher, teacher, x_T.shape, SamplingSpec("ddim", steps=2), **kw), ref),
            "student1": _mse(sample_student(one.eval(), d_student, x_T.shape, 1, x_T=x_T), ref),
            "teacher1": _mse(sample(d_teacher, teacher, x_T.shape, SamplingSpec("ddim", steps=1), **kw), ref)}


def test_students_learn_the_exact_teachers_few_step_map_on_gaussian_data():
    """For N(m, s^2) data the exact teacher's deterministic DDIM map is affine in x_T; a small MLP learns it."""
    r = gaussian_distances()
    assert set(r["drawn"].unique().tolist()) == {499, 999}  # the trainer draws t from the student grid only
    assert r["frozen"]  # round two's teacher (round one's student) stayed frozen
    assert r["student2"] * 10 < r["teacher2"], r
    assert r["student1"] * 10 < r["teacher1"], r


def guidance_distances(steps=400, scales=(0.0, 1.0, 3.0)):
    """One-step v-students of the exact guided eps teacher (two classes, null class) trained over w in [0, 4] and at
    w = 1 only; distances to the guided teacher's 2-step DDIM samples at each w, and student calls per sample."""
    sched = NoiseSchedule.from_name("cosine", T)
    d_teacher, d_student = GaussianDiffusion(sched, "eps"), GaussianDiffusion(sched, "v")
    teacher = ClassGaussianDenoiser(sched, MEANS, STDS, "eps")

    def data(g):
        y = torch.randint(0, 2, (256,), generator=g)
        return MEANS[y] + STDS[y] * torch.randn(256, 2, generator=g), y

    students = {}
    for name, scale_range in (("range", (0.0, 4.0)), ("fixed", (1.0, 1.0))):
        torch.manual_seed(0)
        students[name] = MLPDenoiser(dim=2, hidden=64, num_layers=2, num_classes=2, guidance_input=True)
        objective = DistillationObjective(teacher, d_student, 1, num_classes=2, scale_range=scale_range,
                                          label_dropout=0.1, teacher_diffusion=d_teacher)
        _train(students[name], objective, steps, data)
        students[name].eval()
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(2))
    y = torch.arange(1000) % 2
    kw = dict(x_T=x_T, clip_denoised=False, lambda_min=None, y=y)
    out = {}
    for w in scales:
        guidance = ClassifierFreeGuidance(w, null_class=2)
        ref = sample(d_teacher, teacher, x_T.shape, SamplingSpec("ddim", steps=2), guidance=guidance, **kw)
        teacher1 = sample(d_teacher, teacher, x_T.shape, SamplingSpec("ddim", steps=1), guidance=guidance, **kw)
        out[w] = {"teacher1": _mse(teacher1, ref)}
        for name, net in students.items():
            calls = []
            counted = lambda *a, net=net: calls.append(1) or net(*a)  # noqa: E731
            out[w][name] = _mse(sample_student(counted, d_student, x_T.shape, 1, y=y, w=w, x_T=x_T), ref)
            out[w][f"{name}_calls"] = len(calls)
    return out


def test_guidance_input_student_reproduces_the_guided_teacher_at_every_scale():
    r = guidance_distances()
    for w, m in r.items():
        assert m["range_calls"] == 1, m  # one network call per step: no separate unconditional pass
        assert m["range"] * 5 < m["teacher1"], (w, m)
    for w in (0.0, 3.0):  # a student distilled at w = 1 alone does not know the teacher at other scales
        assert r[w]["range"] * 10 < r[w]["fixed"], (w, r[w])


MODELS = [(MLPDenoiser, dict(dim=3, hidden=16, num_layers=2, num_classes=3), (5, 3)),
          (UNet, dict(in_channels=1, image_size=8, num_classes=3, **TINY), (2, 1, 8, 8))]


@pytest.mark.parametrize("cls,kw,shape", MODELS, ids=["mlp", "unet"])
def test_guidance_input_false_is_the_model_as_before(cls, kw, shape):
    torch.manual_seed(0)
    before = randomize(cls(**kw))
    torch.manual_seed(0)
    now = randomize(cls(**kw, guidance_input=False))
    assert now.config == before.config and "guidance_input" not in now.config  # old checkpoints' configs match
    x, t = torch.randn(shape), torch.randint(0, 1000, (shape[0],))
    y = torch.arange(shape[0]) % 4  # index 3 is the null class
    assert torch.equal(now(x, t, y), before(x, t, y))
    with pytest.raises(ValueError, match="without guidance_input"):
        now(x, t, y, torch.ones(shape[0]))
    torch.manual_seed(0)
    guided = cls(**kw, guidance_input=True).state_dict()
    torch.manual_seed(0)
    plain = cls(**kw).state_dict()
    # the w-embedding is built last: every other weight is drawn as before
    assert all(torch.equal(guided[k], v) for k, v in plain.items())
    config = cls(**kw, guidance_input=True).config
    assert config["guidance_input"] is True and build_model(config).config == config


@pytest.mark.parametrize("cls,kw,shape", MODELS, ids=["mlp", "unet"])
def test_student_from_teacher_weights_is_the_teacher_until_trained(cls, kw, shape):
    torch.manual_seed(1)
    teacher = randomize(cls(**kw))
    student = cls(**kw, guidance_input=True)
    result = student.load_state_dict(teacher.state_dict(), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys
    assert all(k.startswith("guidance_embed.") for k in result.missing_keys)
    x = torch.randn(shape)
    t, y = torch.randint(0, 1000, (shape[0],)), torch.arange(shape[0]) % 4
    for w in (torch.zeros(shape[0]), torch.full((shape[0],), 3.0), torch.rand(shape[0]) * 8):
        assert torch.equal(student(x, t, y, w), teacher(x, t, y))
    with pytest.raises(ValueError, match="needs the guidance scale"):
        student(x, t, y)
    randomize(student.guidance_embed, seed=2)  # a trained w-embedding: the output now depends on w
    assert not torch.allclose(student(x, t, y, torch.zeros(shape[0])), student(x, t, y, torch.full((shape[0],), 3.0)))


# ------------------------------------------------------------------ all rounds in one module, sampling a family


def _rounds_run(steps_per_round, stop_after=None, resume=None, rounds=(2, 1)):
    """ProgressiveDistillation of a random class-conditional MLP teacher (v) over `rounds` through one Trainer, the
    way the distill stage drives it; stops after `stop_after` steps (a checkpoint state), or resumes from one."""
    from diffusion_core.distillation import ProgressiveDistillation
    from diffusion_core.objectives import progressive_objective
    from diffusion_core.resample import make_timestep_sampler

    sched = NoiseSchedule.from_name("cosine", 8)
    d = GaussianDiffusion(sched, "v")
    torch.manual_seed(0)
    teacher = randomize(MLPDenoiser(dim=2, hidden=16, num_layers=2, num_classes=2), seed=3)
    torch.manual_seed(1)
    state = ProgressiveDistillation(teacher, rounds, 8, guidance_input=True)
    objective = lambda k: progressive_objective(state, k, d, 2, (1.0, 3.0), 0.1)  # noqa: E731
    trainer = Trainer(state, objective(0), "uniform", TrainOptions(lr=1e-2, seed=0), "cpu")
    if resume is not None:
        state.load_state_dict(resume["weights"])
        trainer.load_state_dict(resume["trainer"])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    y = torch.arange(64) % 2
    for k in range(len(rounds)):
        end = (k + 1) * steps_per_round
        if trainer.step >= end:
            continue
        state.close_rounds(k)
        trainer.objective = objective(k)
        trainer.sampler = make_timestep_sampler("uniform", 8, trainer.objective.timestep_probs())
        while trainer.step < end:
            trainer.train_step(x, y)
            if trainer.step == stop_after:
                return {"weights": {k: v.clone() for k, v in state.state_dict().items()},
                        "trainer": trainer.state_dict()}, state
    state.close_rounds(len(rounds))
    return None, state


def test_progressive_rounds_fill_the_family_once_and_resume_bitwise():
    """Round k's student joins the family at the round's end (never twice: the round index is in the state dict),
    the original teacher and the family stay frozen, and a run stopped at any step (a round's last step
    included) and resumed from that state ends bitwise where the uninterrupted run ends."""
    _, full = _rounds_run(4)
    assert int(full.round) == 2
    original = full.original.state_dict()
    assert not full.original.training and not full.family.training
    assert all(not p.requires_grad for p in [*full.original.parameters(), *full.family.parameters()])
    # the 1-step member is the final student; the 2-step member differs from it (it stopped training at step 4)
    one, two = full.family.member(1).state_dict(), full.family.member(2).state_dict()
    assert all(torch.equal(one[k], v) for k, v in full.student.state_dict().items())
    assert any(not torch.equal(one[k], two[k]) for k in one)
    for stop in (3, 4, 5):
        saved, _ = _rounds_run(4, stop_after=stop)
        _, resumed = _rounds_run(4, resume=saved)
        assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items()), stop
    assert all(torch.equal(v, full.original.state_dict()[k]) for k, v in original.items())


def test_train_mode_leaves_the_teachers_in_eval():
    from diffusion_core.distillation import ProgressiveDistillation

    teacher = UNet(in_channels=1, image_size=8, num_classes=3, **{**TINY, "dropout": 0.5})
    state = ProgressiveDistillation(teacher, (2, 1), 8, guidance_input=True).train()
    assert state.student.training and not state.original.training and not state.family.training
    with pytest.raises(ValueError, match="halve"):
        ProgressiveDistillation(teacher, (4, 1), 8, guidance_input=True)


def test_the_registrys_ddim_on_the_trailing_grid_is_the_students_sampler():
    """generate() samples a student family member with the registry's DDIM (trailing grid from T - 1, eta 0, w as
    the member's input): the same trajectory as distillation.sample_student, one call per step."""
    from diffusion_core.generation import _GuidedStudent

    sched = NoiseSchedule.from_name("cosine", T)
    d = GaussianDiffusion(sched, "v")
    net = randomize(MLPDenoiser(dim=2, hidden=32, num_layers=2, num_classes=2, guidance_input=True), seed=4).eval()
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 2
    for steps in (1, 2, 4):
        calls = []
        guided = _GuidedStudent(net, 2.0)
        counted = lambda *a: calls.append(1) or guided(*a)  # noqa: E731
        got = sample(d, counted, x_T.shape, SamplingSpec("ddim", steps=steps, spacing="trailing"), x_T=x_T, y=y,
                     clip_denoised=False, lambda_min=None)
        want = sample_student(net, d, x_T.shape, steps, y=y, w=2.0, x_T=x_T)
        assert len(calls) == steps
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32, the same steps written twice
    other = sample(d, _GuidedStudent(net, 2.0), x_T.shape, SamplingSpec("ddim", steps=4, spacing="leading"),
                   x_T=x_T, y=y, clip_denoised=False, lambda_min=None)
    assert (other - want).abs().max() > 1e-2  # another grid is another trajectory: the comparison can fail


def _student_folder(path, guidance_input=True):
    """A student family folder as the distill stage writes it (random members of 2 and 1 steps, T = 40)."""
    from diffusion_core.checkpoint import save_model_dir
    from diffusion_core.models import StudentFamily
    from tests.tiny_models import DIFFUSION

    net = UNet(in_channels=1, image_size=8, num_classes=3, guidance_input=guidance_input, **TINY).config
    family = StudentFamily(net, [2, 1])
    for seed, member in enumerate(family.members.values()):
        randomize(member, seed=seed + 7)
    data = {"space": "pixel", "shape": [1, 8, 8], "num_classes": 3, "class_names": ["a", "b", "c"],
            "dataset": "tiny", "kind": "image", "label_dropout": 0.1}
    student = {"method": "progressive", "steps": [2, 1], "sampler": "ddim", "spacing": "trailing",
               "guidance_input": guidance_input, "scale_range": [1.0, 3.0] if guidance_input else None}
    save_model_dir(path, family, {"diffusion": {**DIFFUSION, "num_timesteps": 40, "parameterization": "v"},
                                  "data": data, "latent": None, "student": student})
    return path, family


def test_a_student_folder_samples_through_generate_with_one_call_per_step(tmp_path):
    from diffusion_core.generation import SamplingError, generate
    from diffusion_core.model_folders import load_diffusion_dir

    path, family = _student_folder(tmp_path / "student")
    bundle = load_diffusion_dir(path)
    kw = dict(num=6, classes=[0, 1, 2], seed=3)
    out = {}
    for steps in (1, 2):
        for scale in (1.0, 3.0):
            r = generate(bundle, spec=SamplingSpec("ddim", steps, "trailing", guidance="cfg", scale=scale), **kw)
            assert r["nfe"] == steps  # guidance is the member's input: no unconditional pass
            out[steps, scale] = r["images"]
    assert not (out[1, 1.0] == out[2, 1.0]).all()  # each step count samples with its own member
    # the library's student sampler from the same seeds gives the same one-step samples, up to uint8 rounding
    x_T = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(3 + i)) for i in range(6)])
    d = GaussianDiffusion(NoiseSchedule.from_name("cosine", 40), "v")
    for w in (1.0, 3.0):
        want = sample_student(family.member(1), d, x_T.shape, 1, y=torch.tensor([0, 1, 2] * 2), w=w, x_T=x_T)
        got = torch.as_tensor(out[1, w]).permute(0, 3, 1, 2).float() / 127.5 - 1
        assert (got - want.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6, w
    assert (torch.as_tensor(out[1, 1.0]) != torch.as_tensor(out[1, 3.0])).any()  # w reaches the member
    for bad, match in ((dict(steps=3), "distilled for 2, 1 steps"), (dict(steps=2, sampler="dpmpp3m"), "grid"),
                       (dict(steps=2, spacing="logsnr"), "grid"), (dict(steps=None), "distilled for"),
                       (dict(steps=2, guidance="classifier"), "classifier"),
                       (dict(steps=2, options={"eta": 0.5}), "eta 0")):
        with pytest.raises(SamplingError, match=match):
            generate(bundle, spec=SamplingSpec(**{"sampler": "ddim", "guidance": "cfg", "scale": 2.0, **bad}), **kw)
    plain = load_diffusion_dir(_student_folder(tmp_path / "plain", guidance_input=False)[0])
    assert generate(plain, spec=SamplingSpec("ddim", 1, guidance="cfg", scale=1.0), **kw)["nfe"] == 1
    with pytest.raises(SamplingError, match="without the guidance scale"):
        generate(plain, spec=SamplingSpec("ddim", 1, guidance="cfg", scale=2.0), **kw)


def test_consistency_distillation_learns_the_exact_teachers_ode_map_on_gaussian_data():
    """ConsistencyObjective on the exact eps teacher of N(MEAN, STD^2): a small v-student's one call from x_T lands
    where the teacher's 8-step DDIM (the grid it was distilled on) lands, far closer than the teacher's own one step,
    and its 2-step consistency samples keep the spread of that map's samples."""
    from diffusion_core.objectives import ConsistencyObjective

    sched = NoiseSchedule.from_name("cosine", T)
    d_teacher, d_student = GaussianDiffusion(sched, "eps"), GaussianDiffusion(sched, "v")
    teacher = GaussianDenoiser(sched, MEAN, STD, "eps")
    objective = ConsistencyObjective(teacher, d_student, 8, teacher_diffusion=d_teacher)
    assert objective.grid().tolist() == [124, 249, 374, 499, 624, 749, 874, 999]
    torch.manual_seed(0)
    student = MLPDenoiser(dim=2, hidden=64, num_layers=2)
    drawn = _train(student, objective, 600, lambda g: (MEAN + STD * torch.randn(256, 2, generator=g), None))
    assert set(drawn.unique().tolist()) == set(objective.grid().tolist())
    student.eval()
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2))
    kw = dict(x_T=x_T, clip_denoised=False, lambda_min=None)  # every spec: trailing spacing
    ref = sample(d_teacher, teacher, x_T.shape, SamplingSpec("ddim", steps=8), **kw)
    one = sample(d_student, student, x_T.shape, SamplingSpec("consistency", steps=1), **kw)
    teacher1 = sample(d_teacher, teacher, x_T.shape, SamplingSpec("ddim", steps=1), **kw)
    assert _mse(one, ref) * 10 < _mse(teacher1, ref), (_mse(one, ref), _mse(teacher1, ref))
    two = sample(d_student, student, x_T.shape, SamplingSpec("consistency", steps=2),
                 generator=torch.Generator().manual_seed(5), **kw)
    # the teacher's 8-step DDIM ends at E[x0 | z_124], narrower than the data: that is the map distilled
    assert torch.allclose(two.std(0), ref.std(0), rtol=0.1) and torch.allclose(two.mean(0), MEAN, atol=0.05)


def test_consistency_target_is_the_teachers_ddim_step_then_the_student(tmp_path):
    """The objective's loss is max(SNR, 1) times the squared distance of the student's x0 at (z_t, t) to its own
    no-grad x0 at the teacher's one DDIM step back, or to that step itself at the grid's end (t_prev = -1)."""
    from diffusion_core.objectives import ConsistencyObjective

    sched = NoiseSchedule.from_name("cosine", 8)
    d = GaussianDiffusion(sched, "x0")
    teacher = GaussianDenoiser(sched, MEAN, STD, "x0")
    net = lambda x, t, y=None: torch.tanh(x) * (1 + t.view(-1, 1) / 10)  # noqa: E731 - an x0 'student'
    objective = ConsistencyObjective(teacher, d, 4)
    x0 = MEAN + STD * torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1, 3, 5, 7, 1, 7])
    loss, _ = objective(net, x0, None, t, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    z = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    prev = t - 2
    z_prev = _ddim(sched, z.double(), teacher.posterior_x0(z, t)[0], t, prev).float()
    target = torch.where((prev < 0)[:, None], z_prev, net(z_prev, prev.clamp(min=0)))
    want = d.snr(t).clamp(min=1.0).float() * ((net(z, t) - target) ** 2).mean(1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
