"""Typed, validated params: one frozen pydantic model per `params.yaml` section, one loader.

Adding a section (e.g. `train_diffusion`)::

    @register_section("train_diffusion")
    class TrainDiffusionConfig(Section):
        steps: PosInt = 1000
        sampler: SamplerConfig = SamplerConfig()   # nested sections are plain `Section` models

then list its keys in `params.yaml` and `configs/tiny.yaml` (tests check both files are complete) and,
for type checkers, add `train_diffusion: TrainDiffusionConfig` to the annotations in `Params`.
Errors are `ConfigError`, one line naming the key path and what is accepted.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Iterable, Literal, Mapping, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from diffusion_core.samplers import SAMPLERS, SPACINGS


class ConfigError(ValueError):
    """Invalid params file: the message is one line naming the key path and the accepted values."""

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class Section(BaseModel):
    """Base of every params section: frozen, strict types, unknown keys rejected. A section the library's builders
    read names its typed options class (`OPTIONS`, in diffusion_core.options) and hands it over with
    `.to_options()`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    OPTIONS: ClassVar[str | None] = None

    def to_options(self):
        """This section as the library's typed options (diffusion_core.options.<OPTIONS>)."""
        from diffusion_core import options

        if self.OPTIONS is None:
            raise TypeError(f"{type(self).__name__} has no library options")
        return options.options_from(getattr(options, self.OPTIONS), self)


def _list_to_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


# Reusable field types; `strict=True` means YAML `"5"` is not an int and `true` is not a number.
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
PosIntTuple = Annotated[tuple[PosInt, ...], BeforeValidator(_list_to_tuple), Field(min_length=1)]
Scale = Annotated[float, Field(ge=0)]  # a guidance scale

SECTIONS: dict[str, type[Section]] = {}


def register_section(name: str):
    """Class decorator: make `Section` subclass the model of params section `name`."""

    def deco(cls: type[Section]) -> type[Section]:
        if name in SECTIONS and SECTIONS[name] is not cls:
            raise RuntimeError(f"params section {name!r} registered twice")
        SECTIONS[name] = cls
        return cls

    return deco


# ----------------------------------------------------------------------------------------------- sections

Bf16Setting = Union[bool, Literal["auto"]]  # auto: on where the device computes bf16 natively (precision.py)
DatasetName = Literal["mnist5k", "cmnist5k", "digits", "swissroll", "mnist", "fashion_mnist", "cifar10", "imagefolder"]


@register_section("project")
class ProjectConfig(Section):
    name: str = Field("diffusion", min_length=1)
    experiment: str = Field("diffusion", min_length=1)  # MLflow experiment every stage logs into
    seed: NonNegInt = 0
    # shared storage (s3://bucket/prefix, any fsspec URL, or a path) every trained model folder is published under
    # as <root>/models/<name>; null: the DVC workspace only. Env DIFFUSION_STORAGE_ROOT overrides it.
    storage_root: str | None = None
    # torch device of the stages that run a network outside Ray Train (train_autoencoder, encode_latents,
    # train_feature_net, reference_stats, evaluate; sweep trials use sweep.gpus_per_trial): auto (cuda when torch
    # sees a GPU, else cpu), cpu, cuda, cuda:N or mps. The Ray Train stages use their scaling.use_gpu.
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                                 description="one of auto, cpu, cuda, cuda:N, mps")] = "auto"


@register_section("tracking")
class TrackingConfig(Section):
    enabled: bool = True
    tracking_uri: str | None = None  # None: sqlite:///<cwd>/mlflow.db; env MLFLOW_TRACKING_URI overrides
    fallback_local: bool = False  # unreachable server: fall back to the local SQLite store instead of failing


@register_section("prepare")
class PrepareConfig(Section):
    OPTIONS = "PrepareOptions"
    dataset: DatasetName = "mnist5k"
    data_dir: str = "data/raw"  # torchvision files / imagefolder root, relative to the working directory
    test_fraction: Fraction = 0.2
    samples_per_shard: PosInt = 1000
    seed: NonNegInt = 0
    image_size: PosInt | None = None  # resize images to image_size x image_size (None: keep)


@register_section("data")
class DataConfig(Section):
    # No shuffle buffer: the training stages read their rank's shards into memory once and draw each step's batch
    # by seeded index (bitwise-exact resume); ShardDataset(shuffle_buffer=...) streams sets that do not fit.
    on_bad_shard: Literal["error", "skip"] = "error"
    verify_checksums: bool = False


