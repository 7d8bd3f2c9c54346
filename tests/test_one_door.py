"""One door for sampling: SampleOptions is resolved once (the command line over the recipe over the
defaults) and that same object reaches the sampler; a recipe.toml that cannot be parsed is refused."""

import shutil

import pytest
import torch
from demo_helpers import build_tiny_run
from helpers import TINY, invoke, ok, one_line_error

import recipes.commands.sample as sample_command
import vqdiff.samplers as samplers
from recipes.recipe import RecipeError, load_recipe, resolve_options
from vqdiff.ar import ARTransformer
from vqdiff.options import DEFAULTS, FIELDS, READS, OptionError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("door") / "shapes")


@pytest.fixture
def resolved(monkeypatch):
    """Every SampleOptions the `vqdiff sample` command resolves, in order."""
    built = []

    def spy(*args, **kw):
        built.append(resolve_options(*args, **kw))
        return built[-1]

    monkeypatch.setattr(sample_command, "resolve_options", spy)
    return built


# ------------------------------------------------------------------ the same object, from the CLI to the sampler


def test_temperature_reaches_the_diffusion_sampler_as_the_resolved_object(run, tmp_path, monkeypatch, resolved):
    seen = []
    for name, sampler in list(samplers.MASK_SAMPLERS.items()):
        def spy(*args, options, _sampler=sampler, **kw):
            seen.append(options)
            return _sampler(*args, options=options, **kw)

        monkeypatch.setitem(samplers.MASK_SAMPLERS, name, spy)
    ok(invoke("sample", run, "-n", 3, "--batch-size", 2, "--steps", 2, "--temperature", 0.7, "--out", tmp_path / "d"))
    assert len(resolved) == 1 and resolved[0].temperature == 0.7 and resolved[0].steps == 2
    assert len(seen) == 2 and all(o is resolved[0] for o in seen)  # one call per batch, the resolver's own object


def test_temperature_reaches_the_ar_sampling_loop_as_the_resolved_object(run, tmp_path, monkeypatch, resolved):
    seen, sample = [], ARTransformer.sample

    def spy(self, n, options, **kw):
        seen.append(options)
        return sample(self, n, options, **kw)

    monkeypatch.setattr(ARTransformer, "sample", spy)
    ok(invoke("sample", run, "-g", "ar", "-n", 3, "--batch-size", 2, "--temperature", 0.7, "--out", tmp_path / "a"))
    assert len(resolved) == 1 and resolved[0].temperature == 0.7
    assert len(seen) == 2 and all(o is resolved[0] for o in seen)


# ------------------------------------------------------------------ the resolver


def test_the_command_line_wins_over_the_recipe_which_wins_over_the_defaults():
    recipe = load_recipe("shapes", ["diffusion.sampler=ancestral", "diffusion.eta=0.3", "diffusion.sample_schedule=cubic"])
    o = resolve_options(recipe, "diffusion")
    assert (o.sampler, o.eta, o.sample_schedule, o.temperature) == ("ancestral", 0.3, "cubic", DEFAULTS.temperature)
    o = resolve_options(recipe, "diffusion", eta=0.5, temperature=0.7, sample_schedule="linear")
    assert (o.sampler, o.eta, o.sample_schedule, o.temperature) == ("ancestral", 0.5, "linear", 0.7)
    o = resolve_options(recipe, "diffusion", sampler="halton", temperature=None)  # None: not given
    assert (o.sampler, o.eta, o.sample_schedule, o.temperature) == ("halton", 0.0, "cubic", DEFAULTS.temperature)  # eta is the ancestral sampler's
    assert resolve_options(None, "diffusion") == DEFAULTS  # a run folder without a recipe: the defaults
    assert resolve_options(None, "diffusion", steps=4, cfg=2.0) == DEFAULTS.replace(steps=4, cfg=2.0)


