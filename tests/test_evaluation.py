"""Tests of the evaluation harness (synthsr_bids/evaluation): metrics, degradation, baselines, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from synthsr_bids.evaluation import degrade
from synthsr_bids.evaluation.__main__ import main
from synthsr_bids.evaluation.baselines import (
    BASELINES,
    baseline_predictions,
    fit_monotone_mapping,
    isotonic_regression,
    upsample,
)
from synthsr_bids.evaluation.cases import EvalCase, find_patient_files, patient_cases, synthetic_cases
from synthsr_bids.evaluation.ceiling import FLAT_REFERENCE, flat_reference, kmeans_1d
from synthsr_bids.evaluation.metrics import (
    MIN_SOURCE_CONTRAST,
    SSIM_SIGMA,
    SSIM_TRUNCATE,
    bright_tissue_mask,
    image_metrics,
    lesion_contrast,
    linear_fit,
    mae,
    nawm_mask,
    pearson,
    relative_contrast,
    removed_fraction,
    robust_range,
    ssim,
)
from synthsr_bids.evaluation.report import markdown_table, mean_case
from synthsr_bids.evaluation.run import (
    CaseResult,
    EvaluationConfig,
    EvaluationResult,
    ModelInfo,
    reference_lesion_contrast,
    score_predictions,
)
from synthsr_bids.evaluation.volume import Volume
from synthsr_bids.preprocessing.resample import resample_to_isotropic
from synthsr_bids.training.phantoms import head_phantom

RNG = np.random.default_rng(0)


def smooth_image(shape=(20, 22, 24), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=shape), 2.0) * 10 + 50


# ---------------------------------------------------------------------------- metrics
def test_linear_fit_pearson_and_mae_for_affinely_related_images():
    x = smooth_image()
    y = 3.0 * x + 2.0
    mask = np.zeros(x.shape, dtype=bool)
    mask[2:-2, 3:-3, 1:-1] = True
    a, b = linear_fit(x, y, mask)
    assert a == pytest.approx(3.0) and b == pytest.approx(2.0)
    assert pearson(x, y, mask) == pytest.approx(1.0)
    assert pearson(x, -y, mask) == pytest.approx(-1.0)
    metrics = image_metrics(x, y, mask)
    assert metrics.r == pytest.approx(1.0)
    assert metrics.mae == pytest.approx(0.0, abs=1e-9)
    assert metrics.ssim == pytest.approx(1.0)
    assert metrics.voxels == int(mask.sum())
    # An inverted image is fitted with a negative slope: SSIM/MAE still perfect, r says -1.
    inverted = image_metrics(-x, y, mask)
    assert inverted.r == pytest.approx(-1.0) and inverted.ssim == pytest.approx(1.0)
    assert math.isnan(pearson(np.ones_like(x), y, mask))
    assert linear_fit(np.ones_like(x), y, mask) == (0.0, pytest.approx(float(y[mask].mean())))


def test_mae_and_robust_range_units():
    y = np.arange(101, dtype=float).reshape(1, 1, 101) * np.ones((2, 2, 1))
    assert robust_range(y) == pytest.approx(98.0)
    assert mae(y + 2.0, y) == pytest.approx(2.0)
    # after the fit an offset is gone; a nonlinear error remains, in units of the robust range
    assert image_metrics(y + 5.0, y, np.ones(y.shape, bool)).mae == pytest.approx(0.0, abs=1e-12)
    assert 0 < image_metrics(y**2, y, np.ones(y.shape, bool)).mae < 0.2


def test_ssim_identical_is_one_and_constant_images_have_the_closed_form():
    x = smooth_image()
    mask = x > np.percentile(x, 30)
    assert ssim(x, x, mask, data_range=10.0) == pytest.approx(1.0, abs=1e-12)
    c1 = (0.01 * 1.0) ** 2
    const = ssim(np.ones((9, 9, 9)), 2 * np.ones((9, 9, 9)), data_range=1.0)
    assert const == pytest.approx((4 + c1) / (5 + c1))


def _ssim_brute_force(x, y, mask, data_range):
    """SSIM at every mask voxel from explicit Gaussian-weighted sums over the window."""
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    offsets = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for v in np.argwhere(mask):
        sw = sx = sy = sxx = syy = sxy = 0.0
        for di in offsets:
            for dj in offsets:
                for dk in offsets:
                    u = v + (di, dj, dk)
                    if np.any(u < 0) or np.any(u >= x.shape) or not mask[tuple(u)]:
                        continue
                    w = g[di + radius] * g[dj + radius] * g[dk + radius]
                    a, b = x[tuple(u)], y[tuple(u)]
                    sw += w
                    sx += w * a
                    sy += w * b
                    sxx += w * a * a
                    syy += w * b * b
                    sxy += w * a * b
        mx, my = sx / sw, sy / sw
        vx, vy, cov = sxx / sw - mx * mx, syy / sw - my * my, sxy / sw - mx * my
        values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_explicit_weighted_sums_inside_a_mask():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 8, 6)) + 3
    y = 0.7 * x + rng.normal(scale=0.5, size=x.shape)
    mask = np.zeros(x.shape, dtype=bool)
    mask[1:6, 2:8, 0:5] = True
    mask[3, 4, 2] = False
    expected = _ssim_brute_force(x, y, mask, data_range=4.0)
    assert ssim(x, y, mask, data_range=4.0) == pytest.approx(expected, rel=1e-10)
    # voxels outside the mask do not matter at all
    y2 = y.copy()
    y2[~mask] = 1e6
    assert ssim(x, y2, mask, data_range=4.0) == pytest.approx(expected, rel=1e-10)


def test_ssim_decreases_monotonically_with_noise():
    x = smooth_image((24, 24, 24))
    mask = np.ones(x.shape, dtype=bool)
    noise = np.random.default_rng(1).normal(size=x.shape)
    scores = [ssim(x + level * noise, x, mask, data_range=robust_range(x)) for level in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert scores[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(scores[:-1], scores[1:], strict=True))
    assert scores[-1] < 0.5


def lesion_phantom():
    """WM block at 100 with a bright lesion at 150 (FLAIR-like); NAWM = WM minus dilated lesion."""
    image = np.zeros((24, 24, 24))
    wm = np.zeros(image.shape, dtype=bool)
    wm[4:20, 4:20, 4:20] = True
    image[wm] = 100.0
    lesion = np.zeros(image.shape, dtype=bool)
    lesion[10:14, 10:14, 10:14] = True
    image[lesion] = 150.0
    return image, wm, lesion, nawm_mask(wm, lesion, dilation=2)


def test_lesion_contrast_removed_is_0_when_kept_and_1_when_filled_with_nawm():
    image, wm, lesion, nawm = lesion_phantom()
    assert not (nawm & ndimage.binary_dilation(lesion, iterations=2)).any() and nawm.sum() > 1000
    kept = lesion_contrast(image, image, lesion, nawm)
    assert kept.source == pytest.approx(0.5) and kept.left == pytest.approx(1.0) and kept.removed == pytest.approx(0.0)
    assert lesion_contrast(3.0 * image, image, lesion, nawm).removed == pytest.approx(0.0)  # scale-free
    filled = image.copy()
    filled[lesion] = 100.0
    assert lesion_contrast(filled, image, lesion, nawm).removed == pytest.approx(1.0)
    half = image.copy()
    half[lesion] = 125.0
    assert lesion_contrast(half, image, lesion, nawm).removed == pytest.approx(0.5)
    dark = image.copy()
    dark[lesion] = 50.0  # bright FLAIR lesion mirrored dark in the T1-like output: still fully shown
    mirrored = lesion_contrast(dark, image, lesion, nawm)
    assert mirrored.removed == pytest.approx(0.0)
    assert mirrored.source == pytest.approx(0.5) and mirrored.prediction == pytest.approx(-0.5)  # signed, kept
    darker = image.copy()
    darker[lesion] = 25.0  # more contrast than the input, of either sign: negative
    assert lesion_contrast(darker, image, lesion, nawm).removed == pytest.approx(-0.5)
    invisible = image.copy()
    invisible[lesion] = 100.0
    assert math.isnan(lesion_contrast(image, invisible, lesion, nawm).removed)


def test_lesion_removed_is_undefined_below_a_tenth_of_input_contrast():
    assert MIN_SOURCE_CONTRAST == 0.1
    assert math.isnan(removed_fraction(0.099, 0.0)) and math.isnan(removed_fraction(-0.05, 0.0))
    assert math.isnan(removed_fraction(float("nan"), 0.0))
    assert removed_fraction(-0.1, 0.0) == pytest.approx(1.0)
    assert removed_fraction(0.2, -0.05, healthy=-0.1) == pytest.approx(0.75)
    image, wm, lesion, nawm = lesion_phantom()
    faint = image.copy()
    faint[lesion] = 105.0  # input lesion contrast 0.05
    assert math.isnan(lesion_contrast(image, faint, lesion, nawm).removed)


def _case(reference, brain, lesion, nawm, *, group, source=None, healthy=False):
    affine = np.eye(4)
    return EvalCase(name="c", group=group, input=Volume(reference if source is None else source, affine),
                    reference=Volume(reference, affine), brain_mask=brain, lesion_mask=lesion, nawm_mask=nawm,
                    healthy_reference=healthy, input_upsampled=healthy)


def test_a_real_t1_with_dark_lesions_scored_as_the_prediction_is_far_from_removed():
    """Patient-like: FLAIR lesions 50 % brighter than NAWM, the real T1's 25 % darker (as patient07's)."""
    flair, wm, lesion, nawm = lesion_phantom()
    t1 = np.where(wm, 100.0, 0.0)
    t1[lesion] = 75.0
    case = _case(t1, wm, lesion, nawm, group="patient07", source=flair)
    ref = reference_lesion_contrast(case, flair)
    assert ref.reference == pytest.approx(-0.25) and ref.healthy == 0.0  # healthy tissue looks like NAWM
    assert ref.removed == pytest.approx(0.5) and ref.removed < 0.7  # the old signed formula said 1.5
    scored = score_predictions(case, {"model": t1}, flair)["model"].lesion
    assert scored.removed == pytest.approx(0.5) and scored.source == pytest.approx(0.5)


def synthetic_lesion_phantom():
    """Synthetic-like: a healthy reference blurred like the generator's target; a plaque across the WM/GM border.

    Partial volume with grey matter gives the healthy reference a lesion contrast of ~-0.1 there.
    """
    shape = (28, 28, 28)
    wm = np.zeros(shape, dtype=bool)
    wm[6:22, 6:22, 6:22] = True
    brain = np.zeros(shape, dtype=bool)
    brain[3:25, 3:25, 3:25] = True
    lesion = np.zeros(shape, dtype=bool)
    lesion[5:8, 12:15, 12:15] = True
    reference = ndimage.gaussian_filter(np.where(wm, 110.0, np.where(brain, 70.0, 0.0)), 0.5)
    source = np.where(wm, 60.0, np.where(brain, 80.0, 0.0))
    source[lesion] = 90.0
    source = ndimage.gaussian_filter(source, 1.0)
    return reference, source, brain, lesion, nawm_mask(wm, lesion)


def test_a_healthy_reference_sets_the_healthy_contrast_so_partial_volume_cancels():
    reference, source, brain, lesion, nawm = synthetic_lesion_phantom()
    c_ref = relative_contrast(reference, lesion, nawm)
    assert c_ref < -0.05 and relative_contrast(source, lesion, nawm) > 2 * MIN_SOURCE_CONTRAST
    case = _case(reference, brain, lesion, nawm, group="synthetic", source=source, healthy=True)
    blurred = ndimage.gaussian_filter(reference, 0.5)
    scored = score_predictions(case, {"model": reference, "blurred": blurred}, source)
    perfect = scored["model"].lesion
    assert perfect.healthy == pytest.approx(c_ref) and perfect.reference == pytest.approx(c_ref)
    assert perfect.removed == pytest.approx(1.0)  # by construction
    assert reference_lesion_contrast(case, source).removed == pytest.approx(1.0)
    assert scored["blurred"].lesion.removed == pytest.approx(1.0, abs=0.05)  # (the old formula: 1.43)
    # The same reference taken for a real one (healthy = NAWM) would be scored by its partial volume.
    as_patient = lesion_contrast(blurred, source, lesion, nawm, reference=reference)
    assert as_patient.healthy == 0.0 and abs(as_patient.removed - 1.0) > 0.3


def test_bright_tissue_mask_takes_the_top_of_the_brain():
    t1 = np.arange(1000, dtype=float).reshape(10, 10, 10)
    brain = t1 >= 500
    wm = bright_tissue_mask(t1, brain, percentile=80)
    assert wm.sum() == pytest.approx(100, abs=1) and t1[wm].min() > 890


# ---------------------------------------------------------------------------- degradation
LAS = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])


def test_gaussian_slice_profile_matches_the_training_generator():
    from synthsr_bids.training.resolution import SLICE_PROFILE_SIGMA, AxisAcquisition, slice_sampling_matrix

    assert degrade.SLICE_PROFILE_SIGMA == SLICE_PROFILE_SIGMA
    n = 61
    signal = np.random.default_rng(7).normal(size=n)
    volume = Volume(np.tile(signal, (2, 2, 1)), np.eye(4))
    out = degrade.thick_slices(volume, axis=2, spacing_mm=5.0, profile="gaussian")
    assert out.affine[2, 3] == 0.0  # slices at 0, 5, ..., 60 as the generator's with phase 0
    matrix = slice_sampling_matrix(n, AxisAcquisition(spacing=5.0, thickness=5.0)).numpy()
    expected = matrix @ signal
    # The generator renormalises the profile at the ends, the evaluation repeats the edge: compare inside.
    np.testing.assert_allclose(out.data[0, 0, 2:-2], expected[2:-2], atol=2e-4)  # (scipy truncates at 4 sigma)


@pytest.mark.parametrize("thickness", [1.0, 2.0, 3.0, 4.0, 5.0, 6.5, 7.0])
def test_box_slice_profile_weights_sum_to_1_with_the_variance_of_a_slab(thickness):
    k = np.arange(40, dtype=float)
    centres = 20.0 + np.linspace(0.0, 1.0, 21)
    weights = degrade.box_profile_matrix(centres, thickness, 40)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    mean = weights @ k
    variance = (weights * (k - mean[:, None]) ** 2).sum(axis=1)
    # Discretisation: voxel k is the box [k - 1/2, k + 1/2], its weight the fraction of the slab it covers.
    # Slab edges on voxel boundaries: uniform weights, variance (T^2 - 1) / 12 exactly (the slab's T^2 / 12
    # minus the voxel's own 1/12); any other position or thickness: within [-1/12, 0.18] of T^2 / 12.
    assert np.all(variance - thickness**2 / 12 >= -1 / 12 - 1e-9)
    assert np.all(variance - thickness**2 / 12 <= 0.18)
    aligned = 20.0 if thickness % 2 == 1 else 20.5
    if thickness % 1 == 0:
        w = degrade.box_profile_matrix(np.array([aligned]), thickness, 40)[0]
        assert sorted(set(np.round(w[w > 0], 12))) == [round(1 / thickness, 12)]
        var = float(w @ (k - w @ k) ** 2)
        assert var == pytest.approx((thickness**2 - 1) / 12)
    # Beyond the array, the edge voxel takes the weight (the edge value is repeated).
    edge = degrade.box_profile_matrix(np.array([0.0]), thickness, 40)[0]
    assert edge.sum() == pytest.approx(1.0) and edge[0] == pytest.approx(min(1.0, 0.5 + 0.5 / thickness))


def test_box_profile_is_the_default_and_much_sharper_than_the_gaussian():
    n = 41
    signal = np.random.default_rng(8).normal(size=n)
    volume = Volume(np.tile(signal, (2, 2, 1)), np.eye(4))
    box = degrade.thick_slices(volume, axis=2, spacing_mm=5.0)
    assert degrade.DEFAULT_SLICE_PROFILE == "box"
    # Slice k at voxel 5k averages voxels 5k-2 .. 5k+2 (the end slices repeat the edge voxel).
    for k in range(1, 8):
        assert box.data[0, 0, k] == pytest.approx(signal[5 * k - 2:5 * k + 3].mean())
    assert box.data[0, 0, 0] == pytest.approx((3 * signal[0] + signal[1] + signal[2]) / 5)
    # A Gaussian's variance (0.42 x 5 mm)^2 = 4.4 mm^2 vs the box's 2.0 (voxels) / 2.08 (continuous).
    impulse = Volume(np.zeros((1, 1, 41)), np.eye(4))
    impulse.data[0, 0, 20] = 1.0
    profiles = {p: degrade.thick_slices(impulse, axis=2, spacing_mm=1.0, thickness_mm=5.0, profile=p).data[0, 0]
                for p in degrade.SLICE_PROFILES}
    z = np.arange(41) - 20.0
    assert float(profiles["box"] @ z**2) == pytest.approx(2.0)
    assert float(profiles["gaussian"] @ z**2) == pytest.approx((0.42 * 5) ** 2, rel=0.02)
    with pytest.raises(ValueError, match="profile"):
        degrade.thick_slices(volume, axis=2, profile="triangle")


def test_slice_axis_follows_the_affine():
    assert degrade.slice_axis(LAS, "axial") == 2 and degrade.slice_axis(LAS, "coronal") == 1
    lia = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    assert degrade.slice_axis(lia, "axial") == 1 and degrade.slice_axis(lia, "coronal") == 2
    with pytest.raises(ValueError, match="orientation"):
        degrade.slice_axis(LAS, "oblique")


def test_thick_slices_reduce_resolution_along_one_axis_only():
    shape = (12, 14, 31)
    rng = np.random.default_rng(5)
    in_plane = rng.normal(size=shape[:2])[:, :, None] * np.ones(shape)  # varies along axes 0, 1 only
    out = degrade.thick_slices(Volume(in_plane, LAS), axis=2, spacing_mm=5.0)
    assert out.shape == (12, 14, 7)  # centres at 0, 5, ..., 30
    assert out.zooms == pytest.approx((1.0, 1.0, 5.0))
    np.testing.assert_allclose(out.data, in_plane[:, :, ::5], atol=1e-12)  # in-plane detail untouched
    # slice k sits at the world position of input voxel 5k
    for k in (0, 3, 6):
        np.testing.assert_allclose(out.affine @ [2, 3, k, 1], LAS @ [2, 3, 5 * k, 1])
    # detail along the slice axis is averaged away by the 5 mm profile
    through = np.tile(np.where(np.arange(31) % 2 == 0, 1.0, -1.0), (12, 14, 1))
    thick = degrade.thick_slices(Volume(through, LAS), axis=2, spacing_mm=5.0, profile="gaussian")
    assert np.abs(thick.data[:, :, 1:-1]).max() < 0.01  # (the end slices see the edge padding)
    box = degrade.thick_slices(Volume(through, LAS), axis=2, spacing_mm=5.0)  # 5 alternating voxels: 1/5 left
    np.testing.assert_allclose(np.abs(box.data[:, :, 1:-1]), 0.2, atol=1e-12)
    np.testing.assert_allclose(box.affine, thick.affine)
    # an odd count of voxels is centred: 29 voxels -> slices at 1.5 + 5k rounded down to whole voxels
    odd = degrade.thick_slices(Volume(np.zeros((4, 4, 29)), np.eye(4)), axis=2, spacing_mm=5.0)
    assert odd.shape == (4, 4, 6) and odd.affine[2, 3] == pytest.approx(1.0)


def test_pipeline_1mm_grid_of_thick_slices_coincides_with_the_original_grid():
    out = degrade.thick_slices(Volume(np.zeros((10, 10, 30)), LAS), axis=2, spacing_mm=5.0)
    back = resample_to_isotropic(out.data, out.affine)
    mapping = np.linalg.inv(LAS) @ back.affine
    np.testing.assert_allclose(mapping[:3, :3], np.eye(3), atol=1e-9)
    np.testing.assert_allclose(mapping[:3, 3], np.round(mapping[:3, 3]), atol=1e-9)


# ---------------------------------------------------------------------------- baselines
def test_upsampling_recovers_a_smooth_image_and_cubic_beats_trilinear():
    n = 41
    z = np.arange(n, dtype=float)
    truth = np.sin(2 * np.pi * z / 60.0)[None, None, :] * np.ones((4, 4, 1))  # trilinear error ~ h^2/8 f''
    coarse = Volume(truth[:, :, ::5], np.diag([1.0, 1.0, 5.0, 1.0]))
    interior = (slice(None), slice(None), slice(5, 36))
    errors = {}
    for order in (1, 3):
        up = upsample(coarse, truth.shape, np.eye(4), order=order)
        errors[order] = np.abs(up - truth)[interior].max()
    assert errors[1] < 0.05 and errors[3] < errors[1] / 3


def test_isotonic_regression_pools_adjacent_violators():
    np.testing.assert_allclose(isotonic_regression(np.array([1.0, 3.0, 2.0, 4.0])), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(isotonic_regression(np.array([1.0, 3.0, 2.0]), np.array([1.0, 1.0, 3.0])),
                               [1, 2.25, 2.25])
    np.testing.assert_allclose(isotonic_regression(np.array([3.0, 1.0, 2.0]), increasing=False), [3, 1.5, 1.5])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_monotone_mapping_is_monotone_and_picks_the_direction(sign):
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 10, size=(30, 30, 30))
    y = sign * np.sqrt(x) * 20 + rng.normal(scale=1.0, size=x.shape)
    mask = np.ones(x.shape, dtype=bool)
    mapping = fit_monotone_mapping(x, y, mask)
    assert mapping.increasing == (sign > 0)
    steps = np.diff(mapping(np.linspace(-5, 15, 500)))
    assert np.all(steps >= -1e-12) if sign > 0 else np.all(steps <= 1e-12)
    assert pearson(mapping(x), y) > 0.99
    assert mae(mapping(x), y) < 1.0


def test_baselines_on_the_reference_grid_are_the_input():
    image = smooth_image()
    ref = Volume(2 * image + 1, LAS)
    mask = np.ones(image.shape, dtype=bool)
    out = baseline_predictions(Volume(image, LAS), ref, mask)
    assert tuple(out) == BASELINES
    assert out["trilinear"] is out["cubic"] and out["trilinear+map"] is out["cubic+map"]
    np.testing.assert_allclose(out["trilinear"], image)
    assert pearson(out["trilinear+map"], ref.data) > 0.999


# ---------------------------------------------------------------------------- flat 3-class reference
def test_kmeans_1d_finds_three_separated_clusters_whatever_their_sizes():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(30, 2, 500), rng.normal(70, 3, 5000), rng.normal(110, 2, 50)])
    centres, classes = kmeans_1d(rng.permutation(values), 3)
    np.testing.assert_allclose(centres, [30, 70, 110], atol=1.0)
    assert np.bincount(classes).tolist() == sorted(np.bincount(classes).tolist(), key=[500, 5000, 50].index)
    # Deterministic, and a single value or a single class is handled.
    np.testing.assert_array_equal(kmeans_1d(values, 3)[0], kmeans_1d(values, 3)[0])
    centres, classes = kmeans_1d(np.full(10, 5.0), 3)
    assert np.all(centres == 5.0) and classes.shape == (10,)
    assert kmeans_1d(values, 1)[0] == pytest.approx([values.mean()])
    with pytest.raises(ValueError):
        kmeans_1d(np.array([]), 2)


def test_flat_reference_is_the_blurred_class_means_of_a_piecewise_constant_image():
    labels = head_phantom((30, 32, 30))
    brain = np.isin(labels, [2, 41, 3, 42, 4, 43, 10, 49, 14, 16])
    tissue = np.where(np.isin(labels, [2, 41]), 110.0, np.where(np.isin(labels, [4, 43, 14]), 30.0, 70.0)) * brain
    noisy = tissue + brain * np.random.default_rng(2).normal(0, 3, tissue.shape)
    flat = flat_reference(noisy, brain, blur_voxels=0.0)
    np.testing.assert_allclose(flat, tissue, atol=1.0)  # class means of the noisy image ~ the true constants
    assert np.all(flat[~brain] == 0)
    blurred = flat_reference(noisy, brain)  # default: the training generator's 0.5-voxel target blur
    np.testing.assert_allclose(blurred, ndimage.gaussian_filter(flat, 0.5))
    # Against the noisy "real" image it scores below 1 but far above an unrelated image.
    assert 0.9 < pearson(blurred, noisy, brain) < pearson(flat, noisy, brain) < 1.0
    with pytest.raises(ValueError):
        flat_reference(noisy, brain[:-1])


# ---------------------------------------------------------------------------- scoring + report
def test_mean_outside_lesions_averages_the_same_cases_as_the_brain():
    """A lesion-free case's outside-lesion metrics are its brain metrics, so the two means cover the same cases."""
    reference, source, brain, lesion, nawm = synthetic_lesion_phantom()
    noisy = reference + np.random.default_rng(9).normal(scale=10.0, size=reference.shape)
    results = []
    for name, case_lesion, case_nawm, prediction in (("free", None, None, noisy), ("lesion", lesion, nawm, reference)):
        case = _case(reference, brain, case_lesion, case_nawm, group="synthetic", source=source, healthy=True)
        methods = score_predictions(case, {"model": prediction}, source)
        results.append(CaseResult(name=name, group="synthetic", seconds=1.0, methods=methods))
    free, with_lesion = (r.methods["model"] for r in results)
    assert free.outside_lesions == free.brain and free.lesion is None
    assert with_lesion.outside_lesions.voxels < with_lesion.brain.voxels
    assert with_lesion.outside_lesions.r == pytest.approx(with_lesion.brain.r)  # a perfect prediction: equal metrics
    mean = mean_case(results)["methods"]["model"]
    for key in ("r", "ssim", "mae"):
        assert mean["outside_lesions"][key] == pytest.approx(mean["brain"][key])
    assert mean["brain"]["r"] == pytest.approx((free.brain.r + 1.0) / 2) and free.brain.r < 0.99


