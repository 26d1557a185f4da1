"""Reading a params file: YAML, the requested sections validated, `Params` (read-only), the params hash."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from .explain import _explain, _strip_optional, _type_name, _unknown, _unwrap
from .sections import SECTIONS, Section

if TYPE_CHECKING:  # pragma: no cover
    from .sections import (
        DataConfig,
        DiffusionConfig,
        DistillConfig,
        EncodeLatentsConfig,
        EvaluateConfig,
        PrepareConfig,
        ProjectConfig,
        ReferenceStatsConfig,
        ScheduleConfig,
        SweepConfig,
        TrackingConfig,
        TrainAutoencoderConfig,
        TrainClassifierConfig,
        TrainDiffusionConfig,
        TrainFeatureNetConfig,
    )


class ConfigError(ValueError):
    """Invalid params file: the message is one line naming the key path and the accepted values."""

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


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


def merged(base: Any, overrides: Any) -> Any:
    """`base` with `overrides` deep-merged in: mappings merge key by key, anything else (lists included) replaces.
    Neither argument is changed."""
    if not isinstance(base, Mapping) or not isinstance(overrides, Mapping):
        return copy.deepcopy(overrides)
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if key in out else copy.deepcopy(value)
    return out


def load_params(path: str | Path = "params.yaml", sections: Iterable[str] | None = None) -> Params:
    """Read and validate `path`; only `sections` (all registered ones if None) are built.

    Top-level keys must be registered section names; every key of a requested section must be set (sections
    have no defaults: the repository's params.yaml is the one place they are written).
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
    """Validate one section's mapping into its frozen model."""
    model = SECTIONS[name]
    if data is None:
        raise ConfigError(f"{source}: section '{name}' is missing (copy it from the repository's params.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section '{name}' must be a mapping of keys, got {_type_name(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_explain(e, model, name, data)}") from None


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