def test_the_fields_a_generator_does_not_read_stay_at_their_defaults():
    recipe = load_recipe("shapes", ["diffusion.sampler=ancestral", "diffusion.eta=0.3", "diffusion.sample_schedule=cubic"])
    o = resolve_options(recipe, "ar", temperature=0.5, top_k=3, cfg=2.0, steps=4, sampler="halton", eta=0.9, choice_temperature=1.0)
    assert o == DEFAULTS.replace(temperature=0.5, top_k=3, cfg=2.0)
    assert all(getattr(o, f) == getattr(DEFAULTS, f) for f in FIELDS if f not in READS["ar"])


def test_evaluate_takes_the_cli_sampling_options_through_the_resolver_and_names_them_once():
    from recipes.evaluate import EvalOptions, _settings
    from recipes.sampling import SampleSpec

    recipe = load_recipe("shapes", [*TINY, "diffusion.sample_schedule=cubic", "evaluate.samplers=['maskgit','ancestral']"])
    opts = EvalOptions.from_recipe(recipe, eta=0.4, sample_schedule=None, num=4)  # None: not given
    assert opts.given == {"eta": 0.4} and opts.num == 4
    rows = list(_settings(recipe, opts, "diffusion", "mask"))
    by_sampler = {row["sampler"]: (row, o) for row, o in rows}
    # the recipe's schedule reaches every setting and names its row; eta goes to the ancestral sampler alone
    assert {row["sample_schedule"] for row, _ in rows} == {"cubic"}
    assert by_sampler["maskgit"][1].eta == 0.0 and by_sampler["ancestral"][1].eta == 0.4
    spec = SampleSpec("diffusion", by_sampler["ancestral"][1])
    assert spec.folder_name(8).endswith("-ancestral-eta0.4-schedcubic") and spec.key()["sample_schedule"] == "cubic"
    opts = EvalOptions.from_recipe(recipe, sample_schedule="linear")
    assert {row["sample_schedule"] for row, _ in _settings(recipe, opts, "diffusion", "mask")} == {"linear"}
    assert all("sample_schedule" not in row for row, _ in _settings(recipe, opts, "ar", "mask"))  # AR reads no schedule
    assert "sample_schedule" not in SampleSpec("diffusion", DEFAULTS).key()  # unset: left out of sample.json


def test_the_choice_temperature_goes_from_the_recipe_or_the_cli_to_maskgit_alone_and_names_its_row():
    from recipes.evaluate import EvalOptions, _settings
    from recipes.report import setting
    from recipes.sampling import SampleSpec

    recipe = load_recipe("shapes", [*TINY, "diffusion.choice_temperature=2.0", "evaluate.samplers=['maskgit','ancestral']"])
    for opts, want in ((EvalOptions.from_recipe(recipe), 2.0), (EvalOptions.from_recipe(recipe, choice_temperature=1.0), 1.0)):
        by_sampler = {row["sampler"]: (row, o) for row, o in _settings(recipe, opts, "diffusion", "mask")}
        row, options = by_sampler["maskgit"]
        assert options.choice_temperature == want and row["choice_temperature"] == want
        assert setting(row) == f"diffusion maskgit t=1 s={row['steps']} ct={want:g}"
        assert SampleSpec("diffusion", options).folder_name(row["steps"]).endswith(f"-ct{want:g}")
        row, options = by_sampler["ancestral"]  # not its option: the default, and the row does not name it
        assert options.choice_temperature == DEFAULTS.choice_temperature and "choice_temperature" not in row
    default = load_recipe("shapes", [*TINY, "evaluate.samplers=['maskgit']"])
    row, _ = next(_settings(default, EvalOptions.from_recipe(default), "diffusion", "mask"))
    assert "choice_temperature" not in row  # MaskGIT's 4.5: the row and the folder stay as they were
    with pytest.raises(RecipeError, match="choice temperature must be finite"):
        load_recipe("shapes", [*TINY, "diffusion.choice_temperature=-1.0"])