def _table_rows(table: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows}


def test_table_leaves_out_what_does_not_apply_to_synthetic_cases():
    reference, source, brain, lesion, nawm = synthetic_lesion_phantom()
    case = _case(reference, brain, lesion, nawm, group="synthetic", source=source, healthy=True)
    scored = score_predictions(case, {"model": reference, "trilinear": source, "trilinear+map": source}, source)
    methods = {**scored, "cubic": None, "cubic+map": None}
    synthetic = CaseResult(name="syn1 x", group="synthetic", seconds=1.0, methods=methods,
                           reference_lesion=reference_lesion_contrast(case, source))
    result = EvaluationResult(model=ModelInfo("m", "/m", "0" * 64, "-"), config=EvaluationConfig(), cases=(synthetic,))
    table = markdown_table(result, verbose=True)
    header = table.splitlines()[0]
    assert "flat 3-class reference" in header and "ceiling" not in table
    row = _table_rows(table)["syn1 x"]
    columns = _table_rows(table)["case"]
    assert row[columns.index("cubic")] == "–" and row[columns.index("cubic+map (oracle)")] == "–"
    assert row[columns.index("trilinear")] != "–"
    assert row[columns.index("lesion removed: model (ref)")] == "1.00 (–)"  # the healthy reference's 1 is not shown
    assert _table_rows(table)["synthetic mean (1)"][columns.index("cubic")] == "–"
    assert synthetic.to_dict()["methods"]["cubic"] is None


