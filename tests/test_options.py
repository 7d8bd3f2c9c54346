"""SampleOptions: the one home of every sampling default and check (vqdiff/options.py)."""

import pytest

from vqdiff.options import DEFAULTS, FIELDS, MAX_STEPS, MASK_SAMPLERS, READS, OptionError, SampleOptions


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"temperature": -0.5}, "temperature must be finite and >= 0 (0 = argmax)"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"steps": 0}, f"steps must be in [1, {MAX_STEPS}]"),
        ({"steps": MAX_STEPS + 1}, f"steps must be in [1, {MAX_STEPS}]"),
        ({"top_k": 0}, "top-k must be >= 1"),
        ({"top_p": 0.0}, "top-p must be in (0, 1]"),
        ({"top_p": 1.5}, "top-p must be in (0, 1]"),
        ({"cfg": -1.0}, "cfg must be finite and >= 0"),
        ({"sampler": "greedy"}, "unknown sampler 'greedy'"),
        ({"sampler": "ancestral", "eta": 1.5}, "eta must be in [0, 1]"),
        ({"eta": 0.5}, "eta (remasking) is for the ancestral sampler"),
        ({"choice_temperature": float("inf")}, "choice temperature must be finite"),
        ({"sample_schedule": "exp"}, "unknown sample schedule 'exp'"),
        ({"cfg_schedule": "cosine"}, "unknown cfg schedule 'cosine'; choose constant or linear"),
    ],
)
def test_bad_values_are_refused_in_one_line(changes, needle):
    with pytest.raises(OptionError) as e:
        SampleOptions(**changes)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)  # library callers may catch ValueError


def test_defaults_and_off():
    assert DEFAULTS.sampler == MASK_SAMPLERS[0] and DEFAULTS.temperature == 1.0 and DEFAULTS.steps == 8
    assert (DEFAULTS.top_k, DEFAULTS.top_p, DEFAULTS.sample_schedule) == (None, None, None)  # off is None
    assert SampleOptions(temperature=0).temperature == 0  # argmax, not an error
    assert SampleOptions(cfg=0).cfg == 0  # the unconditional model


def test_replace_checks_and_without_changes_is_the_same_object():
    o = SampleOptions(top_k=5, sampler="halton", temperature=0.5)
    assert o.replace() is o
    assert o.replace(top_k=None).top_k is None and o.top_k == 5  # a new object; o is frozen
    with pytest.raises(OptionError, match="top-k"):
        o.replace(top_k=0)


def test_reads_names_fields_of_the_options():
    assert set(READS["diffusion"]) == set(FIELDS)  # the diffusion generator reads every field
    assert set(READS["ar"]) == {"temperature", "top_k", "top_p", "cfg", "cfg_schedule"}  # no steps, no sampler


def test_a_recipe_toml_written_before_off_was_none_reads_as_off(tmp_path):
    from recipes.recipe import load_recipe

    old = load_recipe("shapes").to_toml()
    old = old.replace("[evaluate]\n", "[evaluate]\ntop_k = 0\ntop_p = 1.0\n").replace("[diffusion]\n", '[diffusion]\nsample_schedule = ""\n')
    path = tmp_path / "recipe.toml"
    path.write_text(old)
    r = load_recipe(str(path))
    assert (r["evaluate"]["top_k"], r["evaluate"]["top_p"], r["diffusion"]["sample_schedule"]) == (None, None, None)
    assert "top_k" not in r.to_toml() and "sample_schedule" not in r.to_toml()


def test_the_cfg_schedule_moves_the_guidance_scale_from_none_to_cfg():
    assert DEFAULTS.cfg_schedule is None and DEFAULTS.replace(cfg=3.0).guidance_at(0.0) == 3.0  # constant
    assert SampleOptions(cfg=3.0, cfg_schedule="constant").cfg_schedule is None  # one spelling of the constant scale
    linear = SampleOptions(cfg=4.0, cfg_schedule="linear")
    assert [linear.guidance_at(p) for p in (0.0, 0.5, 1.0, 2.0)] == [1.0, 2.5, 4.0, 4.0]
    assert "cfg_schedule" not in DEFAULTS.record() and linear.record()["cfg_schedule"] == "linear"  # old folders keep their key