@register_section("schedule")
class ScheduleConfig(Section):
    OPTIONS = "ScheduleOptions"
    name: Literal["linear", "cosine", "sigmoid"] = "cosine"
    num_timesteps: Annotated[int, Field(ge=2)] = 1000
    logsnr_shift: float = 0.0  # added to the schedule's log-SNR at every t (> 0: less noise); README measures it


@register_section("diffusion")
class DiffusionConfig(Section):
    OPTIONS = "DiffusionOptions"
    parameterization: Literal["eps", "x0", "v", "mu", "edm"] = "eps"
    variance: Literal["fixed_small", "fixed_large", "learned_range"] = "fixed_small"
    loss: Literal["simple", "hybrid", "vlb", "weighted"] = "simple"
    min_snr_gamma: PosFloat | None = None
    timestep_sampler: Literal["uniform", "loss_aware"] = "uniform"
    sigma_data: PosFloat | None = None  # edm only: the data's std; null: measured on the training data
    edm_p_mean: float = -1.2  # edm only: training noise levels ln(sigma/alpha) ~ N(p_mean, p_std^2) (Karras et al.)
    edm_p_std: PosFloat = 1.2

    @model_validator(mode="after")
    def _combination_works(self) -> "DiffusionConfig":
        from diffusion_core.diffusion import check_combination

        check_combination(self.parameterization, self.variance, self.loss, self.min_snr_gamma)
        if self.parameterization == "edm" and self.timestep_sampler != "uniform":
            raise ValueError("parameterization 'edm' brings its own noise-level distribution: set "
                             "diffusion.timestep_sampler to uniform")
        return self


class AutoencoderConfig(Section):
    """Architecture of the KL autoencoder; saved as its `config.json`."""

    OPTIONS = "AutoencoderOptions"
    in_channels: PosInt = 1
    latent_channels: PosInt = 4
    base_channels: PosInt = 32
    channel_mult: PosIntTuple = (1, 2, 2)
    downsample: Literal[4, 8] = 4  # spatial downsampling factor = 2 ** (len(channel_mult) - 1)

    @model_validator(mode="after")
    def _levels_match_downsample(self) -> "AutoencoderConfig":
        # one stride-2 level between consecutive channel_mult entries: the factor is implied by the list length
        levels = self.downsample.bit_length()  # 4 -> 3 entries, 8 -> 4
        if len(self.channel_mult) != levels:
            raise ValueError(f"downsample {self.downsample} needs {levels} channel_mult entries (one stride-2 level "
                             f"between consecutive entries), got {list(self.channel_mult)}")
        return self


@register_section("train_autoencoder")
class TrainAutoencoderConfig(Section):
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    kl_weight: Annotated[float, Field(ge=0)] = 1e-6
    recon_loss: Literal["l1", "l2"] = "l1"
    lr: PosFloat = 2e-4
    batch_size: PosInt = 64
    steps: PosInt = 3000
    log_every: PosInt = 250
    seed: NonNegInt = 0


@register_section("encode_latents")
class EncodeLatentsConfig(Section):
    batch_size: PosInt = 256
    samples_per_shard: PosInt = 1000


class UNetConfig(Section):
    """U-Net size of `train_diffusion` (channels, levels, attention); in/out channels and classes come from the data."""

    OPTIONS = "NetOptions"
    base_channels: PosInt = 64
    channel_mult: PosIntTuple = (1, 2)
    num_res_blocks: PosInt = 2
    attention_resolutions: Annotated[tuple[PosInt, ...], BeforeValidator(_list_to_tuple)] = (4,)  # feature-map sides
    num_heads: PosInt = 4
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1


class ScalingSection(Section):
    """Ray Train scaling: workers, GPUs, CPUs per worker, restarts of a lost worker."""

    num_workers: PosInt = 2
    use_gpu: bool = False
    cpus_per_worker: PosInt = 1
    max_failures: Annotated[int, Field(ge=-1)] = 1  # -1: retry forever
    use_ray: bool = True  # false: run the loop in-process (1 worker only; tests and benchmarks)


