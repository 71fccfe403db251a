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
from synthsr_bids.evaluation.cases import find_patient_files, patient_cases, synthetic_cases
from synthsr_bids.evaluation.ceiling import CEILING, flat_reference, kmeans_1d
from synthsr_bids.evaluation.metrics import (
    SSIM_SIGMA,
    SSIM_TRUNCATE,
    bright_tissue_mask,
    image_metrics,
    lesion_contrast,
    linear_fit,
    mae,
    nawm_mask,
    pearson,
    robust_range,
    ssim,
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
    dark[lesion] = 50.0  # bright FLAIR lesion, dark in the T1-like output: sign flips
    assert lesion_contrast(dark, image, lesion, nawm).removed == pytest.approx(2.0)
    invisible = image.copy()
    invisible[lesion] = 100.0
    assert math.isnan(lesion_contrast(image, invisible, lesion, nawm).removed)


def test_bright_tissue_mask_takes_the_top_of_the_brain():
    t1 = np.arange(1000, dtype=float).reshape(10, 10, 10)
    brain = t1 >= 500
    wm = bright_tissue_mask(t1, brain, percentile=80)
    assert wm.sum() == pytest.approx(100, abs=1) and t1[wm].min() > 890


# ---------------------------------------------------------------------------- degradation
LAS = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])


def test_slice_profile_matches_the_training_generator():
    from synthsr_bids.training.resolution import SLICE_PROFILE_SIGMA

    assert degrade.SLICE_PROFILE_SIGMA == SLICE_PROFILE_SIGMA


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
    thick = degrade.thick_slices(Volume(through, LAS), axis=2, spacing_mm=5.0)
    assert np.abs(thick.data[:, :, 1:-1]).max() < 0.01  # (the end slices see the edge padding)
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


# ---------------------------------------------------------------------------- ceiling
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
    assert cases[-1].input is cases[-1].reference  # the ceiling row: the reference itself
    # One flat-reference ceiling per patient, shared by its cases.
    assert all(c.flat_reference is cases[0].flat_reference for c in cases)
    np.testing.assert_allclose(cases[0].flat_reference, flat_reference(cases[0].reference.data, cases[0].brain_mask))
    assert cases[1].input.zooms == pytest.approx((1.0, 1.0, 5.0))
    assert cases[2].input.zooms == pytest.approx((1.0, 5.0, 1.0))
    assert cases[0].lesion_mask.sum() > 0 and cases[0].nawm_mask.sum() > 0
    assert not (cases[0].nawm_mask & cases[0].lesion_mask).any()


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
    assert doc["schema"] == "synthsr-bids-evaluation/1"
    assert doc["model"]["path"] == str(model.resolve()) and len(doc["model"]["sha256"]) == 64
    assert doc["methods"] == ["model", *BASELINES, CEILING] and "lesion" in doc["definitions"]
    assert CEILING in doc["definitions"] and "flat reference (ceiling)" in table
    assert doc["skipped"] == []
    assert doc["settings"]["sharpen"] is False and doc["settings"]["flip"] is True
    assert [c["name"] for c in doc["cases"]][:2] == ["syn1 brain1_labels", "syn2 brain2_labels"]
    patient_docs = [c for c in doc["cases"] if c["group"] == patient.name]
    assert len(patient_docs) == 8
    for case in doc["cases"]:
        assert case["seconds"] > 0
        # The ceiling is scored against real references only (a synthetic one is already flat).
        assert (CEILING in case["methods"]) == (case["group"] != "synthetic")
        for method in case["methods"]:
            brain = case["methods"][method]["brain"]
            assert all(isinstance(brain[k], float) and math.isfinite(brain[k]) for k in ("r", "ssim", "mae"))
    for case in patient_docs:
        model_result = case["methods"]["model"]
        assert model_result["lesion"] is not None and math.isfinite(model_result["lesion"]["removed"])
        assert model_result["outside_lesions"]["voxels"] < model_result["brain"]["voxels"]
        assert case["reference_lesion"] is not None
    assert doc["synthetic_mean"]["cases"] == 2
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
    ceiling = {name: methods[CEILING]["brain"]["r"] for name, methods in by_name.items()}
    assert len(set(ceiling.values())) == 1 and 0.9 < ceiling["T1 1mm"] < 1.0
    t1 = by_name["T1 5mm ax"]
    assert t1["model"]["brain"]["r"] > 0.9
    assert t1["model"]["brain"]["r"] == pytest.approx(t1["trilinear"]["brain"]["r"], abs=0.02)
    assert t1["model"]["lesion"]["removed"] == pytest.approx(0.0, abs=0.1)


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
