"""Padding, normalisation, CT window, unsharp masking and bounding boxes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from synthsr_bids.preprocessing.intensity import (
    BoundingBox,
    clip_ct,
    crop_padding,
    foreground_bbox,
    minmax_normalise,
    minmax_range,
    pad_to_multiple,
    robust_threshold,
    unsharp_mask,
)


def test_padding_margins_follow_mri_synthsr():
    data = np.arange(33 * 64 * 1, dtype=float).reshape(33, 64, 1) + 1.0
    padded, padding = pad_to_multiple(data, multiple=32)
    assert padded.shape == (64, 64, 32)
    # low margin floor((W - n) / 2), the rest at the high end
    assert padding.before == (15, 0, 15)
    assert padding.after == (16, 0, 16)
    np.testing.assert_array_equal(padded[15:48, :, 15:16], data)
    assert padded.sum() == data.sum()  # everything else is zero
    assert padded[14].max() == 0 and padded[48].max() == 0 and padded[:, :, 16].max() == 0
    np.testing.assert_array_equal(crop_padding(padded, padding), data)


def test_no_padding_when_already_a_multiple_and_channels_are_not_padded():
    data = np.ones((32, 64, 96, 2))
    padded, padding = pad_to_multiple(data, multiple=32)
    assert padded is data
    assert not padding.any
    padded, padding = pad_to_multiple(np.ones((31, 32, 32, 2)), multiple=32)
    assert padded.shape == (32, 32, 32, 2)
    assert padding.before == (0, 0, 0) and padding.after == (1, 0, 0)


def test_minmax_normalise_maps_the_range_onto_unit_interval():
    data = np.array([[[-2.0, 0.0], [3.0, 8.0]]])
    out = minmax_normalise(data)
    np.testing.assert_allclose(out, [[[0.0, 0.2], [0.5, 1.0]]])
    out = minmax_normalise(data, value_range=(-2.0, 18.0))
    np.testing.assert_allclose(out, [[[0.0, 0.1], [0.25, 0.5]]])
    assert minmax_range(np.array([2.0, 5.0])) == (2.0, 5.0)
    assert minmax_range(np.array([2.0, 5.0]), include_zero=True) == (0.0, 5.0)
    assert minmax_range(np.array([-3.0, -1.0]), include_zero=True) == (-3.0, 0.0)


def test_constant_or_non_finite_images_are_refused():
    with pytest.raises(ValueError, match="constant"):
        minmax_normalise(np.full((2, 2, 2), 7.0))
    with pytest.raises(ValueError, match="NaN"):
        minmax_range(np.array([1.0, np.nan]))


def test_ct_window_clips_to_0_80():
    data = np.array([-1000.0, -1.0, 0.0, 40.0, 80.0, 81.0, 3000.0])
    np.testing.assert_array_equal(clip_ct(data), [0, 0, 0, 40, 80, 80, 80])
    np.testing.assert_array_equal(clip_ct(data, low=-10, high=10), [-10, -1, 0, 10, 10, 10, 10])


def test_unsharp_mask_matches_scipy_gaussian():
    rng = np.random.default_rng(0)
    data = rng.random((9, 8, 7)).astype(np.float32) * 100
    out = unsharp_mask(data)
    expected = data + 1.0 * (data - gaussian_filter(data, 1.5))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    doubled = unsharp_mask(data.astype(np.float64), sigma=0.8, amount=2.0)
    np.testing.assert_allclose(doubled, data + 2.0 * (data - gaussian_filter(data.astype(np.float64), 0.8)))
    # A constant image has nothing to sharpen.
    np.testing.assert_allclose(unsharp_mask(np.full((5, 5, 5), 3.0)), 3.0)
    np.testing.assert_array_equal(unsharp_mask(data, amount=0.0), data)


def test_bounding_box_of_a_mask_and_crop_uncrop_round_trip():
    mask = np.zeros((10, 12, 14), dtype=bool)
    mask[2:5, 3, 7:11] = True
    box = foreground_bbox(mask)
    assert box == BoundingBox((2, 3, 7), (5, 4, 11))
    assert box.shape == (3, 1, 4)
    data = np.random.default_rng(1).random((10, 12, 14, 2))
    cropped = box.crop(data)
    assert cropped.shape == (3, 1, 4, 2)
    restored = box.uncrop(cropped, data.shape[:3], fill=-1.0)
    assert restored.shape == data.shape
    np.testing.assert_array_equal(restored[box.slices], data[box.slices])
    outside = np.ones((10, 12, 14), dtype=bool)
    outside[box.slices] = False
    assert np.all(restored[outside] == -1.0)
    assert foreground_bbox(np.zeros((3, 3, 3), dtype=bool)) is None


def test_box_expand_and_align_keep_the_pooling_grid():
    box = BoundingBox((20, 3, 40), (50, 60, 41))
    grown = box.expand(5, (64, 64, 64))
    assert grown == BoundingBox((15, 0, 35), (55, 64, 46))
    aligned = grown.align(16, (64, 64, 64))
    assert aligned == BoundingBox((0, 0, 32), (64, 64, 48))
    assert all(s % 16 == 0 for s in aligned.start + aligned.stop)
    with pytest.raises(ValueError):
        BoundingBox((3, 0, 0), (3, 1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        box.uncrop(np.zeros((2, 2, 2)), (64, 64, 64))


def test_robust_threshold_ignores_a_few_hot_voxels():
    data = np.zeros((20, 20, 20))
    data[5:15, 5:15, 5:15] = 100.0
    data[0, 0, 0] = 1e6  # one hot voxel
    assert robust_threshold(data) == pytest.approx(10.0)
