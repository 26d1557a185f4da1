"""The params.yaml schema: one frozen pydantic model per section, registered under its name.

A section carries no defaults: every key is written once, in params.yaml (tests check it lists every key, and
configs/*.yaml too); accepted names (schedules, formulations, variances, losses, samplers, spacings, datasets)
are the library's registries.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Iterable, Literal, Mapping, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from diffusion_core.data.sources import DATASETS
from diffusion_core.diffusion import LOSSES, PARAMETERIZATIONS, VARIANCES
from diffusion_core.resample import TIMESTEP_SAMPLERS
from diffusion_core.samplers import SAMPLERS, SPACINGS
from diffusion_core.schedules import SCHEDULES


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
DatasetName = Literal[DATASETS]
ScheduleName = Literal[SCHEDULES]
Parameterization = Literal[PARAMETERIZATIONS]


@register_section("project")
class ProjectConfig(Section):
    name: Annotated[str, Field(min_length=1)]
    experiment: Annotated[str, Field(min_length=1)]  # MLflow experiment every stage logs into
    seed: NonNegInt
    # shared storage (s3://bucket/prefix, any fsspec URL, or a path) every trained model folder is published under
    # as <root>/models/<name>; null: the DVC workspace only. Env DIFFUSION_STORAGE_ROOT overrides it.
    storage_root: str | None
    # torch device of the stages that run a network outside Ray Train (train_autoencoder, encode_latents,
    # train_feature_net, reference_stats, evaluate; sweep trials use sweep.gpus_per_trial): auto (cuda when torch
    # sees a GPU, else cpu), cpu, cuda, cuda:N or mps. The Ray Train stages use their scaling.use_gpu.
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                                 description="one of auto, cpu, cuda, cuda:N, mps")]


@register_section("tracking")
class TrackingConfig(Section):
    enabled: bool
    tracking_uri: str | None  # None: sqlite:///<cwd>/mlflow.db; env MLFLOW_TRACKING_URI overrides
    fallback_local: bool  # unreachable server: fall back to the local SQLite store instead of failing


@register_section("prepare")
class PrepareConfig(Section):
    OPTIONS = "PrepareOptions"
    dataset: DatasetName
    data_dir: str  # torchvision files / imagefolder root, relative to the working directory
    test_fraction: Fraction
    samples_per_shard: PosInt
    seed: NonNegInt
    image_size: PosInt | None  # resize images to image_size x image_size (None: keep)


@register_section("data")
class DataConfig(Section):
    # No shuffle buffer: the training stages read their rank's shards into memory once and draw each step's batch
    # by seeded index (bitwise-exact resume); ShardDataset(shuffle_buffer=...) streams sets that do not fit.
    on_bad_shard: Literal["error", "skip"]
    verify_checksums: bool


@register_section("schedule")
class ScheduleConfig(Section):
    OPTIONS = "ScheduleOptions"
    name: ScheduleName
    num_timesteps: Annotated[int, Field(ge=2)]
    logsnr_shift: float  # added to the schedule's log-SNR at every t (> 0: less noise); README measures it


@register_section("diffusion")
class DiffusionConfig(Section):
    OPTIONS = "DiffusionOptions"
    parameterization: Parameterization
    variance: Literal[VARIANCES]
    loss: Literal[LOSSES]
    min_snr_gamma: PosFloat | None
    timestep_sampler: Literal[TIMESTEP_SAMPLERS]
    sigma_data: PosFloat | None  # edm only: the data's std; null: measured on the training data
    edm_p_mean: float  # edm only: training noise levels ln(sigma/alpha) ~ N(p_mean, p_std^2) (Karras et al.)
    edm_p_std: PosFloat

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
    in_channels: PosInt
    latent_channels: PosInt
    base_channels: PosInt
    channel_mult: PosIntTuple
    downsample: Literal[4, 8]  # spatial downsampling factor = 2 ** (len(channel_mult) - 1)

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
    autoencoder: AutoencoderConfig
    kl_weight: Annotated[float, Field(ge=0)]
    recon_loss: Literal["l1", "l2"]
    lr: PosFloat
    batch_size: PosInt
    steps: PosInt
    log_every: PosInt
    seed: NonNegInt


@register_section("encode_latents")
class EncodeLatentsConfig(Section):
    batch_size: PosInt
    samples_per_shard: PosInt


class UNetConfig(Section):
    """U-Net size of `train_diffusion` (channels, levels, attention); in/out channels and classes come from the data."""

    OPTIONS = "NetOptions"
    base_channels: PosInt
    channel_mult: PosIntTuple
    num_res_blocks: PosInt
    attention_resolutions: Annotated[tuple[PosInt, ...], BeforeValidator(_list_to_tuple)]  # feature-map sides
    num_heads: PosInt
    dropout: Annotated[float, Field(ge=0, lt=1)]


class DiTConfig(Section):
    """Diffusion transformer size of `train_diffusion` (backbone: dit); in/out channels and classes come from the
    data, whose side must be a multiple of patch_size."""

    OPTIONS = "DiTOptions"
    patch_size: PosInt
    hidden_size: PosInt
    depth: PosInt
    num_heads: PosInt
    mlp_ratio: PosFloat
    dropout: Annotated[float, Field(ge=0, lt=1)]

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads} and "
                             f"by 4 (2-D sin-cos positions)")
        return self


class ScalingSection(Section):
    """Ray Train scaling: workers, GPUs, CPUs per worker, restarts of a lost worker."""

    num_workers: PosInt
    use_gpu: bool
    cpus_per_worker: PosInt
    max_failures: Annotated[int, Field(ge=-1)]  # -1: retry forever
    use_ray: bool  # false: run the loop in-process (1 worker only; tests and benchmarks)


class RayTrainingSection(Section):
    """What the Ray Train stages share: data space, step budget, AdamW with linear warm-up and clipping, log
    cadence, seed and scaling. The global batch must split evenly across Ray workers, and in-process runs have
    exactly one worker."""

    space: Literal["pixel", "latent"]
    steps: PosInt
    batch_size: PosInt  # global; split evenly across scaling.num_workers
    lr: PosFloat
    warmup_steps: NonNegInt
    weight_decay: Annotated[float, Field(ge=0)]
    grad_clip: PosFloat | None
    log_every: PosInt
    seed: NonNegInt
    scaling: ScalingSection

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
    conditional: bool
    label_dropout: Annotated[float, Field(ge=0, lt=1)]  # classifier-free guidance: p(label -> null class)
    ema_decay: Annotated[float, Field(ge=0, le=1)]
    bf16: Bf16Setting  # autocast; auto: only on bf16 hardware (emulated bf16 is far slower)
    channels_last: bool
    checkpoint_every: PosInt
    keep_checkpoints: PosInt
    sample_every: NonNegInt  # 0: no sample grids
    backbone: Literal["unet", "dit"]  # the denoiser: the `unet` section's U-Net or the `dit` section's transformer
    unet: UNetConfig
    dit: DiTConfig

    def net_options(self):
        """The library's options of the chosen backbone (build_denoiser takes either)."""
        return (self.unet if self.backbone == "unet" else self.dit).to_options()

    def train_options(self, **more: Any):
        return super().train_options(ema_decay=self.ema_decay, bf16=self.bf16, channels_last=self.channels_last,
                                     fix_hint="lower train_diffusion.lr or enable grad_clip", **more)


