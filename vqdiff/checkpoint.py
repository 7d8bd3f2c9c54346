"""Save and load models as a folder: `config.json` + `model.safetensors` (+ `train_state.pt`).

`config.json` carries `kind`, `format_version` and the model's dataclass config, so a folder is
enough to rebuild the model (nanoGPT's lesson): `load_model(folder)` looks the kind up in
`vqdiff.registry`. Weights come from the plain module (never a compiled or DDP-wrapped one, whose
keys carry an `_orig_mod.` or `module.` prefix that every loader would have to strip) and are
loaded with `strict=True` (`strict=False` silently drops the weights that do not match). Every
write goes through `vqdiff.io.atomic_write` (a temp file, then `os.replace`), so a kill never
leaves half a checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vqdiff.errors import CheckpointError
from vqdiff.io import atomic_write, load_tensors, read_json, save_tensors, write_json
from vqdiff.registry import MODELS, config_class, model_class

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------- config <-> dict


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class ConfigError(ValueError):
    """A config dict that does not build its dataclass; the message is one line, without its place."""


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build a dataclass config from a dict (a config.json, a recipe section), rejecting unknown
    keys and restoring tuples from JSON/TOML lists. Raises ConfigError; the caller says where."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: tuple(v) if isinstance(v, list) and typing.get_origin(hints.get(k)) is tuple else v for k, v in d.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def config_defaults(cls: type) -> dict[str, Any]:
    """The fields of a config dataclass that have defaults, with them: a recipe section's defaults."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


# ---------------------------------------------------------------- models


def save_model(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write `config.json` and `model.safetensors` for a registered model into `folder`."""
    model = unwrap(model)
    folder = Path(folder)
    # weights first, config last: a folder with a config always has matching weights
    save_tensors(folder / WEIGHTS_FILE, model.state_dict())
    meta = {"kind": model.kind, "format_version": FORMAT_VERSION, "config": config_to_dict(model.cfg)}
    if extra:
        meta.update(extra)
    write_json(folder / CONFIG_FILE, meta)


def read_config(folder: str | Path, kind: str | None = None) -> tuple[str, Any]:
    """(kind, config dataclass) from a checkpoint folder's `config.json`."""
    folder = Path(folder)
    meta = read_json(folder / CONFIG_FILE)
    if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a vqdiff checkpoint config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    found = meta["kind"]
    if kind is not None and found != kind:
        raise CheckpointError(f"{folder} holds a {found!r} checkpoint, not {kind!r}")
    if found not in MODELS:
        raise CheckpointError(f"{folder}: unknown model kind {found!r}")
    try:
        return found, config_from_dict(config_class(found), meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from None


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Load `model.safetensors` into `model` strictly; a mismatch is a CheckpointError."""
    path = Path(folder) / WEIGHTS_FILE
    state = load_tensors(path)
    try:
        unwrap(model).load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path} does not fit the model config: {' '.join(first[:3])[:300]}") from None


def load_model(folder: str | Path, kind: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from its folder alone, strictly. Returns it in eval mode on `device`."""
    kind, cfg = read_config(folder, kind)
    model = model_class(kind)(cfg)
    load_weights(model, folder)
    return model.to(device).eval()


def is_complete(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG_FILE).exists() and (folder / WEIGHTS_FILE).exists()


# ---------------------------------------------------------------- training state


def save_train_state(folder: str | Path, state: dict[str, Any]) -> None:
    atomic_write(Path(folder) / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load_train_state(folder: str | Path) -> dict[str, Any] | None:
    """The resumable state, unpickled with `weights_only=True`: run folders get shared and downloaded,
    and a full unpickle runs whatever code a crafted file names. The state holds only tensors, numbers,
    strings, None and containers of them, which the restricted unpickler allows."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # a plain pickle also warns about its protocol; the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # the restricted unpickler refused a global or an opcode: a file that wants to build arbitrary objects
        lines = [line.strip() for line in str(e).splitlines()]
        what = next((line for line in lines if "nsupported" in line), "a forbidden object")[:160]
        raise CheckpointError(
            f"{path} holds objects a training state never holds ({what}); refused to load it: delete it to restart"
        ) from None
    except Exception as e:  # torch raises several types for a truncated zip
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}); delete it to restart") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a training state ({type(state).__name__}); delete it to restart")
    return state