class RayTrainingSection(Section):
    """What the two Ray Train stages share: data space, step budget, AdamW with linear warm-up and clipping, log
    cadence, seed and scaling; each stage's section sets its own defaults. The global batch must split evenly
    across Ray workers, and in-process runs have exactly one worker."""

    space: Literal["pixel", "latent"] = "latent"
    steps: PosInt = 1500
    batch_size: PosInt = 64  # global; split evenly across scaling.num_workers
    lr: PosFloat = 5e-4
    warmup_steps: NonNegInt = 100
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    grad_clip: PosFloat | None = 1.0
    log_every: PosInt = 50
    seed: NonNegInt = 0
    scaling: ScalingSection = ScalingSection()

    @model_validator(mode="after")
    def _batch_splits_across_workers(self):
        n = self.scaling.num_workers
        if self.batch_size % n:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by scaling.num_workers {n} "
                             f"(the global batch is split evenly across workers)")
        if not self.scaling.use_ray and n != 1:
            raise ValueError(f"scaling.use_ray: false runs in-process and needs scaling.num_workers: 1, got {n}")
        return self

    def train_options(self, **more: Any):
        """The library trainer's typed options (`diffusion_core.training.TrainOptions`) from this section."""
        from diffusion_core.training import TrainOptions

        return TrainOptions(lr=self.lr, warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                            grad_clip=self.grad_clip, seed=self.seed, **more)


@register_section("train_diffusion")
class TrainDiffusionConfig(RayTrainingSection):
    conditional: bool = True
    label_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1  # classifier-free guidance: p(label -> null class)
    ema_decay: Annotated[float, Field(ge=0, le=1)] = 0.995
    bf16: Bf16Setting = "auto"  # autocast; auto: only on bf16 hardware (emulated bf16 is far slower)
    channels_last: bool = False
    checkpoint_every: PosInt = 250
    keep_checkpoints: PosInt = 3
    sample_every: NonNegInt = 500  # 0: no sample grids
    unet: UNetConfig = UNetConfig()

    def train_options(self, **more: Any):
        return super().train_options(ema_decay=self.ema_decay, bf16=self.bf16, channels_last=self.channels_last,
                                     fix_hint="lower train_diffusion.lr or enable grad_clip", **more)



@register_section("distill")
class DistillConfig(RayTrainingSection):
    """Few-step students of models/diffusion (stage distill). progressive: `steps` in all, split evenly over the
    rounds; round k's student takes rounds[k] steps where its teacher takes twice as many. consistency: one student
    trained `steps` steps on a grid of `consistency_grid` timesteps, sampled at each of `rounds` steps (each must
    divide the grid)."""

    method: Literal["progressive", "consistency"] = "progressive"
    space: Literal["pixel", "latent"] | None = None  # null: the teacher's (set: checked against it)
    rounds: PosIntTuple = (8, 4, 2, 1)  # progressive: student steps per round, each half the one before
    consistency_grid: PosInt = 40  # consistency: the teacher's DDIM steps the student is made consistent along
    steps: PosInt = 800
    lr: PosFloat = 2e-4
    warmup_steps: NonNegInt = 0
    scale_range: Annotated[tuple[Scale, Scale], BeforeValidator(_list_to_tuple)] | None = (1.0, 3.0)  # w ~ U[lo, hi]
    label_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1  # null-class samples: the unconditional teacher
    bf16: Bf16Setting = "auto"
    checkpoint_every: PosInt = 100
    keep_checkpoints: PosInt = 2

    @model_validator(mode="after")
    def _rounds(self):
        if self.method == "consistency":
            bad = [n for n in self.rounds if self.consistency_grid % n]
            if bad:
                raise ValueError(f"with method consistency every entry of rounds (the step counts it samples at) "
                                 f"must divide consistency_grid {self.consistency_grid}, got {bad[0]}")
        elif any(b * 2 != a for a, b in zip(self.rounds, self.rounds[1:])):
            raise ValueError(f"rounds must halve the step count each round (e.g. [8, 4, 2, 1]), got "
                             f"{list(self.rounds)}")
        if self.method == "progressive" and self.steps % len(self.rounds):
            raise ValueError(f"steps {self.steps} must split evenly over the {len(self.rounds)} rounds")
        if self.scale_range is not None and self.scale_range[0] > self.scale_range[1]:
            raise ValueError(f"scale_range must be [low, high] with low <= high, got {list(self.scale_range)}")
        return self

    def train_options(self, **more: Any):
        return super().train_options(bf16=self.bf16, fix_hint="lower distill.lr or enable grad_clip", **more)


class NoisyClassifierNetConfig(Section):
    """Size of the noisy classifier (a U-Net encoder half); in-channels, image size and classes come from the data."""

    OPTIONS = "NetOptions"
    base_channels: PosInt = 32
    channel_mult: PosIntTuple = (1, 2, 2)
    num_res_blocks: PosInt = 1
    attention_resolutions: Annotated[tuple[PosInt, ...], BeforeValidator(_list_to_tuple)] = ()  # feature-map sides
    num_heads: PosInt = 4
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


