import math

import pytest
import torch

from vqdiff.schedules import SCHEDULES, get_schedule


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_endpoints_and_monotone(name):
    s = get_schedule(name)
    assert s(0.0) == pytest.approx(0.0, abs=1e-12)
    assert s(1.0) == pytest.approx(1.0, abs=1e-12)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    g = s(t)
    assert g[0] == 0 and abs(g[-1] - 1) < 1e-12
    assert (g.diff() > 0).all(), "gamma must increase strictly on [0, 1]"
    assert ((g >= 0) & (g <= 1)).all()


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_derivative_matches_finite_difference(name):
    s = get_schedule(name)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    eps = 1e-6
    fd = (s(t + eps) - s(t - eps)) / (2 * eps)
    assert torch.allclose(s.dgamma(t), fd, atol=1e-6)
    # float in, float out, same value as the tensor path
    assert isinstance(s(0.3), float) and s(0.3) == pytest.approx(float(s(torch.tensor(0.3, dtype=torch.float64))))


def test_cosine_is_maskgit_cosine():
    # MaskGIT's mask ratio cos(pi r / 2) at decoding progress r = 1 - t
    s = get_schedule("cosine")
    for t in (0.1, 0.5, 0.9):
        assert s(t) == pytest.approx(math.cos(math.pi / 2 * (1 - t)))


def test_unknown_schedule_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        get_schedule("nope")


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_inverse_undoes_gamma(name):
    s = get_schedule(name)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.allclose(s.inverse(s(t)), t, atol=1e-7)
    assert s.inverse(0.0) == 0.0 and s.inverse(1.0) == pytest.approx(1.0, abs=1e-12)
    assert isinstance(s.inverse(0.3), float) and s(s.inverse(0.3)) == pytest.approx(0.3)


def test_time_grid_is_the_old_even_grid_on_the_trained_schedule_and_follows_another():
    from vqdiff.samplers import time_grid

    cos, lin = get_schedule("cosine"), get_schedule("linear")
    steps = 8
    for same in (None, cos):
        grid = time_grid(cos, steps, same)  # exactly the floats the samplers always used
        assert grid.steps == steps
        assert grid.times == tuple(1 - i / steps for i in range(steps + 1))
        assert grid.gammas == tuple(cos(1 - i / steps) for i in range(steps + 1))
    # a model trained on linear, decoded on cosine: the masked share follows cosine and the model is
    # asked at the time where its own (linear) schedule has that share
    grid = time_grid(lin, steps, cos)
    assert grid.times[0] == 1.0 and grid.times[-1] == 0.0 and grid.gammas[0] == 1.0 and grid.gammas[-1] == 0.0
    for i in range(1, steps):
        assert grid.gammas[i] == pytest.approx(cos(1 - i / steps))
        assert lin(grid.times[i]) == pytest.approx(grid.gammas[i])
    assert all(a > b for a, b in zip(grid.times, grid.times[1:]))
    with pytest.raises(ValueError, match="steps"):
        time_grid(cos, 0)
