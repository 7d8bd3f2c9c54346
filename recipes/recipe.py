"""Recipes: TOML files that say how to train and evaluate everything for one dataset and scale.

A recipe has the sections `data`, `tokenizer`, `ar`, `diffusion` and `evaluate`. A model
section takes the fields of that model's config dataclass plus the fields of `TrainConfig`
(`steps`, `batch_size`, `lr`, ...). Every key is checked: an unknown key, in the file or in
`--set section.key=value`, is an error that names it. The resolved recipe (defaults filled in)
is written to `RUN/recipe.toml`.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vqdiff.checkpoint import ConfigError, config_defaults, config_from_dict
from vqdiff.data import DATASETS
from vqdiff.options import DEFAULTS, READS, OptionError, SampleOptions
from vqdiff.registry import config_class, model_class
from vqdiff.train import TrainConfig

RECIPE_DIR = Path(__file__).parent
GENERATORS = ("ar", "diffusion")


class RecipeError(Exception):
    """A bad recipe, --set or generator name; the message is one line."""


@dataclass(frozen=True)
class DataSection:
    """[data]: which images, at which size."""

    dataset: str = "mnist"  # mnist | fashion-mnist | cifar10 | folder | shapes
    image_size: int = 32
    path: str = ""  # the image folder, for dataset = "folder"
    limit_train: int = 0  # > 0: use only the first N training images
    limit_test: int = 0
    seed: int = 0  # for `shapes`
    flip: bool = False  # the generators also train on every train image mirrored left-right (its own token
    # grid: a mirrored image's ids are not its ids mirrored), which doubles RUN/tokens/train; off for digits

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        for key in ("limit_train", "limit_test"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = all images), got {getattr(self, key)}")
        if self.dataset == "folder" and not self.path:
            raise ValueError('dataset = "folder" needs path = the image folder')


@dataclass(frozen=True)
class EvaluateSection:
    """[evaluate]: what `vqdiff evaluate` samples and measures (EvalOptions adds the CLI-only options)."""

    generators: tuple[str, ...] = ("ar", "diffusion")
    num: int = 1000  # samples per generator and setting
    steps: tuple[int, ...] = (4, 8, 16)  # diffusion sampling steps (AR takes one pass per token)
    temperatures: tuple[float, ...] = ()  # every setting at each of these (0 = argmax); empty = each generator's own ([ar] and [diffusion] temperature)
    cfg: float | None = None  # every setting at this guidance scale (1 = none); leave out = each generator's own ([ar] and [diffusion] cfg)
    top_k: int | None = DEFAULTS.top_k  # sample from the k most likely tokens, both generators (leave out = off)
    top_p: float | None = DEFAULTS.top_p  # nucleus sampling, both generators (leave out = off)
    extractor: str = "auto"  # auto | classifier | inception
    batch_size: int = 100  # sampling batch size
    seed: int = 0
    gif_steps: int = 16  # steps of the diffusion trajectory GIF in the report
    classifier: str = "cnn3"  # the classifier extractor's recipe (evaluation.classifier.CLASSIFIERS): cnn3 | airbench
    classifier_steps: int = 0  # its training steps (0 = the recipe's own)
    curve_steps: int = 16  # diffusion sampling steps of the learning curves (evaluate --checkpoints)
    curve_num: int = 0  # samples per kept snapshot on the learning curves (0 = num)
    curve_extractor: str = ""  # the learning curves' extractor ("" = extractor), e.g. the cheap classifier
    samplers: tuple[str, ...] = ()  # diffusion samplers to compare (mask corruption); () = the diffusion section's `sampler`
    # the real images FID is measured against: the first N test images (leave out = the first `num`, as
    # before; 0 = the whole test split). Samples, reconstructions (rFID) and the floor's train images
    # number `num` whatever the reference size
    reference_num: int | None = None
    both_spaces: bool = True  # also FID in the other feature space (classifier or inception) where both can run
    inception_mode: str = "auto"  # how Inception computes: auto (the measured default) | fp32 | channels-last | bf16 | bf16-channels-last


@dataclass(frozen=True)
class GeneratorExtras:
    """Keys a generator section takes besides its model config and TrainConfig."""

    conditional: bool = True  # class-conditional (with CFG) when the dataset has labels
    # this generator's sampling defaults: vqdiff sample and edit start from them, and evaluate where
    # [evaluate] temperatures is empty and its cfg left out
    temperature: float = DEFAULTS.temperature  # 0 = argmax
    cfg: float = DEFAULTS.cfg  # classifier-free guidance scale of a class-conditional generator (1 = none)
    # how the scale moves over a generation: leave out (or "constant") for cfg throughout; "linear" rises
    # from 1 at the first token or step to cfg at the last (vqdiff.options.SampleOptions.guidance_at)
    cfg_schedule: str | None = DEFAULTS.cfg_schedule
    eval_grids: int = 2000  # test grids for bits per token after training (0 = all)


@dataclass(frozen=True)
class DiffusionExtras:
    """Sampling defaults of the diffusion section (not part of the model: a run can sample either way)."""

    sampler: str = DEFAULTS.sampler  # maskgit | ancestral | halton (mask corruption; see vqdiff.samplers)
    eta: float = DEFAULTS.eta  # ReMDM remasking strength for the ancestral sampler (0 = plain MDLM)
    choice_temperature: float = DEFAULTS.choice_temperature  # maskgit sampler: Gumbel noise on the confidences
    # the schedule the sampler's steps follow, a name in vqdiff.schedules (leave out = diffusion.schedule,
    # the trained one): how many tokens are still masked after each step (see vqdiff.samplers.time_grid)
    sample_schedule: str | None = DEFAULTS.sample_schedule


@dataclass(frozen=True)
class DecoderSection:
    """[decoder]: the decoder refinement after the tokenizer (steps = 0: none). The encoder and the
    codebook are frozen, so RUN/tokens and the generators stay valid, and the decoder learns MSE plus a
    perceptual term plus the PatchGAN hinge loss with the adaptive weight (VQGAN's losses, switched on
    after the reconstruction has settled, as the Stable Diffusion autoencoder fine-tunes its decoder).
    Each key below is the TokenizerConfig field of the same name; the rest of [decoder] is its TrainConfig."""

    steps: int = 0
    perceptual_net: str = "classifier"  # classifier (vqdiff.perceptual, trained first) | random (seeded, untrained)
    perceptual_weight: float = 0.1  # 0 = MSE and the adversarial loss alone
    perceptual_width: int = 32
    perceptual_steps: int = 600
    disc: bool = True
    disc_start: int = 0  # refinement steps before the adversarial loss switches on
    disc_weight: float = 0.1
    disc_width: int = 32
    disc_layers: int = 2
    lecam_weight: float = 0.0


REFINED_FIELDS = tuple(f.name for f in dataclasses.fields(DecoderSection) if f.name != "steps")


@dataclass(frozen=True)
class TokenizerExtras:
    """Keys the tokenizer section takes besides TokenizerConfig and TrainConfig."""

    kind: str = "vqvae"  # vqvae: trained here | diffusers: a pretrained diffusers VQModel, not trained
    pretrained: str = ""  # kind = "diffusers": a local folder (save_pretrained) or a Hub id (online)

    def __post_init__(self) -> None:
        if self.kind not in ("vqvae", "diffusers"):
            raise ValueError(f"kind must be vqvae or diffusers, got {self.kind!r}")
        if self.kind == "diffusers" and not self.pretrained:
            raise ValueError('kind = "diffusers" needs pretrained = a folder written by VQModel.save_pretrained, or a Hub id')


# the schema of each section: its dataclasses, whose fields and defaults are the section's keys
SCHEMAS: dict[str, tuple[type, ...]] = {
    "data": (DataSection,),
    "tokenizer": (TokenizerExtras, TrainConfig),  # + TokenizerConfig, from the model registry
    "decoder": (DecoderSection, TrainConfig),
    "ar": (GeneratorExtras, TrainConfig),  # + ARConfig
    "diffusion": (DiffusionExtras, GeneratorExtras, TrainConfig),  # + DiffusionConfig
    "evaluate": (EvaluateSection,),
}
# filled in from the tokenizer and the dataset, not from the recipe (the recipe may state them; they are checked)
DERIVED = {"tokenizer": ("channels", "image_size"), "ar": ("codebook_size", "grid_h", "grid_w", "num_classes")}
DERIVED["diffusion"] = DERIVED["ar"]


def section_defaults(section: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if section in DERIVED:  # a model section: its config's fields first, as recipe.toml has always listed them
        out = {k: v for k, v in config_defaults(config_class(section)).items() if k not in DERIVED[section]}
    for schema in SCHEMAS[section][::-1]:
        out.update(config_defaults(schema))
    # a section holds what TOML gives back (lists), so that a recipe equals its own recipe.toml read again
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


SECTIONS = ("data", "tokenizer", "decoder", "ar", "diffusion", "evaluate")
# "off" has one spelling, None (the key left out); these values also read as off, so that a
# recipe.toml that spells off as 0, 1.0 or "" still loads and means the same
OFF_BEFORE_NONE = {("evaluate", "top_k"): 0, ("evaluate", "top_p"): 1.0, ("diffusion", "sample_schedule"): ""}


def _allowed(section: str) -> set[str]:
    allowed = set(section_defaults(section))
    if section in DERIVED:
        allowed |= set(DERIVED[section])
    return allowed


@dataclass
class Recipe:
    name: str
    sections: dict[str, dict[str, Any]]  # every section, defaults filled in
    source: str  # the file it came from

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    # ------------------------------------------------------------------ configs

    def train_config(self, section: str) -> TrainConfig:
        return self.build(TrainConfig, section)

    def build(self, cls: type, section: str, **extra: Any) -> Any:
        """Section `section` as the dataclass `cls` (its fields only), plus `extra` values."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in self.sections[section].items() if k in fields}
        try:
            return config_from_dict(cls, {**values, **extra})
        except ConfigError as e:
            raise RecipeError(f"[{section}] {e}") from None

    @property
    def data(self) -> DataSection:
        return self.build(DataSection, "data")

    def model_config(self, section: str, **derived: Any) -> Any:
        """The model's config dataclass from the section, with derived fields (e.g. `codebook_size`).

        A derived field the recipe states must agree with the derived value.
        """
        self.check_derived(section, **derived)
        return self.build(config_class(section), section, **derived)

    def refined_config(self, base: Any) -> Any:
        """The TokenizerConfig of the decoder refinement of a tokenizer whose config is `base`: the same
        model with frozen codes and the [decoder] section's losses."""
        d = self.sections["decoder"]
        try:
            return dataclasses.replace(base, frozen_codes=True, **{k: d[k] for k in REFINED_FIELDS})
        except (TypeError, ValueError) as e:
            raise RecipeError(f"[decoder] {e}") from None

    def check_derived(self, section: str, **derived: Any) -> None:
        """Refuse a derived field (codebook_size, grid_h, ...) that the recipe states with another value."""
        for k, v in derived.items():
            stated = self.sections[section].get(k)
            if stated is not None and stated != v:
                raise RecipeError(f"{section}.{k} = {stated} does not match the {_derived_from(k)} ({v})")

    def to_toml(self) -> str:
        lines = [f"name = {_toml_value(self.name)}", ""]
        for section in SECTIONS:
            lines.append(f"[{section}]")
            # TOML has no None: an option that is off (None) is left out, as a recipe file leaves it out
            lines += [f"{k} = {_toml_value(v)}" for k, v in self.sections[section].items() if v is not None]
            lines.append("")
        return "\n".join(lines)


