"""The sampler registry: the single source of truth for sampler names, options, guidance mode and NFE.

A sampler module registers a `SamplerSpec` (name -> loop function, options with defaults and bounds, how classifier
guidance enters, network calls per step). `samplers/__init__.py` imports every module of this package, so adding a
sampler is one new file; params validation, the CLI's `--sampler` choices and `--help`, the sweep's grid and the
docs read `SAMPLERS` from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal


@dataclass(frozen=True)
class Option:
    """A float option of a sampler, with its default and closed bounds."""

    name: str
    default: float
    low: float = -math.inf
    high: float = math.inf
    help: str = ""


@dataclass(frozen=True)
class SamplerSpec:
    """What the rest of the code needs to know about a sampler.

    `loop(predict, x, grid, noise, options, callback) -> x0` runs it over `grid` (`common.Grid`, the noise levels
    `sample` computed once), calling the network at grid point i as `predict(x, i)`.
    `guidance`: classifier guidance as an eps correction ("eps", Dhariwal & Nichol alg. 2) or a DDPM mean shift
    ("mean", alg. 1). `calls_per_step` / `final_calls`: network calls of a step and of the last step (Heun's last
    step is an Euler step), so NFE = calls_per_step * (steps - 1) + final_calls, doubled by classifier-free guidance.
    `stochastic(options)`: whether it injects fresh noise.
    """

    name: str
    loop: Callable
    summary: str
    reference: str
    options: tuple[Option, ...] = ()
    guidance: Literal["eps", "mean"] = "eps"
    calls_per_step: int = 1
    final_calls: int = 1
    stochastic: Callable[[dict], bool] = field(default=lambda options: False)

    def defaults(self) -> dict:
        return {o.name: o.default for o in self.options}

    def nfe(self, steps: int, cfg: bool = False) -> int:
        """Network evaluations per sample for `steps` grid points (x2 with classifier-free guidance)."""
        n = self.calls_per_step * (steps - 1) + self.final_calls
        return 2 * n if cfg else n

    def steps_for_nfe(self, nfe: int, cfg: bool = False) -> int:
        """The most grid points whose NFE does not exceed `nfe` (at least 1)."""
        per = nfe // 2 if cfg else nfe
        return max(1, (per - self.final_calls) // self.calls_per_step + 1)


SAMPLERS: dict[str, SamplerSpec] = {}


def register(spec: SamplerSpec) -> SamplerSpec:
    if spec.name in SAMPLERS:
        raise ValueError(f"sampler {spec.name!r} is registered twice")
    SAMPLERS[spec.name] = spec
    return spec


def get_sampler(name: str) -> SamplerSpec:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; accepted: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def resolve_options(name: str, options: dict | None = None) -> dict:
    """The sampler's options with defaults filled in; ValueError (one line) for an unknown or out-of-range option."""
    spec = get_sampler(name)
    known = {o.name: o for o in spec.options}
    out = spec.defaults()
    for key, value in (options or {}).items():
        if key not in known:
            accepted = ", ".join(known) or "none"
            raise ValueError(f"sampler {name!r} has no option {key!r}; its options: {accepted}")
        o = known[key]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"sampler {name!r} option {key} must be a number, got {value!r}") from None
        if not o.low <= value <= o.high:
            raise ValueError(f"sampler {name!r} option {key} must be in [{o.low}, {o.high}], got {value}")
        out[key] = value
    return out


def describe() -> str:
    """One line per sampler for --help and the docs: name, summary, options with defaults."""
    lines = []
    for s in SAMPLERS.values():
        opts = ", ".join(f"{o.name}={o.default:g}" for o in s.options)
        lines.append(f"{s.name}: {s.summary}" + (f" (options: {opts})" if opts else "") + f" [{s.reference}]")
    return "\n".join(lines)