# ---------------------------------------------------------------------------- cases + CLI
def write_phantom_patient(folder: Path, shape=(40, 44, 40)) -> Path:
    """T1/FLAIR/T2/T1POST/lesion NIfTIs with open_ms_data's file names (LAS, 1 mm, skull stripped)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = head_phantom(shape)
    brain = np.isin(labels, [2, 41, 3, 42, 4, 43, 10, 49, 14, 16])
    wm = np.isin(labels, [2, 41])
    csf = np.isin(labels, [4, 43, 14])
    centre = np.argwhere(wm).mean(0).round().astype(int)
    lesion = np.zeros(shape, dtype=bool)
    lesion[tuple(slice(c - 2, c + 3) for c in centre - (6, 0, 0))] = True
    lesion &= wm
    rng = np.random.default_rng(4)
    contrasts = {  # (WM, GM/deep, CSF, lesion)
        "T1": (110.0, 70.0, 30.0, 75.0),
        "FLAIR": (60.0, 80.0, 10.0, 130.0),
        "T2": (50.0, 80.0, 150.0, 120.0),
        "T1POST": (1.0, 1.0, 1.0, 1.0),
    }
    for name, (w, g, c, les) in contrasts.items():
        image = np.where(wm, w, np.where(csf, c, g)) * brain
        image[lesion] = les
        image = ndimage.gaussian_filter(image, 0.7) * brain + brain * rng.normal(scale=1.0, size=shape)
        nib.save(nib.Nifti1Image(image.astype(np.float32), LAS), folder / f"{name}_N4_noneck_regtoMNI.nii.gz")
    nib.save(nib.Nifti1Image(lesion.astype(np.uint8), LAS), folder / "GOLD_STANDARD_N4_regtoMNI.nii.gz")
    return folder


def write_label_maps(folder: Path) -> Path:
    """Skull-stripped phantom maps with left labels on both sides (as SynthSR's maps)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, shape in enumerate([(36, 40, 36), (38, 36, 36)]):
        labels = head_phantom(shape)
        labels[np.isin(labels, [507, 515, 24])] = 0
        labels = np.select([labels == 41, labels == 42, labels == 43, labels == 49], [2, 3, 4, 10], labels)
        nib.save(nib.Nifti1Image(labels.astype(np.int32), np.eye(4)), folder / f"brain{i + 1}_labels.nii.gz")
    return folder


def scaled_identity_model(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A model whose output is 0.4 x its input: below mri_synthsr's 128/255 clip, so output ~ input."""
    import torch
    from models_builder import identity_unet, write_model

    net = identity_unet(base_features=4, n_levels=3)
    with torch.no_grad():
        net.head.weight[0, 0] = 0.4
    return write_model(net, path, metadata)


def test_patient_cases_from_file_name_patterns(tmp_path: Path):
    folder = write_phantom_patient(tmp_path / "patient07")
    files = find_patient_files(folder)
    assert files["T1"].name.startswith("T1_") and "lesions" in files
    cases = patient_cases(folder)
    assert [c.name for c in cases] == ["FLAIR 1mm", "FLAIR 5mm ax", "FLAIR 5mm cor", "T2 1mm", "T2 5mm ax",
                                       "T2 5mm cor", "T1 5mm ax", "T1 1mm"]
    assert cases[-1].input is cases[-1].reference  # the T1 1mm row: the reference itself
    # One flat 3-class reference per patient, shared by its cases.
    assert all(c.flat_reference is cases[0].flat_reference for c in cases)
    np.testing.assert_allclose(cases[0].flat_reference, flat_reference(cases[0].reference.data, cases[0].brain_mask))
    assert cases[1].input.zooms == pytest.approx((1.0, 1.0, 5.0))
    assert cases[2].input.zooms == pytest.approx((1.0, 5.0, 1.0))
    stored = np.asanyarray(nib.load(files["lesions"]).dataobj) > 0
    assert cases[0].lesion_mask.sum() == stored.sum() > 0 and cases[0].nawm_mask.sum() > 0
    assert not (cases[0].nawm_mask & cases[0].lesion_mask).any()
    assert not any(c.healthy_reference or c.input_upsampled for c in cases)
    assert cases[1].details["slice_profile"] == "box"
    gaussian = patient_cases(folder, slice_profile="gaussian")
    assert gaussian[1].details["slice_profile"] == "gaussian"
    flair = cases[0].input  # FLAIR 1mm: the source of the degraded FLAIR cases
    np.testing.assert_allclose(cases[1].input.data, degrade.thick_slices(flair, axis=2, profile="box").data)
    np.testing.assert_allclose(gaussian[1].input.data, degrade.thick_slices(flair, axis=2, profile="gaussian").data)


def test_synthetic_cases_have_one_thick_axis_spaced_3_to_7_mm(tmp_path: Path):
    maps = write_label_maps(tmp_path / "maps")
    cases = list(synthetic_cases(maps, 6))
    for case in cases:
        thick = case.details["thick_axes"]
        assert len(thick) == 1, (case.name, thick)
        assert 1.0 <= thick[0]["thickness_mm"] <= thick[0]["spacing_mm"] and thick[0]["axis"] in (0, 1, 2)
        assert case.healthy_reference and case.input_upsampled
    assert [c.details["thick_axes"][0]["spacing_mm"] for c in cases] == [3.0, 4.0, 5.0, 6.0, 7.0, 3.0]


def test_synthetic_case_overrides_replace_the_evaluation_settings(tmp_path: Path):
    maps = write_label_maps(tmp_path / "maps")
    clean = {"contrast_probs": (("t1", 1.0),), "plaque_prob": 0.0, "stroke_prob": 0.0, "tumour_prob": 0.0,
             "isotropic_prob": 1.0, "isotropic_spacing": (1.0, 1.0), "noise_max": 0.0, "bias_std_max": 0.0}
    default = list(synthetic_cases(maps, 2))
    cases = list(synthetic_cases(maps, 2, overrides=clean))
    assert any(c.details["thick_axes"] for c in default)  # the evaluation's own: always thick slices
    for case in cases:
        assert case.details["contrast"] == "t1" and case.details["lesions"] == [] and case.lesion_mask is None
        assert all(axis["spacing_mm"] == 1.0 for axis in case.details["thick_axes"])
        assert case.details["noise_sigma"] == 0.0 and case.details["bias_std"] == 0.0
        # Same seed, same map: only the acquisition differs, the target (healthy anatomy) does not.
    np.testing.assert_allclose(cases[0].reference.data, default[0].reference.data)


def test_cli_end_to_end_writes_table_and_json(tmp_path: Path, capsys):
    patient = write_phantom_patient(tmp_path / "data" / "open_ms_data" / "patient07")
    write_label_maps(tmp_path / "data" / "synthsr" / "label_maps")
    # The weight file asks for no sharpening (as the bundled model's): the evaluation follows it by default.
    model = scaled_identity_model(tmp_path / "model.safetensors", {"synthsr_bids.sharpen": "false"})
    out = tmp_path / "eval.json"
    code = main(["--model", str(model), "--data-dir", str(tmp_path / "data"), "--synthetic-cases", "2",
                 "--threads", "1", "--output-json", str(out), "--verbose", "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "| case | model | trilinear | cubic |" in table
    assert "flip averaging on, sharpening off)" in table
    for row in ("synthetic mean (2)", "syn1 brain1", "syn2 brain2", "patient07 FLAIR 5mm cor", "patient07 T1 5mm ax"):
        assert row in table
    doc = json.loads(out.read_text())
    assert doc["schema"] == "synthsr-bids-evaluation/2"
    assert doc["model"]["path"] == str(model.resolve()) and len(doc["model"]["sha256"]) == 64
    assert doc["methods"] == ["model", *BASELINES, FLAT_REFERENCE] and "lesion" in doc["definitions"]
    assert FLAT_REFERENCE == "flat reference" and FLAT_REFERENCE in doc["definitions"]  # the JSON key is unchanged
    assert "flat 3-class reference" in table and "ceiling" not in table
    assert doc["skipped"] == []
    assert doc["settings"]["sharpen"] is False and doc["settings"]["flip"] is True
    assert doc["settings"]["slice_profile"] == "box"
    assert [c["name"] for c in doc["cases"]][:2] == ["syn1 brain1_labels", "syn2 brain2_labels"]
    patient_docs = [c for c in doc["cases"] if c["group"] == patient.name]
    assert len(patient_docs) == 8
    for case in doc["cases"]:
        assert case["seconds"] > 0
        # The flat reference is scored against real references only (a synthetic one is already flat);
        # synthetic inputs were upsampled linearly by the generator: no cubic baselines (null).
        synthetic = case["group"] == "synthetic"
        assert (FLAT_REFERENCE in case["methods"]) == (not synthetic)
        assert (case["methods"]["cubic"] is None and case["methods"]["cubic+map"] is None) == synthetic
        for method, scored in case["methods"].items():
            if scored is None:
                continue
            brain = scored["brain"]
            assert all(isinstance(brain[k], float) and math.isfinite(brain[k]) for k in ("r", "ssim", "mae"))
        if synthetic:
            thick = case["details"]["thick_axes"]
            assert len(thick) == 1 and thick[0]["spacing_mm"] == {"syn1": 3.0, "syn2": 4.0}[case["name"][:4]]
            assert case["methods"]["model"]["outside_lesions"] is not None  # the brain's when lesion-free
    for case in patient_docs:
        model_result = case["methods"]["model"]
        assert model_result["lesion"] is not None and math.isfinite(model_result["lesion"]["removed"])
        assert model_result["outside_lesions"]["voxels"] < model_result["brain"]["voxels"]
        assert case["reference_lesion"] is not None
        lesion = model_result["lesion"]
        assert lesion["healthy"] == 0.0 and lesion["reference"] == pytest.approx(case["reference_lesion"]["prediction"])
        assert lesion["reference"] < -0.2 and abs(lesion["source"]) >= 0.1  # the phantom T1's lesion is dark
    assert doc["synthetic_mean"]["cases"] == 2
    synthetic_rows = [line for line in table.splitlines() if line.startswith(("| synthetic mean", "| syn"))]
    columns = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    for line in synthetic_rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[columns.index("cubic")] == cells[columns.index("cubic+map (oracle)")] == "–"
        assert cells[columns.index("lesion removed: model (ref)")].endswith(("(–)", "–"))
    # Without sharpening, a (scaled) identity model outputs its input (times a constant) after the
    # pipeline's own resampling: on the reference grid it must match the trilinear baseline (a flip
    # or a shift would not) and keep the lesion contrast.
    by_name = {c["name"]: c["methods"] for c in patient_docs}
    assert by_name["T1 1mm"]["trilinear"]["brain"]["r"] == pytest.approx(1.0)
    for name in ("FLAIR 1mm", "T2 1mm", "T1 1mm"):
        assert by_name[name]["model"]["brain"]["r"] == pytest.approx(by_name[name]["trilinear"]["brain"]["r"], abs=1e-6)
        assert by_name[name]["model"]["lesion"]["removed"] == pytest.approx(0.0, abs=1e-6)
    # The phantom T1 is three noisy constants, blurred: its flat rendering is close to it, the
    # same for every row (it depends on the reference only).
    flat = {name: methods[FLAT_REFERENCE]["brain"]["r"] for name, methods in by_name.items()}
    assert len(set(flat.values())) == 1 and 0.9 < flat["T1 1mm"] < 1.0
    t1 = by_name["T1 5mm ax"]
    assert t1["model"]["brain"]["r"] > 0.9
    assert t1["model"]["brain"]["r"] == pytest.approx(t1["trilinear"]["brain"]["r"], abs=0.02)
    assert t1["model"]["lesion"]["removed"] == pytest.approx(0.0, abs=0.1)


def test_a_case_with_a_faint_input_lesion_says_why_it_has_no_lesion_number(tmp_path: Path):
    from synthsr_bids.evaluation.run import evaluate_case, load_model
    from synthsr_bids.inference.predict import SynthesisOptions

    model = load_model(str(scaled_identity_model(tmp_path / "model.safetensors")))
    image, wm, lesion, nawm = lesion_phantom()
    faint = image.copy()
    faint[lesion] = 108.0  # input lesion contrast 0.08 < MIN_SOURCE_CONTRAST
    case = _case(image, wm, lesion, nawm, group="p", source=faint)
    result = evaluate_case(case, model.network, SynthesisOptions(flip=False, sharpen=False))
    lesion_result = result.methods["model"].lesion
    assert lesion_result.source == pytest.approx(0.08) and math.isnan(lesion_result.removed)
    assert "0.08" in result.details["lesion_removed"] and "below 0.1" in result.details["lesion_removed"]
    assert set(result.methods) == {"model", *BASELINES}  # no flat reference was given


def test_cli_slice_profile_option_is_recorded(tmp_path: Path, capsys):
    patient = write_phantom_patient(tmp_path / "p")
    model = scaled_identity_model(tmp_path / "model.safetensors", {"synthsr_bids.sharpen": "false"})
    out = tmp_path / "eval.json"
    r = {}
    for profile in ("gaussian", "box"):
        code = main(["--model", str(model), "--patient-dir", str(patient), "--synthetic-cases", "0", "--no-progress",
                     "--threads", "1", "--output-json", str(out), "--slice-profile", profile])
        assert code == 0
        doc = json.loads(out.read_text())
        assert doc["settings"]["slice_profile"] == profile and "slice_profile" in doc["definitions"]
        t1 = next(c for c in doc["cases"] if c["name"] == "T1 5mm ax")
        assert t1["details"]["slice_profile"] == profile
        r[profile] = t1["methods"]["cubic"]["brain"]["r"]
    assert r["box"] > r["gaussian"]  # the box keeps more detail than the blurrier training-like Gaussian
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["--slice-profile", "triangle"])
    assert info.value.code == 64


def test_cli_skips_missing_parts_and_says_so(tmp_path: Path, capsys):
    model = scaled_identity_model(tmp_path / "model.safetensors")
    patient = write_phantom_patient(tmp_path / "p")
    code = main(["--model", str(model), "--data-dir", str(tmp_path / "nowhere"), "--patient-dir", str(patient),
                 "--no-progress", "--threads", "1", "--synthetic-cases", "1"])
    captured = capsys.readouterr()
    assert code == 0
    assert "synthetic mean" not in captured.out and "p T1 5mm ax" in captured.out
    assert "sharpening on)" in captured.out  # a file that does not say: mri_synthsr's post-processing
    assert "Skipped: synthetic cases: no label maps in" in captured.out
    code = main(["--model", str(model), "--data-dir", str(tmp_path / "nowhere"), "--synthetic-cases", "0"])
    captured = capsys.readouterr()
    assert code == 66
    assert "nothing was evaluated" in captured.err and "patient directory does not exist" in captured.err


def test_cli_sharpening_flags_override_the_weight_file(tmp_path: Path, capsys):
    patient = write_phantom_patient(tmp_path / "p")
    plain = scaled_identity_model(tmp_path / "plain.safetensors", {"synthsr_bids.sharpen": "false"})
    out = tmp_path / "eval.json"
    for flag, expected in (("--sharpen", True), ("--no-sharpen", False)):
        code = main(["--model", str(plain), "--patient-dir", str(patient), "--synthetic-cases", "0", "--no-progress",
                     "--threads", "1", "--output-json", str(out), flag])
        assert code == 0
        assert f"sharpening {'on' if expected else 'off'})" in capsys.readouterr().out
        doc = json.loads(out.read_text())
        assert doc["settings"]["sharpen"] is expected
        t1 = next(c for c in doc["cases"] if c["name"] == "T1 1mm")["methods"]
        # Unsharpened, the identity model reproduces its input; sharpened, it does not quite.
        gap = 1.0 - t1["model"]["brain"]["r"]
        assert (gap > 1e-4) if expected else (gap < 1e-6)


def test_cli_missing_model_names_the_file_and_the_fix(tmp_path: Path, capsys):
    missing = tmp_path / "no-such-model.safetensors"
    code = main(["--model", str(missing), "--synthetic-cases", "0"])
    err = capsys.readouterr().err
    assert code == 66
    assert str(missing) in err
    assert "python -m synthsr_bids.training export --config configs/default.toml --output FILE" in err


def test_cli_usage_errors_exit_64(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--synthetic-cases", "-1"])
    assert info.value.code == 64