def _derived_from(key: str) -> str:
    return {"codebook_size": "tokenizer's codebook", "grid_h": "tokenizer's grid", "grid_w": "tokenizer's grid"}.get(
        key, "dataset"
    )


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise RecipeError(f"cannot write {v!r} to TOML")


def bundled() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def find_recipe(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file {p} does not exist")
        return p
    bundled_path = RECIPE_DIR / f"{name_or_path}.toml"
    if not bundled_path.is_file():
        raise RecipeError(f"unknown recipe {name_or_path!r}; bundled: {', '.join(bundled())}, or give a path to a .toml")
    return bundled_path


def parse_set(item: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value); the value is read as TOML, else as a string."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    if "." not in key:
        raise RecipeError(f"--set {item!r}: the key needs its section, e.g. tokenizer.steps=100")
    section, name = key.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, name, value


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = find_recipe(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    return resolve(raw, source=str(path), default_name=path.stem, overrides=overrides)


def resolve(raw: dict[str, Any], *, source: str, default_name: str, overrides=()) -> Recipe:
    raw = copy.deepcopy(raw)
    name = raw.pop("name", default_name)
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{source}: name must be a non-empty string")
    for key in raw:
        if key not in SECTIONS:
            raise RecipeError(f"{source}: unknown section or key {key!r}; sections are {', '.join(SECTIONS)}")
    for item in overrides:
        section, key, value = parse_set(item)
        if section not in SECTIONS:
            raise RecipeError(f"--set {item!r}: unknown section {section!r}; sections are {', '.join(SECTIONS)}")
        raw.setdefault(section, {})[key] = value
    sections = {}
    for section in SECTIONS:
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise RecipeError(f"{source}: [{section}] must be a table")
        unknown = sorted(set(given) - _allowed(section))
        if unknown:
            raise RecipeError(f"unknown key {section}.{unknown[0]} in {source} or --set")
        merged = section_defaults(section)
        for k, v in given.items():
            if OFF_BEFORE_NONE.get((section, k), ...) == v:
                v = None  # another spelling of off (OFF_BEFORE_NONE)
            default = merged.get(k) if merged.get(k) is not None else _off_type_default(section, k)
            if default is not None and v is not None and not _same_type(default, v):
                raise RecipeError(f"{section}.{k} = {v!r}: expected a {type(default).__name__}")
            merged[k] = v
        sections[section] = merged
    recipe = Recipe(name=name, sections=sections, source=source)
    validate(recipe)
    return recipe


def validate(recipe: Recipe) -> None:
    """Check every section before any stage runs: a bad key of a later stage (e.g. `diffusion.corruption`)
    must not wait until the stages before it have trained (minutes on shapes, an hour on mnist)."""
    recipe.data  # DataSection checks itself
    recipe.build(TokenizerExtras, "tokenizer")
    recipe.build(EvaluateSection, "evaluate")
    for section in ("tokenizer", "ar", "diffusion"):
        recipe.train_config(section)
    if recipe["decoder"]["steps"] > 0:
        recipe.train_config("decoder")
    _check_sampling(recipe)
    d, tok = recipe["data"], recipe["tokenizer"]
    # derived fields are only known once the data is loaded and the tokenizer trained; stand-ins that
    # are valid whenever the real values are (the real ones are checked against a stated value later)
    channels = tok.get("channels") or (3 if d["dataset"] == "cifar10" else 1)
    tcfg = recipe.model_config("tokenizer", channels=channels, image_size=tok.get("image_size") or d["image_size"])
    if recipe["decoder"]["steps"] > 0:
        recipe.refined_config(tcfg)
    for section in ("ar", "diffusion"):
        s = recipe[section]
        stand_ins = {
            "codebook_size": tcfg.codebook_size,
            "grid_h": tcfg.grid[0],
            "grid_w": tcfg.grid[1],
            "num_classes": 10 if s["conditional"] else 0,
        }
        recipe.model_config(section, **{k: s[k] if s.get(k) is not None else v for k, v in stand_ins.items()})


def _off_type_default(section: str, key: str) -> Any:
    """For a key whose default is None (off): a zero of the type it takes when set (`float | None` -> 0.0), so
    that a value of another type is refused like any other key's; None where the schema does not say."""
    for cls in SCHEMAS.get(section, ()):
        hint = typing.get_type_hints(cls).get(key)
        if hint is not None:
            types = [t for t in typing.get_args(hint) if t is not type(None) and isinstance(t, type)]
            return types[0]() if types else None
    return None


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


# ------------------------------------------------------------------ sampling options: the one resolver


def check_generator(kind: str) -> type:
    """The model class of generator `kind`; a RecipeError names the choices."""
    if kind not in GENERATORS:
        raise RecipeError(f"unknown generator {kind!r}; choose ar or diffusion")
    return model_class(kind)


def resolve_options(recipe: Recipe | None, kind: str, **given: Any) -> SampleOptions:
    """The SampleOptions of generator `kind`, built once, here, and passed down whole.

    A value `given` (by its SampleOptions name; None = not given) wins over the recipe's, which
    wins over the default (vqdiff.options.DEFAULTS). The recipe (None: a run folder without one)
    gives the generator's temperature, cfg and cfg_schedule, the diffusion's sampler, its sample_schedule, its eta when the sampler is the ancestral
    one (remasking belongs to that sampler alone) and its choice_temperature when it is maskgit. The fields the generator does not
    read (vqdiff.options.READS) stay at their defaults, given or not. A value out of range is an
    OptionError that names it.
    """
    check_generator(kind)
    given = {k: v for k, v in given.items() if v is not None}
    values: dict[str, Any] = {}
    if recipe is not None:
        d = recipe["diffusion"]
        values = {"sampler": given.get("sampler", d["sampler"]), "sample_schedule": d["sample_schedule"]}
        if values["sampler"] == "ancestral":
            values["eta"] = d["eta"]
        if values["sampler"] == "maskgit":
            values["choice_temperature"] = d["choice_temperature"]
        values["temperature"], values["cfg"] = recipe[kind]["temperature"], recipe[kind]["cfg"]
        values["cfg_schedule"] = recipe[kind]["cfg_schedule"]
    values.update(given)
    return SampleOptions(**{k: v for k, v in values.items() if k in READS[kind]})


def _check_sampling(recipe: Recipe) -> None:
    """Every sampling setting the recipe names ([diffusion] sampler, eta and sample_schedule, each of
    [evaluate] samplers and temperatures, its cfg, top_k and top_p), through the one resolver, so that
    a bad one is refused before any stage runs, with the message the CLI would give."""
    d, e = recipe["diffusion"], recipe["evaluate"]
    try:
        for sampler in dict.fromkeys([d["sampler"], *e["samplers"], "ancestral", "maskgit"]):  # eta and choice_temperature are checked too
            for temperature in e["temperatures"] or [None]:  # None: the generator's own
                resolve_options(recipe, "diffusion", sampler=sampler, temperature=temperature, cfg=e["cfg"], top_k=e["top_k"], top_p=e["top_p"])
        resolve_options(recipe, "ar")  # its temperature and cfg
    except OptionError as err:
        raise RecipeError(f"[ar], [diffusion] or [evaluate]: {err}") from None
