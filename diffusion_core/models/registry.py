"""`build_model(config)`: any model of the library rebuilt from its `.config` ({"kind": ..., **kwargs}).

The kinds are registered by `diffusion_core.models` on import (`register_model`); a model that holds other models
(the student family) builds them through here without importing the package that registers it.
"""

from __future__ import annotations

import inspect

from torch import nn

MODEL_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(*classes: type[nn.Module]) -> None:
    """Make each class buildable by its `kind`."""
    for cls in classes:
        if MODEL_REGISTRY.get(cls.kind, cls) is not cls:
            raise RuntimeError(f"model kind {cls.kind!r} registered twice")
        MODEL_REGISTRY[cls.kind] = cls


def build_model(config: dict) -> nn.Module:
    """Model from {"kind": ..., **constructor kwargs} (a model's `.config`); ValueError on unknown kind or keys."""
    if not isinstance(config, dict) or config.get("kind") not in MODEL_REGISTRY:
        kind = config.get("kind") if isinstance(config, dict) else config
        raise ValueError(f"model config key 'kind' = {kind!r} is not one of {sorted(MODEL_REGISTRY)}")
    cls = MODEL_REGISTRY[config["kind"]]
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    kwargs = {k: v for k, v in config.items() if k != "kind"}
    for key in kwargs:
        if key not in accepted:
            raise ValueError(f"model config key {key!r} is not accepted by kind {config['kind']!r}; "
                             f"accepted keys: {accepted}")
    return cls(**kwargs)