@register_section("distill")
class DistillConfig(RayTrainingSection):
    """Few-step students of models/diffusion (stage distill). progressive: `steps` in all, split evenly over the
    rounds; round k's student takes rounds[k] steps where its teacher takes twice as many. consistency: one student
    trained `steps` steps on a grid of `consistency_grid` timesteps, sampled at each of `rounds` steps (each must
    divide the grid)."""

    method: Literal["progressive", "consistency"]
    space: Literal["pixel", "latent"] | None  # null: the teacher's (set: checked against it)
    rounds: PosIntTuple  # progressive: student steps per round, each half the one before
    consistency_grid: PosInt  # consistency: the teacher's DDIM steps the student is made consistent along
    scale_range: Annotated[tuple[Scale, Scale], BeforeValidator(_list_to_tuple)] | None  # w ~ U[lo, hi]
    label_dropout: Annotated[float, Field(ge=0, lt=1)]  # null-class samples: the unconditional teacher
    bf16: Bf16Setting
    checkpoint_every: PosInt
    keep_checkpoints: PosInt

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


class NoisyClassifierNetConfig(UNetConfig):
    """Size of the noisy classifier (a U-Net encoder half: the U-Net's keys); in-channels, image size and classes
    come from the data."""


@register_section("train_classifier")
class TrainClassifierConfig(RayTrainingSection):
    """Noisy classifier p(y | x_t, t) for classifier guidance; noised with the shared `schedule`/`diffusion`.
    `space` must equal train_diffusion.space (checked by the stage)."""

    eval_repeats: PosInt  # noise draws per test sample and timestep quarter
    classifier: NoisyClassifierNetConfig


@register_section("train_feature_net")
class TrainFeatureNetConfig(Section):
    """Clean-image classifier (pixel space) whose penultimate features are the domain FID/KID embedding."""

    width: PosInt  # channels of the first conv stage (then 2x, 4x)
    feature_dim: PosInt  # penultimate (embedding) size
    steps: PosInt
    batch_size: PosInt
    lr: PosFloat
    warmup_steps: NonNegInt
    weight_decay: Annotated[float, Field(ge=0)]
    max_shift: NonNegInt  # augmentation: random translation by up to this many pixels
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    log_every: PosInt
    seed: NonNegInt

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

    split: Literal["test", "train"]  # the real images FID compares against (EDM and ADM use train)
    inception: bool  # fid_inception/kid_inception in sweep and evaluate (the FID weights make install fetched)
    inception_images: PosInt | None  # the split's first N images for Inception (null: all of them)
    inception_weights: str | None  # a state-dict file under torch-fidelity's names; null: the installed ones
    inception_download: bool  # no installed weights: let torch-fidelity download its own (online only)
    batch_size: PosInt


