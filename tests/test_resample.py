"""Resampling to 1 mm (mri_synthsr's resample_volume) and back onto arbitrary grids."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from synthsr_bids.preprocessing.resample import (
    antialias_sigmas,
    output_shape,
    resample_to_grid,
    resample_to_isotropic,
    sample_positions,
    voxel_sizes,
)


def _affine(columns: np.ndarray, translation=(10.0, -20.0, 5.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = translation
    return affine


def _rotation(degrees: float, axis: int) -> np.ndarray:
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def _world(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_one_mm_image_is_returned_unchanged_whatever_the_orientation():
    rng = np.random.default_rng(0)
    data = rng.random((7, 5, 6))
    # LIA-like permutation with a small rotation: unit columns, so 1 mm on every axis.
    columns = _rotation(10, 2) @ np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    affine = _affine(columns)
    result = resample_to_isotropic(data, affine)
    np.testing.assert_array_equal(result.data, data)
    np.testing.assert_allclose(result.affine, affine, atol=1e-12)
    assert result.sigmas == (0.0, 0.0, 0.0)
    assert result.data is not data  # a copy: the caller may modify it


def test_upstream_unit_blur_reproduces_the_sigma_quarter_blur():
    rng = np.random.default_rng(1)
    data = rng.random((6, 6, 6))
    result = resample_to_isotropic(data, np.eye(4), upstream_unit_blur=True)
    np.testing.assert_allclose(result.data, gaussian_filter(data, 0.25), rtol=0, atol=1e-12)
    assert not np.allclose(result.data, data)


def test_linear_ramp_along_a_3mm_axis_takes_the_exact_expected_values():
    ramp = 10.0 * np.arange(4) + 1.0  # values 1, 11, 21, 31 along a 3 mm axis
    data = np.broadcast_to(ramp[:, None, None], (4, 2, 3)).copy()
    affine = np.diag([3.0, 1.0, 1.0, 1.0])
    result = resample_to_isotropic(data, affine)
    # f = 3: start = -(3 - 1) / 6 = -1/3, step 1/3, 12 samples, clamped to [0, 3].
    positions = np.clip(-1.0 / 3.0 + np.arange(12) / 3.0, 0, 3)
    expected = 10.0 * positions + 1.0
    assert result.data.shape == (12, 2, 3)
    np.testing.assert_allclose(result.data[:, 1, 2], expected, atol=1e-12)
    thirds = [1, 1, 1 + 10 / 3, 1 + 20 / 3, 11, 14 + 1 / 3, 17 + 2 / 3, 21, 24 + 1 / 3, 27 + 2 / 3, 31, 31]
    np.testing.assert_allclose(result.data[:, 0, 0], thirds)
    assert result.factors == (3.0, 1.0, 1.0)
    assert result.sigmas == (0.0, 0.0, 0.0)  # upsampling is never blurred


@pytest.mark.parametrize(
    ("size", "n"), [(3.0, 4), (0.7, 10), (1.3, 9), (2.5, 7), (0.5, 8), (4.8, 5), (1.0, 6)]
)
def test_number_of_samples_is_ceil_n_times_f(size, n):
    affine = np.diag([size, 1.0, 1.0, 1.0])
    result = resample_to_isotropic(np.ones((n, 2, 2)), affine)
    assert result.data.shape[0] == math.ceil(n * size)
    assert output_shape((n, 2, 2), (size, 1.0, 1.0)) == result.data.shape
    np.testing.assert_allclose(result.data, 1.0)  # a constant image stays constant


def test_new_affine_puts_every_sample_at_its_input_coordinate_in_world_space():
    sizes = np.array([3.2, 0.8, 1.7])
    affine = _affine(_rotation(25, 0) @ _rotation(-12, 1) @ np.diag(sizes))
    shape = (5, 9, 4)
    result = resample_to_isotropic(np.zeros(shape), affine)
    np.testing.assert_allclose(voxel_sizes(result.affine), [1.0, 1.0, 1.0], atol=1e-12)
    for axis in range(3):
        positions = sample_positions(shape[axis], sizes[axis])
        assert len(positions) == result.data.shape[axis]
        for k in (0, len(positions) // 2, len(positions) - 1):
            out_index = np.zeros(4)
            out_index[axis], out_index[3] = k, 1
            # Output index 0 along the other axes sits at their first sample position.
            in_index = np.array([sample_positions(shape[a], sizes[a])[0] for a in range(3)] + [1.0])
            in_index[axis] = positions[k]
            np.testing.assert_allclose(result.affine @ out_index, affine @ in_index, atol=1e-9)


def test_resampled_image_overlays_the_input_in_world_space():
    # A linear function of world coordinates is reproduced exactly by trilinear sampling
    # (no blur when every axis is upsampled), wherever samples fall inside the input grid.
    sizes = np.array([2.0, 3.0, 1.5])
    affine = _affine(_rotation(30, 2) @ np.diag(sizes))
    shape = (6, 5, 7)
    coeffs = np.array([0.3, -1.2, 0.7])
    data = _world(affine, shape) @ coeffs + 4.0
    result = resample_to_isotropic(data, affine)
    expected = _world(result.affine, result.data.shape) @ coeffs + 4.0
    inside = np.ones(result.data.shape, dtype=bool)
    for axis in range(3):
        pos = sample_positions(shape[axis], sizes[axis])
        ok = (pos >= 0) & (pos <= shape[axis] - 1)
        index = [np.newaxis] * 3
        index[axis] = slice(None)
        inside &= ok[tuple(index)]
    assert inside.sum() > 0.5 * inside.size
    np.testing.assert_allclose(result.data[inside], expected[inside], atol=1e-9)


def test_downsampling_blurs_with_sigma_quarter_over_f_and_samples_between_voxels():
    rng = np.random.default_rng(2)
    data = rng.random((12, 3, 3))
    result = resample_to_isotropic(data, np.diag([0.5, 1.0, 1.0, 1.0]))
    # f = 0.5: sigma = 0.5 input voxels; samples at 0.5 + 2k, i.e. halfway between voxels 2k and 2k+1.
    assert result.sigmas == (0.5, 0.0, 0.0)
    blurred = gaussian_filter1d(data, 0.5, axis=0, mode="reflect", truncate=4.0)
    expected = 0.5 * (blurred[0::2] + blurred[1::2])
    np.testing.assert_allclose(result.data, expected, atol=1e-12)
    np.testing.assert_allclose(antialias_sigmas([0.5, 2.0, 1.0]), [0.5, 0.0, 0.0])


def test_four_d_channels_are_resampled_like_separate_volumes():
    rng = np.random.default_rng(3)
    data = rng.random((5, 4, 3, 2))
    affine = _affine(np.diag([2.0, 0.6, 1.4]))
    both = resample_to_isotropic(data, affine)
    for c in range(2):
        single = resample_to_isotropic(data[..., c], affine)
        np.testing.assert_allclose(both.data[..., c], single.data, atol=1e-12)
        np.testing.assert_allclose(both.affine, single.affine)


def test_degenerate_affine_is_rejected_with_a_fix():
    affine = np.eye(4)
    affine[:, 1] = 0
    with pytest.raises(ValueError, match="header"):
        resample_to_isotropic(np.zeros((2, 2, 2)), affine)


def test_resample_to_grid_returns_the_native_grid_and_is_exact_for_linear_images(tmp_path):
    sizes = np.array([1.1, 0.9, 4.0])
    affine = _affine(np.diag(sizes) @ np.array([[-1.0, 0, 0], [0, 1, 0], [0, 0, 1]]))
    shape = (8, 9, 5)
    coeffs = np.array([0.5, 0.25, -0.125])
    native = _world(affine, shape) @ coeffs
    one_mm = resample_to_isotropic(native, affine)
    # Write and re-read the 1 mm image as the pipeline would.
    path = tmp_path / "one_mm.nii.gz"
    nib.save(nib.Nifti1Image(one_mm.data.astype(np.float32), one_mm.affine), path)
    img = nib.load(path)
    back = resample_to_grid(np.asarray(img.dataobj, dtype=np.float64), img.affine, shape, affine, order=1)
    assert back.shape == shape
    # Interior native voxels are bracketed by 1 mm samples that are themselves exact: equal.
    np.testing.assert_allclose(back[1:-1, 1:-1, 1:-1], native[1:-1, 1:-1, 1:-1], atol=1e-4)


def test_resample_to_grid_edges_and_outside():
    data = np.arange(4.0)[:, None, None] * np.ones((4, 2, 2))
    # Target grid shifted by fractions of a voxel along axis 0: -0.4 clamps to the edge,
    # -0.6 and 3.6 are more than half a voxel outside and get cval.
    target = np.eye(4)
    target[0, 0] = 0.2
    target[0, 3] = -0.6
    out = resample_to_grid(data, np.eye(4), (23, 2, 2), target, cval=-1.0)
    coords = -0.6 + 0.2 * np.arange(23)
    expected = np.where((coords >= -0.5) & (coords <= 3.5), np.clip(coords, 0, 3), -1.0)
    np.testing.assert_allclose(out[:, 0, 0], expected, atol=1e-12)


def test_resample_to_grid_with_spline_order_three_keeps_quadratics_close():
    x = np.arange(12.0)
    data = np.broadcast_to((x**2)[:, None, None], (12, 3, 3)).copy()
    target = np.eye(4)
    target[0, 3] = 0.5
    out = resample_to_grid(data, np.eye(4), (10, 3, 3), target, order=3)
    np.testing.assert_allclose(out[2:8, 1, 1], (np.arange(2, 8) + 0.5) ** 2, rtol=1e-3)