def test_each_generator_samples_at_its_own_temperature_unless_evaluate_names_one():
    from recipes.evaluate import EvalOptions, _settings
    from recipes.report import setting

    recipe = load_recipe("shapes", [*TINY, "ar.temperature=0.9", "evaluate.temperatures=[]"])
    assert resolve_options(recipe, "ar").temperature == 0.9 and resolve_options(recipe, "diffusion").temperature == 1.0
    assert resolve_options(recipe, "ar", temperature=0.7).temperature == 0.7  # the command line wins
    own = EvalOptions.from_recipe(recipe)
    rows = {g: [row for row, _ in _settings(recipe, own, g, "mask")] for g in ("ar", "diffusion")}
    assert [r["temperature"] for r in rows["ar"]] == [0.9] and setting(rows["ar"][0]) == "ar t=0.9"
    assert {r["temperature"] for r in rows["diffusion"]} == {1.0}
    named = EvalOptions.from_recipe(recipe, temperatures=(0.8, 1.0))  # named: every generator at each of them
    for g in ("ar", "diffusion"):
        assert sorted({row["temperature"] for row, _ in _settings(recipe, named, g, "mask")}) == [0.8, 1.0]
    with pytest.raises(RecipeError, match=r"\[ar\].*temperature must be finite"):
        load_recipe("shapes", [*TINY, "ar.temperature=-1.0"])


def test_each_generator_is_guided_at_its_own_scale_unless_evaluate_names_one():
    from recipes.evaluate import EvalOptions, _settings
    from recipes.report import _guidance, _table_lines

    recipe = load_recipe("shapes", [*TINY, "ar.cfg=3.0", "diffusion.cfg=2.0"])
    assert resolve_options(recipe, "ar").cfg == 3.0 and resolve_options(recipe, "diffusion").cfg == 2.0
    assert resolve_options(recipe, "diffusion", cfg=1.5).cfg == 1.5  # the command line wins
    own = EvalOptions.from_recipe(recipe)
    rows = [row for g in ("ar", "diffusion") for row, _ in _settings(recipe, own, g, "mask")]
    assert own.cfg is None and {(r["generator"], r["cfg"]) for r in rows} == {("ar", 3.0), ("diffusion", 2.0)}
    assert _guidance(own.cfg, rows) == "ar 3, diffusion 2"
    report = {"cfg": None, "results": [{**r, "forward_passes": 1, "fid": 1.0, "images_per_second": 1.0} for r in rows]}
    assert [line.split(" | ")[3] for line in _table_lines(report)[2:]] == ["3"] + ["2"] * (len(rows) - 1)  # the CFG column
    named = EvalOptions.from_recipe(recipe, cfg=4.0)  # named: every generator at it
    assert {row["cfg"] for g in ("ar", "diffusion") for row, _ in _settings(recipe, named, g, "mask")} == {4.0}
    with pytest.raises(RecipeError, match=r"\[ar\].*cfg must be finite"):
        load_recipe("shapes", [*TINY, "ar.cfg=-1.0"])


