"""Typed, validated params: one frozen pydantic model per `params.yaml` section (`sections.py`), the loader
(`loader.py`) and the one-line error messages (`explain.py`).

Adding a section (e.g. `train_diffusion`)::

    @register_section("train_diffusion")
    class TrainDiffusionConfig(Section):
        steps: PosInt
        unet: UNetConfig          # nested sections are plain `Section` models

then write its keys and values in `params.yaml` and `configs/*.yaml` (the one place a value is written; tests
check every file lists every key) and, for type checkers, add `train_diffusion: TrainDiffusionConfig` to the
annotations in `Params`. Errors are `ConfigError`, one line naming the key path and what is accepted.
"""

from .explain import describe
from .loader import (
                     ConfigError,
                     Params,
                     build_section,
                     load_params,
    merged,
                     params_hash,
                     read_yaml,
                     section_keys,
                     validate_params,
)
from .sections import (
                     SECTIONS,
                     AutoencoderConfig,
                     DataConfig,
                     DiffusionConfig,
                     DistillConfig,
                     EncodeLatentsConfig,
                     EvaluateConfig,
                     Fraction,
                     NoisyClassifierNetConfig,
                     NonNegInt,
                     PosFloat,
                     PosInt,
                     PosIntTuple,
                     PrepareConfig,
                     ProjectConfig,
                     ReferenceStatsConfig,
                     ScalingSection,
                     ScheduleConfig,
                     Section,
                     SweepConfig,
                     SweepGridConfig,
                     SweepSelectConfig,
                     SweepTrainingConfig,
                     TrackingConfig,
                     TrainAutoencoderConfig,
                     TrainClassifierConfig,
                     TrainDiffusionConfig,
                     TrainFeatureNetConfig,
                     UNetConfig,
                     register_section,
)

__all__ = ["ConfigError", "Params", "build_section", "load_params", "merged", "params_hash", "read_yaml",
           "section_keys", "validate_params", "describe", "SECTIONS", "Section", "register_section",
           "AutoencoderConfig", "DataConfig", "DiffusionConfig", "DistillConfig", "EncodeLatentsConfig",
           "EvaluateConfig",
           "NoisyClassifierNetConfig", "PrepareConfig", "ProjectConfig", "ReferenceStatsConfig", "ScalingSection",
           "ScheduleConfig", "SweepConfig", "SweepGridConfig", "SweepSelectConfig", "SweepTrainingConfig",
           "TrackingConfig", "TrainAutoencoderConfig", "TrainClassifierConfig", "TrainDiffusionConfig",
           "TrainFeatureNetConfig", "UNetConfig", "Fraction", "NonNegInt", "PosFloat", "PosInt", "PosIntTuple"]
