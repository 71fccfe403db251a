"""The pure image maths of benchmarks/diagnose_synthesis.py (the script itself needs ../shared data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "diagnose_synthesis.py"


@pytest.fixture(scope="module")
def diagnose():
    spec = importlib.util.spec_from_file_location("diagnose_synthesis", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ball(shape=(40, 40, 40), radius=15.0, value=100.0) -> np.ndarray:
    grid = np.indices(shape) - (np.array(shape) // 2)[:, None, None, None]
    return np.where((grid ** 2).sum(0) <= radius ** 2, value, 0.0)


def test_correlated_texture_has_the_asked_strength_and_spares_the_background(diagnose):
    ball = _ball() + 3.0  # a background that is not 0, as the generator renders it
    inside = _ball() > 0
    out = diagnose.correlated_texture(ball, inside, np.random.default_rng(0), sigma_mm=2.0, amount=0.08)
    assert np.all(out[~inside] == 3.0)
    assert out[inside].std() / 103.0 == pytest.approx(0.08, rel=0.2)
    assert out[inside].mean() == pytest.approx(103.0, rel=0.02)
    # spatially correlated: neighbours agree far more than for white noise
    residual = np.where(inside, out - 103.0, 0.0)
    both = inside[1:] & inside[:-1]
    assert np.corrcoef(residual[1:][both], residual[:-1][both])[0, 1] > 0.7


def test_white_noise_is_a_fraction_of_the_foreground_mean_and_uncorrelated(diagnose):
    ball = _ball() + 3.0
    inside = _ball() > 0
    out = diagnose.white_noise(ball, inside, np.random.default_rng(1), fraction=0.05)
    assert np.all(out[~inside] == 3.0)
    assert (out - ball)[inside].std() == pytest.approx(0.05 * 103.0, rel=0.05)  # of the head's mean
    residual = out - ball
    both = inside[1:] & inside[:-1]
    assert abs(np.corrcoef(residual[1:][both], residual[:-1][both])[0, 1]) < 0.05


def test_every_perturbation_keeps_the_shape_and_changes_the_image(diagnose):
    ball = ndimage.gaussian_filter(_ball(), 1.0) + _ball(radius=6.0, value=50.0)
    for name, perturb in diagnose.PERTURBATIONS.items():
        out = perturb(ball, ball > 1.0, np.random.default_rng(2))
        assert out.shape == ball.shape, name
        assert np.isfinite(out).all() and not np.allclose(out, ball), name


def test_equivalent_blur_finds_the_blur_of_a_blurred_reference(diagnose):
    rng = np.random.default_rng(3)
    reference = ndimage.gaussian_filter(rng.standard_normal((32, 32, 32)), 1.0)
    mask = np.ones(reference.shape, dtype=bool)
    sigma, r = diagnose.equivalent_blur(ndimage.gaussian_filter(reference, 1.5), reference, mask)
    assert sigma == 1.5 and r > 0.99
    sigma, r = diagnose.equivalent_blur(reference, reference, mask)
    assert sigma == 0.0 and r == pytest.approx(1.0)


@pytest.mark.parametrize(("axis", "sigma"), [(2, 1.0), (0, 0.8), (1, 1.5)])
def test_axis_blur_finds_the_axis_and_amount_of_a_one_axis_blur(diagnose, axis, sigma):
    texture = ndimage.gaussian_filter(np.random.default_rng(axis).standard_normal((64, 64, 64)), 0.6)
    blurred = ndimage.gaussian_filter(texture, [sigma if a == axis else 0.0 for a in range(3)])
    found = diagnose.axis_blur(blurred, np.ones(blurred.shape, bool), margin=0)
    assert found[axis] == pytest.approx(sigma, abs=0.15)
    assert max(found[a] for a in range(3) if a != axis) < 0.3


def test_axis_blur_of_an_isotropic_texture_is_near_zero_and_a_tiny_mask_is_refused(diagnose):
    texture = ndimage.gaussian_filter(np.random.default_rng(5).standard_normal((64, 64, 64)), 0.6)
    assert max(diagnose.axis_blur(texture, np.ones(texture.shape, bool), margin=0)) < 0.3
    with pytest.raises(ValueError, match="too small"):
        diagnose.axis_blur(texture, np.ones(texture.shape, bool), margin=25)