@register_section("train_classifier")
class TrainClassifierConfig(RayTrainingSection):
    """Noisy classifier p(y | x_t, t) for classifier guidance; noised with the shared `schedule`/`diffusion`.
    `space` must equal train_diffusion.space (checked by the stage)."""

    batch_size: PosInt = 128
    lr: PosFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    log_every: PosInt = 100
    eval_repeats: PosInt = 2  # noise draws per test sample and timestep quarter
    classifier: NoisyClassifierNetConfig = NoisyClassifierNetConfig()


@register_section("train_feature_net")
class TrainFeatureNetConfig(Section):
    """Clean-image classifier (pixel space) whose penultimate features are the domain FID/KID embedding."""

    width: PosInt = 16  # channels of the first conv stage (then 2x, 4x)
    feature_dim: PosInt = 128  # penultimate (embedding) size
    steps: PosInt = 600
    batch_size: PosInt = 64
    lr: PosFloat = 3e-3
    warmup_steps: NonNegInt = 30
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    max_shift: NonNegInt = 2  # augmentation: random translation by up to this many pixels
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    log_every: PosInt = 100
    seed: NonNegInt = 0

SamplerName = Literal[tuple(SAMPLERS)]  # the registry's names (diffusion_core/samplers/registry.py)
GuidanceKind = Literal["none", "classifier", "cfg"]
Spacing = Literal[SPACINGS]
SamplerOptions = dict[str, float]  # a sampler's own options (e.g. heun's s_churn), checked against the registry


def _check_sampler_options(samplers: Iterable[str], options: Mapping[str, float], where: str) -> None:
    from diffusion_core.samplers import resolve_options

    for name in samplers:
        try:
            resolve_options(name, dict(options))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
Eta = Annotated[float, Field(ge=0, le=1)]


@register_section("reference_stats")
class ReferenceStatsConfig(Section):
    """Features, mean and covariance of a real split per extractor, cached in `data/reference/`."""

    split: Literal["test", "train"] = "test"  # the real images FID compares against (EDM and ADM use train)
    inception: bool = True  # fid_inception/kid_inception in sweep and evaluate (the FID weights make install fetched)
    inception_images: PosInt | None = None  # the split's first N images for Inception (null: all of them)
    inception_weights: str | None = None  # a state-dict file under torch-fidelity's names; null: the installed ones
    inception_download: bool = False  # no installed weights: let torch-fidelity download its own (online only)
    batch_size: PosInt = 256


class SweepTrainingConfig(Section):
    """Training-time axis of `sweep`: a short training run per (schedule, parameterization), pruned by ASHA."""

    schedules: Annotated[tuple[Literal["linear", "cosine", "sigmoid"], ...], BeforeValidator(_list_to_tuple)] = (
        "linear", "cosine")  # empty: no training trials
    parameterizations: Annotated[tuple[Literal["eps", "x0", "v", "mu", "edm"], ...],
                                 BeforeValidator(_list_to_tuple)] = ("eps",)
    steps: PosInt = 150  # optimizer steps per trial (the rest of train_diffusion's section applies)
    batch_size: PosInt = 32
    eval_every: PosInt = 50  # steps between validation reports (ASHA's rungs)
    eval_samples: Annotated[int, Field(ge=2)] = 100  # samples per validation (fd_domain)
    eval_sampler: SamplerName = "ddim"
    eval_steps: PosInt = 20
    eval_guidance: Literal["none", "cfg"] = "cfg"  # classifier guidance would need a classifier per schedule
    eval_scale: Scale = 1.0
    nll_samples: NonNegInt = 64  # test images for nll_bpd at the end of a trial (pixel models); 0: skip
    grace_period: PosInt = 1  # reports before ASHA may stop a trial
    reduction_factor: Annotated[int, Field(ge=2)] = 2
    # sampling blocks crossed with every training setting that finishes (ASHA-pruned ones are not): the same
    # samplers judge every formulation/schedule on the same trained models (reports/sweep_training_x_sampling.csv)
    samplers: Annotated[tuple["SweepGridConfig", ...], BeforeValidator(_list_to_tuple)] = ()

    @model_validator(mode="after")
    def _no_classifier_guidance(self):
        if any("classifier" in block.guidance for block in self.samplers):
            raise ValueError("sweep.training.samplers: guidance 'classifier' would need a classifier trained for "
                             "each short run; use cfg or none")
        return self