def test_the_cfg_schedule_goes_from_the_recipe_or_the_cli_to_each_generators_guidance(monkeypatch):
    """A linear cfg schedule: the first position (AR) or step (diffusion) is mixed at no guidance, the last at cfg."""
    import vqdiff.ar as ar_mod
    import vqdiff.diffusion as diffusion_mod
    from recipes.evaluate import EvalOptions, _settings
    from recipes.report import setting
    from recipes.sampling import SampleSpec
    from vqdiff.ar import ARConfig
    from vqdiff.diffusion import DiffusionConfig, DiffusionTransformer

    recipe = load_recipe("shapes", [*TINY, "ar.cfg=3.0", "ar.cfg_schedule='linear'"])
    o = resolve_options(recipe, "ar")
    assert o.cfg_schedule == "linear" and resolve_options(recipe, "diffusion").cfg_schedule is None  # each generator's own
    assert resolve_options(recipe, "ar", cfg_schedule="constant").cfg_schedule is None  # the command line wins
    row = next(row for row, _ in _settings(recipe, EvalOptions.from_recipe(recipe), "ar", "mask"))
    assert row["cfg_schedule"] == "linear" and setting(row).endswith(" cfg linear")
    assert SampleSpec("ar", o).folder_name(16).endswith("-g3-cfglinear") and "cfg" not in SampleSpec("ar", o.replace(cfg_schedule=None)).folder_name(16)
    with pytest.raises(RecipeError, match="unknown cfg schedule 'x'"):
        load_recipe("shapes", [*TINY, "diffusion.cfg_schedule='x'"])

    scales = []
    for module in (ar_mod, diffusion_mod):
        mix = module.cfg_mix
        monkeypatch.setattr(module, "cfg_mix", lambda logits, cfg, _mix=mix: scales.append(cfg) or _mix(logits, cfg))
    kw = dict(codebook_size=8, grid_h=4, grid_w=4, num_classes=2, dim=16, depth=1, heads=2)
    with torch.no_grad():
        ARTransformer(ARConfig(**kw)).sample(2, o, labels=0)
        assert scales[0] == 1.0 and scales[-1] == 3.0 and scales == sorted(scales) and len(scales) == 16  # one per position
        scales.clear()
        DiffusionTransformer(DiffusionConfig(**kw)).sample(2, o.replace(steps=4), labels=0)
        assert scales == [1.0 + 2.0 * p for p in (0.0, 0.25, 0.5, 0.75)]  # at 1 - t of each step's time t


@pytest.mark.parametrize("key", ["evaluate.cfg", "evaluate.top_k", "evaluate.top_p", "evaluate.reference_num", "ar.cfg", "ar.temperature"])
def test_a_value_of_the_wrong_type_is_refused_in_one_line_also_where_the_default_is_off(key):
    with pytest.raises(RecipeError, match=rf"^{key} = 'x': expected a (float|int)$"):
        load_recipe("shapes", [*TINY, f"{key}='x'"])


def test_the_resolver_refuses_in_one_line():
    with pytest.raises(RecipeError, match="unknown generator 'gan'"):
        resolve_options(None, "gan")
    with pytest.raises(OptionError, match="temperature must be finite"):
        resolve_options(None, "ar", temperature=-1.0)
    with pytest.raises(OptionError, match="eta"):
        resolve_options(None, "diffusion", eta=0.5)  # remasking without the ancestral sampler
    with pytest.raises(RecipeError, match="unknown sampler 'x'"):
        load_recipe("shapes", [*TINY, "evaluate.samplers=['x']"])  # the recipe's settings go through it too


# ------------------------------------------------------------------ a recipe.toml that cannot be parsed


@pytest.fixture(scope="module")
def broken(run, tmp_path_factory):
    """A copy of the tiny run whose recipe.toml is `[[[`, and one image to edit."""
    from PIL import Image

    path = tmp_path_factory.mktemp("broken") / "run"
    shutil.copytree(run, path)
    (path / "recipe.toml").write_text("[[[")
    Image.fromarray(torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()).save(path.parent / "in.png")
    return path


@pytest.mark.parametrize(
    "command",
    [["sample", "--generator", "ar"], ["sample"], ["evaluate"], ["edit", "IMAGE", "--region", "0,0,8,8"], ["demo"]],
)
def test_an_unparsable_recipe_toml_is_refused_in_one_line_that_names_it(broken, command, monkeypatch):
    if command[0] == "demo":
        gradio = pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[demo]")')

        def launched(*args, **kw):
            raise AssertionError("the demo started serving a run whose recipe.toml cannot be parsed")

        monkeypatch.setattr(gradio.Blocks, "launch", launched)
    args = [str(broken.parent / "in.png") if a == "IMAGE" else a for a in command[1:]]
    one_line_error(invoke(command[0], broken, *args), str(broken / "recipe.toml"), "not valid TOML")
