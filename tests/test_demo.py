"""`vqdiff demo` without a browser: the missing-extra line, and the page's functions on a tiny run."""

import os
import sys

import pytest
from demo_helpers import build_tiny_run
from helpers import invoke


def test_demo_without_gradio_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    result = invoke("demo", tmp_path)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and 'pip install -e ".[demo]"' in lines[0], result.output


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[demo]")')
    from recipes.demo_app import Demo

    return Demo(build_tiny_run(tmp_path_factory.mktemp("demo") / "shapes"), "cpu")


def test_diffusion_streams_every_step(demo):
    from recipes.demo_app import grid_pixels

    frames = list(demo.sample("diffusion", 4, 1.0, 3, "random", 1.0, 0, "maskgit"))
    assert len(frames) == 3 + 1  # one picture per step, then the result
    assert [f[2] for f in frames[:3]] == [f"diffusion: step {i}/3..." for i in (1, 2, 3)]
    grid, trajectory, status = frames[-1]
    assert grid.size == grid_pixels(4, 32) and trajectory.size == grid_pixels(3, 32, nrow=3)
    assert "4 images from diffusion" in status


def test_bad_settings_and_ar_regions_are_messages(demo):
    from PIL import Image

    (*_, status), = demo.sample("diffusion", 4, -1.0, 3, "random", 1.0, 0, "maskgit")
    assert status.startswith("**error:** temperature must be finite and >= 0 (0 = argmax)"), status
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    region = ("inpaint", 0.25, 0.25, 0.75, 0.75, "bottom", 0.25)
    settings = (1.0, 2, "random", 1.0, 0, "maskgit")
    *_, (picture, status) = demo.edit(image, *region, "ar", *settings)
    assert status.startswith("**error:**") and "raster" in status, status
    *_, (picture, status) = demo.edit(image, "outpaint", *region[1:], "ar", *settings)  # the bottom strip: a suffix
    assert status.startswith("outpaint with ar"), status
    assert picture.size == (3 * 34 * 4 + 8, 36 * 4)