class SweepGridConfig(Section):
    """One block of the sampling-time grid: every combination of its lists is a trial. `model: student` samples
    distill's models/student (DDIM on its trailing grid at the step counts it was distilled for, the CFG scale its
    input) beside models/diffusion's samplers."""

    model: Literal["diffusion", "student"] = "diffusion"
    samplers: Annotated[tuple[SamplerName, ...], BeforeValidator(_list_to_tuple), Field(min_length=1)]
    steps: PosIntTuple
    etas: Annotated[tuple[Eta, ...], BeforeValidator(_list_to_tuple), Field(min_length=1)] = (0.0,)  # DDIM only
    guidance: Annotated[tuple[GuidanceKind, ...], BeforeValidator(_list_to_tuple), Field(min_length=1)] = ("cfg",)
    scales: Annotated[tuple[Scale, ...], BeforeValidator(_list_to_tuple), Field(min_length=1)] = (1.0,)
    num_samples: PosInt | None = None  # null: sweep.num_samples (FD is biased by N: compare kd_domain across N)
    spacings: Annotated[tuple[Spacing, ...], BeforeValidator(_list_to_tuple)] | None = None  # null: sweep.spacing
    options: SamplerOptions = {}  # applied to every sampler of the block (each must have them)
    seed_sets: PosInt | None = None  # disjoint seed sets per point; null: sweep.seed_sets

    @model_validator(mode="after")
    def _options_exist(self):
        _check_sampler_options(self.samplers, self.options, "sweep.sampling options")
        if self.model == "student" and (self.samplers not in (("ddim",), ("consistency",)) or self.etas != (0.0,)
                                        or self.spacings not in (None, ("trailing",))
                                        or "classifier" in self.guidance):
            raise ValueError("a model: student block samples the students' own grid: samplers [ddim] (progressive) "
                             "or [consistency], etas [0], spacings null or [trailing], guidance cfg or none")
        return self


SweepTrainingConfig.model_rebuild()  # its `samplers` blocks are SweepGridConfig, defined after it


class SweepSelectConfig(Section):
    """The rule that picks the sweep's best sampling setting (metrics/sweep.json `selected`, used by evaluate):
    the lowest mean `metric` among settings measured on all sweep.seed_sets sets of sweep.num_samples samples
    (fid_inception: sweep.inception_seed_sets sets) with NFE <= max_nfe and mean class_accuracy >=
    min_class_accuracy."""

    metric: Literal["fd_domain", "fid_inception"] = "fd_domain"  # fid_inception: on sweep.inception_samples each
    models: Annotated[tuple[Literal["diffusion", "student"], ...], BeforeValidator(_list_to_tuple),
                      Field(min_length=1)] = ("diffusion", "student")  # which folders' settings it may pick
    max_nfe: PosInt | None = 50  # null: any NFE
    min_class_accuracy: Annotated[float, Field(ge=0, le=1)] = 0.97


@register_section("sweep")
class SweepConfig(Section):
    """Ray Tune sweep: training-time axis (short runs) and sampling-time grid on models/diffusion."""

    num_samples: Annotated[int, Field(ge=2)] = 250  # samples per sampling trial
    batch_size: PosInt = 250
    spacing: Spacing = "trailing"
    seed: NonNegInt = 0  # seed set k of a point with n samples uses seeds seed + k*n + i: trials differ only by setting
    seed_sets: PosInt = 1  # disjoint seed sets per sampling point (mean and spread over them in the report)
    select: SweepSelectConfig = SweepSelectConfig()
    max_concurrent: PosInt = 2  # trials at once (cpus_per_trial each)
    cpus_per_trial: PosInt = 1
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0  # > 0: each trial asks Ray for this many GPUs and samples on cuda
    grid_nfe: PosInt | None = None  # NFE of the per-sampler sample grids; null: largest NFE every sampler has
    grid_samples: PosInt = 50
    # fid_inception/kid_inception of each sampling trial on its first inception_samples samples (0: none), in the
    # first inception_seed_sets seed sets of each setting: Inception-v3 at 299x299 is the costly part on a CPU
    inception_samples: NonNegInt = 250
    inception_seed_sets: PosInt = 1
    bf16: Bf16Setting = False  # denoiser under bf16 autocast while sampling (FastDenoiser); auto: on bf16 hardware
    channels_last: bool = False  # denoiser in channels_last memory format while sampling
    training: SweepTrainingConfig = SweepTrainingConfig()
    sampling: Annotated[tuple[SweepGridConfig, ...], BeforeValidator(_list_to_tuple)] = ()