class SweepTrainingConfig(Section):
    """Training-time axis of `sweep`: a short training run per (schedule, parameterization), pruned by ASHA."""

    schedules: Annotated[tuple[ScheduleName, ...], BeforeValidator(_list_to_tuple)]  # empty: no training trials
    parameterizations: Annotated[tuple[Parameterization, ...], BeforeValidator(_list_to_tuple)]
    steps: PosInt  # optimizer steps per trial (the rest of train_diffusion's section applies)
    batch_size: PosInt
    eval_every: PosInt  # steps between validation reports (ASHA's rungs)
    eval_samples: Annotated[int, Field(ge=2)]  # samples per validation (fd_domain)
    eval_sampler: SamplerName
    eval_steps: PosInt
    eval_guidance: Literal["none", "cfg"]  # classifier guidance would need a classifier per schedule
    eval_scale: Scale
    nll_samples: NonNegInt  # test images for nll_bpd at the end of a trial (pixel models); 0: skip
    grace_period: PosInt  # reports before ASHA may stop a trial
    reduction_factor: Annotated[int, Field(ge=2)]
    # sampling blocks crossed with every training setting that finishes (ASHA-pruned ones are not): the same
    # samplers judge every formulation/schedule on the same trained models (reports/sweep_training_x_sampling.csv)
    samplers: Annotated[tuple["SweepGridConfig", ...], BeforeValidator(_list_to_tuple)]

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

    metric: Literal["fd_domain", "fid_inception"]  # fid_inception: on sweep.inception_samples each
    models: Annotated[tuple[Literal["diffusion", "student"], ...], BeforeValidator(_list_to_tuple),
                      Field(min_length=1)]  # which folders' settings it may pick
    max_nfe: PosInt | None  # null: any NFE
    min_class_accuracy: Annotated[float, Field(ge=0, le=1)]


@register_section("sweep")
class SweepConfig(Section):
    """Ray Tune sweep: training-time axis (short runs) and sampling-time grid on models/diffusion."""

    num_samples: Annotated[int, Field(ge=2)]  # samples per sampling trial
    batch_size: PosInt
    spacing: Spacing
    seed: NonNegInt  # seed set k of a point with n samples uses seeds seed + k*n + i: trials differ only by setting
    seed_sets: PosInt  # disjoint seed sets per sampling point (mean and spread over them in the report)
    select: SweepSelectConfig
    max_concurrent: PosInt  # trials at once (cpus_per_trial each)
    cpus_per_trial: PosInt
    gpus_per_trial: Annotated[float, Field(ge=0)]  # > 0: each trial asks Ray for this many GPUs and samples on cuda
    grid_nfe: PosInt | None  # NFE of the per-sampler sample grids; null: largest NFE every sampler has
    grid_samples: PosInt
    # fid_inception/kid_inception of each sampling trial on its first inception_samples samples (0: none), in the
    # first inception_seed_sets seed sets of each setting: Inception-v3 at 299x299 is the costly part on a CPU
    inception_samples: NonNegInt
    inception_seed_sets: PosInt
    bf16: Bf16Setting  # denoiser under bf16 autocast while sampling (FastDenoiser); auto: on bf16 hardware
    channels_last: bool  # denoiser in channels_last memory format while sampling
    training: SweepTrainingConfig
    sampling: Annotated[tuple[SweepGridConfig, ...], BeforeValidator(_list_to_tuple)]


@register_section("evaluate")
class EvaluateConfig(Section):
    """The chosen sampling configuration, evaluated on more samples -> reports/metrics.json.

    `setting: sweep` takes sampler, steps, eta, spacing, options, guidance and scale from the sweep's selected
    setting (metrics/sweep.json, under sweep.select's rule) and ignores those fields here; `params` uses them."""

    setting: Literal["params", "sweep"]
    model: Literal["diffusion", "student"]  # student: distill's models/student (ddim, its step counts)
    sampler: SamplerName
    steps: PosInt | None  # null: the full schedule
    eta: Eta
    spacing: Spacing
    options: SamplerOptions  # the sampler's own options, e.g. {s_churn: 10} for heun
    guidance: GuidanceKind
    scale: Scale
    num_samples: Annotated[int, Field(ge=2)]
    inception_samples: PosInt | None  # fid_inception on the first N samples; null: all (50,000: published)
    batch_size: PosInt
    seed: NonNegInt  # disjoint from the sweep's seeds
    num_workers: PosInt  # Ray tasks sharing the sampling (1: in-process)
    nll_samples: NonNegInt  # test images for nll_bpd (pixel models only); 0: skip
    nll_batch_size: PosInt
    grid_samples: PosInt
    bf16: Bf16Setting  # denoiser under bf16 autocast while sampling (not for nll_bpd); auto: bf16 hardware
    channels_last: bool  # denoiser in channels_last memory format while sampling

    @model_validator(mode="after")
    def _options_exist(self):
        _check_sampler_options([self.sampler], self.options, "evaluate.options")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"evaluate.eta applies to ddim only; sampler {self.sampler!r} got eta {self.eta}")
        return self
