"""Thick-slice degradation of a high-resolution volume (pure numpy/scipy).

Along the slice axis the volume is averaged over each slice's profile, one slice every
``spacing`` mm. Two profiles (:data:`SLICE_PROFILES`):

* ``box`` (default): the mean over the slab ``centre +- thickness / 2``, as a 2D multi-slice
  acquisition's near-rectangular profile (:func:`box_profile_matrix`). Each input voxel counts
  as a box of its own width, so a voxel cut by a slab edge gets the fraction it covers.
* ``gaussian``: the training generator's model (``training/resolution.py``), a Gaussian with
  ``sigma = 0.42 x thickness`` (FWHM = thickness). It is blurrier than a real slice: variance
  0.18 T^2 against T^2 / 12 = 0.083 T^2 for the box (4.4 against 2.1 mm^2 at 5 mm).

The result is a :class:`~.volume.Volume` whose affine has ``spacing`` mm voxels along that
axis, so the pipeline's own resampling to 1 mm is exercised.

Slice centres sit on whole input voxels (when the spacing is a whole number of voxels): the
pipeline's 1 mm output grid then coincides with the input grid (no half-voxel shift).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage

from .volume import Volume

__all__ = [
    "SLICE_PROFILE_SIGMA",
    "SLICE_PROFILES",
    "DEFAULT_SLICE_PROFILE",
    "SliceProfile",
    "WORLD_AXES",
    "slice_axis",
    "box_profile_matrix",
    "thick_slices",
]

SliceProfile = Literal["box", "gaussian"]
SLICE_PROFILES: tuple[SliceProfile, ...] = ("box", "gaussian")
DEFAULT_SLICE_PROFILE: SliceProfile = "box"

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


def box_profile_matrix(positions: np.ndarray, thickness: float, n: int) -> np.ndarray:
    """``(len(positions), n)`` weights of rectangular slices over ``n`` voxels (voxel units).

    Slice ``j`` covers ``[positions[j] - thickness / 2, positions[j] + thickness / 2]``; voxel ``k``
    covers ``[k - 1/2, k + 1/2]`` (the first and last voxels extend to infinity: the edge value is
    repeated beyond the array, like the Gaussian's ``mode="nearest"``). A weight is the length
    of the overlap over ``thickness``, so every row sums to 1. Discretisation: when the slab's edges
    fall on voxel boundaries the weights are uniform and their variance is ``(thickness^2 - 1) / 12``,
    the slab's ``thickness^2 / 12`` minus a voxel's own ``1 / 12``; for other thicknesses and
    centres it lies within ``[-1/12, +0.18]`` voxel^2 of ``thickness^2 / 12``.
    """
    if not thickness > 0:
        raise ValueError(f"thickness must be positive, got {thickness}")
    centres = np.asarray(positions, dtype=np.float64)[:, None]
    k = np.arange(n, dtype=np.float64)
    left, right = k - 0.5, k + 0.5
    left[0], right[-1] = -np.inf, np.inf
    low, high = centres - thickness / 2.0, centres + thickness / 2.0
    overlap = np.clip(np.minimum(high, right) - np.maximum(low, left), 0.0, None)
    return overlap / thickness


def thick_slices(volume: Volume, *, axis: int, spacing_mm: float = 5.0, thickness_mm: float | None = None,
                 profile: SliceProfile = DEFAULT_SLICE_PROFILE) -> Volume:
    """Simulate a thick-slice acquisition of ``volume`` along voxel ``axis``.

    Args:
        volume: the high-resolution image.
        axis: voxel axis across the slices (see :func:`slice_axis`).
        spacing_mm: distance between slice centres.
        thickness_mm: slice thickness (default: ``spacing_mm``).
        profile: ``"box"`` (mean over the slab) or ``"gaussian"`` (sigma 0.42 x thickness, the
            training generator's); see the module docstring.

    Returns:
        The slices as a volume with ``spacing_mm`` voxels along ``axis``, centred in the field of
        view (first centre rounded down to a whole input voxel when the spacing is whole voxels).
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    thickness_mm = spacing_mm if thickness_mm is None else thickness_mm
    if not spacing_mm > 0 or not thickness_mm > 0:
        raise ValueError(f"spacing and thickness must be positive, got {spacing_mm}, {thickness_mm}")
    if profile not in SLICE_PROFILES:
        raise ValueError(f"unknown slice profile {profile!r}; use one of {SLICE_PROFILES}")
    affine = np.asarray(volume.affine, dtype=np.float64)
    voxel = float(np.linalg.norm(affine[:3, axis]))
    step = spacing_mm / voxel
    data = np.asarray(volume.data, dtype=np.float64)

    n = data.shape[axis]
    count = int(math.floor((n - 1) / step + 1e-9)) + 1
    first = ((n - 1) - (count - 1) * step) / 2.0
    if abs(step - round(step)) < 1e-6:
        first = float(math.floor(first + 1e-9))
    positions = first + step * np.arange(count, dtype=np.float64)
    if profile == "box":
        weights = box_profile_matrix(positions, thickness_mm / voxel, n)
        slices = np.moveaxis(np.tensordot(weights, data, axes=([1], [axis])), 0, axis)
    else:
        sigma = SLICE_PROFILE_SIGMA * thickness_mm / voxel
        blurred = ndimage.gaussian_filter1d(data, sigma, axis=axis, mode="nearest", truncate=4.0)
        slices = _sample_along(blurred, positions, axis)

    new_affine = affine.copy()
    new_affine[:3, axis] = affine[:3, axis] * step
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, axis] * first
    return Volume(slices, new_affine)