@register_section("evaluate")
class EvaluateConfig(Section):
    """The chosen sampling configuration, evaluated on more samples -> reports/metrics.json.

    `setting: sweep` takes sampler, steps, eta, spacing, options, guidance and scale from the sweep's selected
    setting (metrics/sweep.json, under sweep.select's rule) and ignores those fields here; `params` uses them."""

    setting: Literal["params", "sweep"] = "params"
    model: Literal["diffusion", "student"] = "diffusion"  # student: distill's models/student (ddim, its step counts)
    sampler: SamplerName = "ddim"
    steps: PosInt | None = 50  # null: the full schedule
    eta: Eta = 0.0
    spacing: Spacing = "trailing"
    options: SamplerOptions = {}  # the sampler's own options, e.g. {s_churn: 10} for heun
    guidance: GuidanceKind = "cfg"
    scale: Scale = 2.0
    num_samples: Annotated[int, Field(ge=2)] = 1000
    inception_samples: PosInt | None = None  # fid_inception on the first N samples; null: all (50,000: published)
    batch_size: PosInt = 250
    seed: NonNegInt = 1000000  # disjoint from the sweep's seeds
    num_workers: PosInt = 2  # Ray tasks sharing the sampling (1: in-process)
    nll_samples: NonNegInt = 200  # test images for nll_bpd (pixel models only); 0: skip
    nll_batch_size: PosInt = 100
    grid_samples: PosInt = 100
    bf16: Bf16Setting = False  # denoiser under bf16 autocast while sampling (not for nll_bpd); auto: bf16 hardware
    channels_last: bool = False  # denoiser in channels_last memory format while sampling

    @model_validator(mode="after")
    def _options_exist(self):
        _check_sampler_options([self.sampler], self.options, "evaluate.options")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"evaluate.eta applies to ddim only; sampler {self.sampler!r} got eta {self.eta}")
        return self


# ----------------------------------------------------------------------------------------------- loading


class Params:
    """The validated sections of one params file; `params.prepare` etc. (read-only)."""

    if TYPE_CHECKING:
        project: ProjectConfig
        tracking: TrackingConfig
        prepare: PrepareConfig
        data: DataConfig
        schedule: ScheduleConfig
        diffusion: DiffusionConfig
        train_autoencoder: TrainAutoencoderConfig
        encode_latents: EncodeLatentsConfig
        train_diffusion: TrainDiffusionConfig
        train_classifier: TrainClassifierConfig
        distill: DistillConfig
        train_feature_net: TrainFeatureNetConfig
        reference_stats: ReferenceStatsConfig
        sweep: SweepConfig
        evaluate: EvaluateConfig

    __slots__ = ("_sections", "path")

    def __init__(self, sections: Mapping[str, Section], path: Path | None = None):
        object.__setattr__(self, "_sections", dict(sections))
        object.__setattr__(self, "path", path)

    def __getattr__(self, name: str) -> Section:
        sections = object.__getattribute__(self, "_sections")
        if name in sections:
            return sections[name]
        if name in SECTIONS:
            raise ConfigError(f"params section {name!r} was not loaded (add it to load_params(..., sections=...))")
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Params is read-only")

    def __contains__(self, name: str) -> bool:
        return name in self._sections

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(self._sections)

    def to_dict(self, *names: str) -> dict[str, dict[str, Any]]:
        """Plain JSON-able dict of the named sections (all loaded ones if none named)."""
        names = names or tuple(self._sections)
        return {n: getattr(self, n).model_dump(mode="json") for n in names}

    def hash(self, *names: str) -> str:
        return params_hash(self.to_dict(*names))

    def __repr__(self) -> str:
        return f"Params({', '.join(self._sections)})"


def params_hash(section_dict: Mapping[str, Any]) -> str:
    """Short, stable hash (sha256 of canonical JSON, 16 hex chars) of a params dict or section."""
    if isinstance(section_dict, BaseModel):
        section_dict = section_dict.model_dump(mode="json")
    blob = json.dumps(section_dict, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 would make it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely; errors become one-line `ConfigError`s."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"params file not found: {path} (pass --params PATH)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read params file {path}: {e}") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path.name}: invalid YAML{where}: {problem}") from None


