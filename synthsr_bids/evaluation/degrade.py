"""Thick-slice degradation of a high-resolution volume (pure numpy/scipy).

The acquisition model is the training generator's (``training/resolution.py``): a Gaussian
slice profile with ``sigma = 0.42 x thickness`` (FWHM = thickness) along the slice axis, then
one sample every ``spacing`` mm. The result is a :class:`~.volume.Volume` whose affine has
``spacing`` mm voxels along that axis, so the pipeline's own resampling to 1 mm is exercised.

Slice centres sit on whole input voxels (when the spacing is a whole number of voxels): the
pipeline's 1 mm output grid then coincides with the input grid (no half-voxel shift).
"""

from __future__ import annotations

import math

import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage

from .volume import Volume

__all__ = ["SLICE_PROFILE_SIGMA", "WORLD_AXES", "slice_axis", "thick_slices"]

#: Same as ``synthsr_bids.training.resolution.SLICE_PROFILE_SIGMA`` (not imported: that module needs torch).
SLICE_PROFILE_SIGMA = 0.42
#: Slice orientation -> the world (RAS) axis the slices are thick along.
WORLD_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


def slice_axis(affine: np.ndarray, orientation: str) -> int:
    """The voxel axis closest to the world axis that ``orientation`` slices are thick along."""
    if orientation not in WORLD_AXES:
        raise ValueError(f"unknown slice orientation {orientation!r}; use one of {sorted(WORLD_AXES)}")
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    matches = np.flatnonzero(ornt[:, 0] == WORLD_AXES[orientation])
    if not len(matches):
        raise ValueError(f"no voxel axis matches the {orientation} slice direction of affine {affine!r}")
    return int(matches[0])


def _sample_along(data: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` at ``positions`` (input voxel coordinates, clamped)."""
    n = data.shape[axis]
    pos = np.clip(positions, 0.0, n - 1)
    lower = np.minimum(np.floor(pos).astype(np.intp), max(n - 2, 0))
    weight = (pos - lower).reshape([-1 if a == axis else 1 for a in range(data.ndim)])
    below = np.take(data, lower, axis=axis)
    if n == 1:
        return below
    above = np.take(data, lower + 1, axis=axis)
    return below + weight * (above - below)


def thick_slices(volume: Volume, *, axis: int, spacing_mm: float = 5.0, thickness_mm: float | None = None) -> Volume:
    """Simulate a thick-slice acquisition of ``volume`` along voxel ``axis``.

    Args:
        volume: the high-resolution image.
        axis: voxel axis across the slices (see :func:`slice_axis`).
        spacing_mm: distance between slice centres.
        thickness_mm: slice thickness (default: ``spacing_mm``); the profile is Gaussian with
            ``sigma = 0.42 x thickness``.

    Returns:
        The slices as a volume with ``spacing_mm`` voxels along ``axis``, centred in the field of
        view (first centre rounded down to a whole input voxel when the spacing is whole voxels).
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    thickness_mm = spacing_mm if thickness_mm is None else thickness_mm
    if not spacing_mm > 0 or not thickness_mm > 0:
        raise ValueError(f"spacing and thickness must be positive, got {spacing_mm}, {thickness_mm}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    voxel = float(np.linalg.norm(affine[:3, axis]))
    step = spacing_mm / voxel
    sigma = SLICE_PROFILE_SIGMA * thickness_mm / voxel
    data = np.asarray(volume.data, dtype=np.float64)
    blurred = ndimage.gaussian_filter1d(data, sigma, axis=axis, mode="nearest", truncate=4.0)

    n = data.shape[axis]
    count = int(math.floor((n - 1) / step + 1e-9)) + 1
    first = ((n - 1) - (count - 1) * step) / 2.0
    if abs(step - round(step)) < 1e-6:
        first = float(math.floor(first + 1e-9))
    positions = first + step * np.arange(count, dtype=np.float64)
    slices = _sample_along(blurred, positions, axis)

    new_affine = affine.copy()
    new_affine[:3, axis] = affine[:3, axis] * step
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * first
    return Volume(slices, new_affine)
