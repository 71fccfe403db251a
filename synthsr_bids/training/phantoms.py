"""Procedural label-map phantoms (tests, demos, smoke runs without the real training maps).

A nested-ellipsoid "head" in RAS voxel order (axis 0 runs left -> right): scalp, skull, CSF,
left/right cortex and white matter, lateral ventricles, thalami, a midline 3rd ventricle and
brainstem. Uses FreeSurfer labels that are generation labels of the default label scheme.
"""

from __future__ import annotations

import numpy as np

__all__ = ["head_phantom"]


def _ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.indices(shape, dtype=np.float64)
    dist = sum(((grids[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return dist <= 1.0


def head_phantom(shape: tuple[int, int, int] = (48, 48, 48)) -> np.ndarray:
    """An ``int32`` label map of ``shape`` (each size >= 24) in RAS voxel order."""
    if min(shape) < 24:
        raise ValueError(f"head_phantom needs sizes >= 24, got {shape}")
    s = np.asarray(shape, dtype=np.float64)
    c = (s - 1) / 2
    out = np.zeros(shape, dtype=np.int32)
    out[_ellipsoid(shape, c, 0.48 * s)] = 507  # scalp / soft tissue
    out[_ellipsoid(shape, c, 0.43 * s)] = 515  # skull
    out[_ellipsoid(shape, c, 0.39 * s)] = 24  # CSF
    brain = _ellipsoid(shape, c, 0.36 * s)
    wm = _ellipsoid(shape, c, 0.27 * s)
    left = np.indices(shape)[0] < c[0]
    out[brain & left], out[brain & ~left] = 3, 42
    out[wm & left], out[wm & ~left] = 2, 41
    lo = np.round(c - 0.06 * s).astype(int)
    hi = np.round(c + 0.06 * s).astype(int)
    dx = int(round(0.12 * s[0]))
    # lateral ventricles and thalami, left (low x) and right (high x)
    out[lo[0] - dx:lo[0] - dx + 3, lo[1]:hi[1] + 4, c.astype(int)[2]:hi[2] + 3] = 4
    out[hi[0] + dx - 3:hi[0] + dx, lo[1]:hi[1] + 4, c.astype(int)[2]:hi[2] + 3] = 43
    out[lo[0] - dx + 1:lo[0], lo[1] - 4:lo[1], lo[2]:c.astype(int)[2]] = 10
    out[hi[0] + 1:hi[0] + dx, lo[1] - 4:lo[1], lo[2]:c.astype(int)[2]] = 49
    # midline: 3rd ventricle and brainstem
    mid = int(round(c[0]))
    out[mid - 1:mid + 1, lo[1]:hi[1], lo[2]:hi[2]] = 14
    out[mid - 2:mid + 2, lo[1]:hi[1], int(0.2 * s[2]):lo[2]] = 16
    return out