def load_params(path: str | Path = "params.yaml", sections: Iterable[str] | None = None) -> Params:
    """Read and validate `path`; only `sections` (all registered ones if None) are built.

    Top-level keys must be registered section names; a section missing from the file takes its defaults.
    """
    path = Path(path)
    raw = read_yaml(path)
    return validate_params(raw, sections, source=path.name, path=path)


def validate_params(
    raw: Any, sections: Iterable[str] | None = None, *, source: str = "params.yaml", path: Path | None = None
) -> Params:
    """Validate an already-parsed params mapping (see `load_params`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {_type_name(raw)}")
    for key in raw:
        if not isinstance(key, str) or key not in SECTIONS:
            raise ConfigError(f"{source}: {_unknown(str(key), '', SECTIONS, what='section')}")
    wanted = list(SECTIONS) if sections is None else list(sections)
    built: dict[str, Section] = {}
    for name in wanted:
        if name not in SECTIONS:
            raise ConfigError(f"unknown params section requested: {name!r} (registered: {', '.join(SECTIONS)})")
        built[name] = build_section(name, raw.get(name), source=source)
    return Params(built, path)


def build_section(name: str, data: Any, *, source: str = "params.yaml") -> Section:
    """Validate one section's mapping into its frozen model (None: all defaults)."""
    model = SECTIONS[name]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {_type_name(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_explain(e, model, name, data)}") from None


# ----------------------------------------------------------------------------------------------- messages


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    s = (repr(v) if isinstance(v, str)
         else json.dumps(v, default=str) if isinstance(v, (list, dict, bool, type(None))) else str(v))
    return s if len(s) <= 60 else s[:57] + "..."


def _unknown(key: str, prefix: str, accepted: Iterable[str], what: str = "key") -> str:
    accepted = list(accepted)
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?; " if close else ""
    return f"unknown {what} '{prefix}{key}' ({hint}accepted: {', '.join(accepted)})"


def _strip_optional(ann: Any) -> tuple[Any, bool]:
    if get_origin(ann) is Union or type(ann).__name__ == "UnionType":
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) < len(get_args(ann)) and len(args) == 1:
            return args[0], True
    return ann, False


def _unwrap(ann: Any) -> tuple[Any, list[Any]]:
    """Strip Annotated layers, collecting their constraint metadata."""
    meta: list[Any] = []
    while get_origin(ann) is Annotated:
        args = get_args(ann)
        ann = args[0]
        for m in args[1:]:
            meta.extend(getattr(m, "metadata", []) if isinstance(m, FieldInfo) else [m])
    return ann, meta


def _bounds(meta: Iterable[Any]) -> str:
    parts = {}
    for m in meta:
        for attr in ("gt", "ge", "lt", "le"):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                parts[attr] = getattr(m, attr)
    lo = ("(", parts["gt"]) if "gt" in parts else ("[", parts["ge"]) if "ge" in parts else None
    hi = (")", parts["lt"]) if "lt" in parts else ("]", parts["le"]) if "le" in parts else None
    if lo and hi:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>' if lo[0] == '(' else '>='} {lo[1]}"
    if hi:
        return f" {'<' if hi[0] == ')' else '<='} {hi[1]}"
    return ""


def describe(ann: Any, field: FieldInfo | None = None) -> str:
    """Human description of what a field accepts, e.g. 'a number in (0, 1)' or 'one of eps, x0, v'."""
    ann, optional = _strip_optional(ann)
    ann, meta = _unwrap(ann)
    if field is not None:
        meta = list(field.metadata) + meta
    origin = get_origin(ann)
    if origin is Literal:
        desc = "one of " + ", ".join(str(a) for a in get_args(ann))
    elif ann is bool:
        desc = "true or false"
    elif ann is int:
        desc = "an integer" + _bounds(meta)
    elif ann is float:
        desc = "a number" + _bounds(meta)
    elif ann is str:
        desc = "a non-empty string" if any(getattr(m, "min_length", 0) for m in meta) else "a string"
        desc = field.description if field is not None and field.description else desc  # a pattern's words
    elif origin in (tuple, list):
        inner = get_args(ann)[0] if get_args(ann) else Any
        desc = f"a list of {describe(inner).replace('an integer', 'integers').replace('a number', 'numbers')}"
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        desc = "a mapping with keys " + ", ".join(ann.model_fields)
    else:
        desc = f"a valid {getattr(ann, '__name__', ann)}"
    return desc + (" or null" if optional else "")


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, FieldInfo | None, Any]:
    """Walk `loc` through nested models: (model holding the last key, its FieldInfo, annotation)."""
    holder: Any = model
    field = None
    ann: Any = None
    for part in loc:
        if (isinstance(holder, type) and issubclass(holder, BaseModel) and isinstance(part, str)
                and part in holder.model_fields):
            field = holder.model_fields[part]
            ann = field.annotation
            parent = holder
            holder, _ = _unwrap(_strip_optional(ann)[0])
        else:
            # list index / union branch name: stay on the same field
            continue
    return (parent if field is not None else None), field, ann


