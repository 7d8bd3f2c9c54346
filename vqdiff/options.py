"""`SampleOptions`: the one home of every sampling default and of its check.

One object travels whole from where the options enter to the sampler: the recipes resolve it once
(`recipes.recipe.resolve_options`: the command line over the recipe over `DEFAULTS`), a notebook
changes `DEFAULTS` with `replace`, and `model.sample(n, options)` reads the fields it needs (`READS`)
without rebuilding it. So a default is written once and a bad value is refused with the same
one-line message everywhere.

- `temperature` >= 0 and finite; 0 is argmax (greedy) for both generators.
- `steps`: diffusion forward passes, 1 to MAX_STEPS; the next-token generator takes one per token.
- `top_k`, `top_p`, `sample_schedule`: None is off (in a recipe TOML, which has no None: leave the key out).
- `cfg`: classifier-free guidance scale, >= 0; 1 is no guidance, 0 the unconditional model.
- `cfg_schedule`: how the scale moves over the generation (None: `cfg` at every token or step; "linear":
  from 1 at the first to `cfg` at the last, `guidance_at`).
- `sampler`, `eta`, `choice_temperature`: how the `mask` corruption reveals tokens (vqdiff.samplers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from vqdiff.schedules import SCHEDULES

MASK_SAMPLERS = ("maskgit", "ancestral", "halton")  # the first is the default
CFG_SCHEDULES = ("constant", "linear")  # "constant" is stored as None: folders and rows name only a schedule that moves
# one forward pass per step: the cost is linear in steps (--steps 100000 on 2 images ran for minutes)
MAX_STEPS = 1024


class OptionError(ValueError):
    """A sampling option out of its range; the message is one line."""


@dataclass(frozen=True)
class SampleOptions:
    temperature: float = 1.0  # >= 0; 0 = argmax
    steps: int = 8  # diffusion forward passes
    top_k: int | None = None  # keep the k most likely ids (None = off)
    top_p: float | None = None  # nucleus sampling (None = off)
    cfg: float = 1.0  # classifier-free guidance scale (1 = none)
    cfg_schedule: str | None = None  # None (or "constant"): cfg throughout | linear: from 1 at the start to cfg at the end
    sampler: str = MASK_SAMPLERS[0]  # mask corruption: maskgit | ancestral | halton
    eta: float = 0.0  # ancestral sampler: ReMDM remasking in [0, 1] (0 = plain MDLM)
    choice_temperature: float = 4.5  # maskgit: Gumbel noise on the confidences (MaskGIT's 4.5)
    sample_schedule: str | None = None  # the schedule the steps follow (None = the trained one)

    def __post_init__(self) -> None:
        if self.cfg_schedule == "constant":  # the one spelling of the constant scale is None
            object.__setattr__(self, "cfg_schedule", None)
        check(self)

    def replace(self, **changes: Any) -> "SampleOptions":
        """These options with `changes` (checked again); without changes, this same object."""
        return dataclasses.replace(self, **changes) if changes else self

    def record(self) -> dict[str, Any]:
        """Every field, as a sample.json records them; a field of NAMED_WHEN_SET only while it is set,
        so that a folder sampled without it keeps the key it was written with and is reused."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k not in NAMED_WHEN_SET}

    def guidance_at(self, progress: float) -> float:
        """The guidance scale at `progress` in [0, 1] of a generation (AR: position i of n at i / (n - 1);
        diffusion: a step at the model's time t at 1 - t). Linear rises from no guidance (1) to `cfg`:
        the first tokens, which set the layout, keep the conditional model's diversity and the last get the
        full scale, as Muse (Chang et al. 2023) and MAR (Li et al. 2024) decode. On cifar10's AR it gave
        FID 54.21 against 57.70 for a constant 3 (docs/experiments.md, 2026-12-08)."""
        if self.cfg_schedule is None:
            return self.cfg
        return 1.0 + (self.cfg - 1.0) * min(max(progress, 0.0), 1.0)

    @property
    def names_choice_temperature(self) -> bool:
        """Whether a report row and a samples folder name the choice temperature: maskgit's, where it is not MaskGIT's 4.5."""
        return self.sampler == "maskgit" and self.choice_temperature != DEFAULTS.choice_temperature

    def named(self, kind: str) -> dict[str, Any]:
        """The fields of NAMED_WHEN_SET that generator `kind` reads and that are set: what a report row
        names beside its generator, sampler, temperature and steps; and maskgit's choice temperature
        where it is not MaskGIT's."""
        named = {k: getattr(self, k) for k in NAMED_WHEN_SET if k in READS[kind] and getattr(self, k) is not None}
        if kind == "diffusion" and self.names_choice_temperature:
            named["choice_temperature"] = self.choice_temperature
        return named

    def diffusion_tags(self) -> list[str]:
        """The samples folder name's parts for the diffusion's own options: each one that is not at its
        default (the default sampler and schedule add nothing, so a default folder is plain GEN-tT-sS)."""
        tags = []
        if self.sampler != DEFAULTS.sampler:
            tags.append(self.sampler)
        if self.eta:
            tags.append(f"eta{self.eta:g}")
        if self.sample_schedule is not None:
            tags.append(f"sched{self.sample_schedule}")
        if self.names_choice_temperature:
            tags.append(f"ct{self.choice_temperature:g}")
        return tags


