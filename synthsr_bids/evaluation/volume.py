"""A 3D image on its grid (``data`` + voxel-to-world ``affine``) and moving images between grids."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from synthsr_bids.preprocessing.resample import resample_to_grid, voxel_sizes

__all__ = ["Volume", "same_grid", "resample_onto"]


@dataclass(frozen=True, eq=False)
class Volume:
    """A NIfTI-like image: 3D ``data`` and its 4x4 voxel-to-world (RAS mm) ``affine``."""

    data: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        if np.ndim(self.data) != 3:
            raise ValueError(f"Volume data must be 3D, got shape {np.shape(self.data)}")
        if np.shape(self.affine) != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got shape {np.shape(self.affine)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel sizes (mm)."""
        return tuple(float(z) for z in voxel_sizes(self.affine))  # type: ignore[return-value]


def same_grid(shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray,
              *, atol: float = 1e-4) -> bool:
    """True when both grids have the same shape and (within ``atol`` mm) the same affine."""
    return tuple(shape_a[:3]) == tuple(shape_b[:3]) and bool(np.allclose(affine_a, affine_b, atol=atol))


def resample_onto(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], target_affine: np.ndarray,
                  *, order: int = 1) -> np.ndarray:
    """``data`` (on ``affine``) on the grid ``shape``/``target_affine``, float64.

    Same grid: a copy. Otherwise :func:`~synthsr_bids.preprocessing.resample.resample_to_grid`
    (spline of ``order``; 1 = trilinear, 3 = cubic; edge values within half a source voxel
    outside the source grid, 0 further out).
    """
    if same_grid(np.shape(data), affine, shape, target_affine):
        return np.array(data, dtype=np.float64, copy=True)
    return resample_to_grid(data, affine, shape, target_affine, order=order)