def _explain(e: ValidationError, model: type[BaseModel], section: str, data: Any) -> str:
    """The one-line message for pydantic's first error: the key path, what was given and what is accepted (one
    branch per kind of error pydantic reports)."""
    err = e.errors(include_url=False)[0]
    loc = tuple(err.get("loc", ()))
    typ = err.get("type", "")
    keys = [p for p in loc if isinstance(p, str)]
    path = ".".join([section] + [str(p) for p in loc])
    if typ == "extra_forbidden":
        holder: Any = model
        if len(loc) > 1:
            _, f, ann = _field_at(model, loc[:-1])
            holder, _ = _unwrap(_strip_optional(ann)[0]) if f is not None else (model, None)
        accepted = list(holder.model_fields) if isinstance(holder, type) and issubclass(holder, BaseModel) else []
        prefix = ".".join([section] + [str(p) for p in loc[:-1]]) + "."
        return _unknown(str(loc[-1]), prefix, accepted)
    if typ == "missing":
        return f"missing key '{path}'"
    # a cross-field rule (model_validator) reports at the model's own location
    parent, field, ann = _field_at(model, loc) if keys else (None, None, None)
    if field is None or typ == "value_error":
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        where = path if keys else section
        return f"{where}: {msg}"
    # value at loc
    value: Any = data
    for p in loc:
        try:
            value = value[p]
        except (KeyError, IndexError, TypeError):
            value = err.get("input")
            break
    got = f"got {_type_name(value)}" if isinstance(value, (dict, list)) else f"got {_show(value)}"
    if typ in ("literal_error", "enum") and isinstance(value, str):
        opts = [str(a) for a in get_args(_unwrap(_strip_optional(ann)[0])[0])]
        close = difflib.get_close_matches(value, opts, n=1, cutoff=0.6)
        if close:
            got += f" (did you mean '{close[0]}'?)"
    # report on the whole field, e.g. "prepare.test_fraction must be a number in (0, 1), got 1.5"
    field_path = ".".join([section] + [p for p in loc if isinstance(p, str)])
    if get_origin(_unwrap(_strip_optional(ann)[0])[0]) in (tuple, list) and any(isinstance(p, int) for p in loc):
        field_path = path
        inner_ann = get_args(_unwrap(_strip_optional(ann)[0])[0])[0]
        return f"{field_path} must be {describe(inner_ann)}, {got}"
    return f"{field_path} must be {describe(ann, field)}, {got}"


def section_keys(name: str) -> list[str]:
    """Dotted key paths of every field in a section (nested models expanded)."""

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        out = []
        for k, f in model.model_fields.items():
            inner, _ = _unwrap(_strip_optional(f.annotation)[0])
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                out += walk(inner, f"{prefix}{k}.")
            else:
                out.append(prefix + k)
        return out

    return walk(SECTIONS[name], "")


__all__ = [
    "ConfigError",
    "Section",
    "SECTIONS",
    "register_section",
    "Params",
    "load_params",
    "validate_params",
    "build_section",
    "params_hash",
    "section_keys",
    "describe",
    "ProjectConfig",
    "TrackingConfig",
    "PrepareConfig",
    "DataConfig",
    "ScheduleConfig",
    "DiffusionConfig",
    "AutoencoderConfig",
    "TrainAutoencoderConfig",
    "EncodeLatentsConfig",
    "UNetConfig",
    "ScalingSection",
    "TrainDiffusionConfig",
    "NoisyClassifierNetConfig",
    "TrainClassifierConfig",
    "TrainFeatureNetConfig",
    "ReferenceStatsConfig",
    "SweepTrainingConfig",
    "SweepGridConfig",
    "SweepConfig",
    "EvaluateConfig",
    "PosInt",
    "NonNegInt",
    "PosFloat",
    "Fraction",
    "PosIntTuple",
]
