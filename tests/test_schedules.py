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