def _finite(name: str, value: float, extra: str = "") -> None:
    if not (math.isfinite(value) and value >= 0):
        raise OptionError(f"{name} must be finite and >= 0{extra}, got {value}")


def check(o: SampleOptions) -> None:
    """Refuse an option out of range with one line that names it."""
    _finite("temperature", o.temperature, " (0 = argmax)")
    if o.steps is None or not 1 <= o.steps <= MAX_STEPS:
        raise OptionError(f"steps must be in [1, {MAX_STEPS}] (one forward pass each), got {o.steps}")
    if o.top_k is not None and o.top_k < 1:
        raise OptionError(f"top-k must be >= 1 (leave it out for no top-k), got {o.top_k}")
    if o.top_p is not None and not (math.isfinite(o.top_p) and 0 < o.top_p <= 1):
        raise OptionError(f"top-p must be in (0, 1] (leave it out for no nucleus), got {o.top_p}")
    _finite("cfg", o.cfg, " (1 = no guidance, 0 = the unconditional model)")
    if o.cfg_schedule is not None and o.cfg_schedule not in CFG_SCHEDULES:
        raise OptionError(f"unknown cfg schedule {o.cfg_schedule!r}; choose {' or '.join(CFG_SCHEDULES)}")
    if o.sampler not in MASK_SAMPLERS:
        raise OptionError(f"unknown sampler {o.sampler!r}; choose from {', '.join(MASK_SAMPLERS)}")
    if not 0 <= o.eta <= 1:
        raise OptionError(f"eta must be in [0, 1], got {o.eta}")
    if o.eta and o.sampler != "ancestral":
        raise OptionError("eta (remasking) is for the ancestral sampler")
    _finite("choice temperature", o.choice_temperature)
    if o.sample_schedule is not None and o.sample_schedule not in SCHEDULES:
        raise OptionError(f"unknown sample schedule {o.sample_schedule!r}; choose from {', '.join(SCHEDULES)}")


DEFAULTS = SampleOptions()
FIELDS = tuple(f.name for f in dataclasses.fields(SampleOptions))
# The fields each generator reads; the others mean nothing to it, and the recipes leave them at their
# defaults for it (so that two settings a generator cannot tell apart share one samples folder). The
# next-token generator takes one forward pass per token (no steps) and has no sampler to choose.
READS: dict[str, tuple[str, ...]] = {"ar": ("temperature", "top_k", "top_p", "cfg", "cfg_schedule"), "diffusion": FIELDS}
# Options that name a setting only when set (None = off): a report row and a sample.json carry them then
NAMED_WHEN_SET = ("sample_schedule", "cfg_schedule")
