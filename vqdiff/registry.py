"""The one map of model kinds: kind -> (config dataclass, model class).

A model class names its own kind (`kind = "ar"`), and `MODELS` below lists every model vqdiff
ships, so a checkpoint's `config.json` (`kind` + config) is enough to rebuild its model. Imports
run one way: `vqdiff.checkpoint` imports this module, this module imports the model modules, and
the model modules import neither.

A model defined outside vqdiff (a plugin, a test) adds itself with `@register_model(kind, Config)`.
"""

from __future__ import annotations

from typing import Callable

from vqdiff.ar import ARConfig, ARTransformer
from vqdiff.diffusion import DiffusionConfig, DiffusionTransformer
from vqdiff.errors import CheckpointError
from vqdiff.pretrained import DiffusersTokenizer, DiffusersTokenizerConfig
from vqdiff.tokenizer import TokenizerConfig, VQTokenizer

# kind -> (config dataclass, model class); the kind is the class's own `kind` attribute
MODELS: dict[str, tuple[type, type]] = {
    model_cls.kind: (config_cls, model_cls)
    for config_cls, model_cls in (
        (TokenizerConfig, VQTokenizer),
        (ARConfig, ARTransformer),
        (DiffusionConfig, DiffusionTransformer),
        (DiffusersTokenizerConfig, DiffusersTokenizer),
    )
}


def register_model(kind: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator for a model defined outside vqdiff: `@register_model("mine", MyConfig)` sets
    the class's `kind` and makes `load_model` able to rebuild it."""

    def wrap(model_cls: type) -> type:
        MODELS[kind] = (config_cls, model_cls)
        model_cls.kind = kind
        return model_cls

    return wrap


def model_class(kind: str) -> type:
    """The model class registered as `kind` ("tokenizer", "ar", "diffusion", "diffusers"); a
    CheckpointError names the choices."""
    return _registered(kind)[1]


def config_class(kind: str) -> type:
    """The config dataclass of the model registered as `kind`."""
    return _registered(kind)[0]


def _registered(kind: str) -> tuple[type, type]:
    if kind not in MODELS:
        raise CheckpointError(f"unknown model kind {kind!r}; choose from {', '.join(MODELS)}")
    return MODELS[kind]
