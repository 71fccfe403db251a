"""Exact reorientation to RAS (axis permutations and flips only, no interpolation).

``mri_synthsr`` aligns the resampled volume to the identity affine (RAS) with its
own ``get_ras_axes``/``align_volume_to_ref`` before the network, so that the
network always sees the same anatomical axis order and the left-right flip is a
flip of the first axis. Here the same is done with nibabel's orientation
utilities (``io_orientation`` picks, for each voxel axis, the closest world
axis). For non-oblique and mildly oblique images both choose the same axes; for
images oblique by about 45 degrees the two methods may pick a different (equally
valid) permutation.

The :class:`Reorientation` returned by :func:`reorient_to_ras` keeps what is
needed to put a RAS-ordered array back into the input's voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import (
    aff2axcodes,
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

__all__ = ["Reorientation", "reorient_to_ras", "undo_reorientation", "axcodes"]

_RAS = axcodes2ornt(("R", "A", "S"))


@dataclass(frozen=True, eq=False)
class Reorientation:
    """How an array was permuted/flipped into RAS.

    Attributes:
        to_ras: nibabel orientation transform (3x2) from the input axes to RAS.
        from_ras: its inverse (RAS axes back to the input axes).
        input_shape: spatial shape of the input array (input voxel order).
        input_axcodes: axis codes of the input, e.g. ``("L", "I", "A")``.
    """

    to_ras: np.ndarray
    from_ras: np.ndarray
    input_shape: tuple[int, int, int]
    input_axcodes: tuple[str, str, str]

    @property
    def is_identity(self) -> bool:
        """True when the input is already RAS-ordered."""
        return bool(np.array_equal(self.to_ras, _identity_ornt()))


def _identity_ornt() -> np.ndarray:
    return np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """Closest anatomical axis codes of an affine (e.g. ``("L", "A", "S")``)."""
    return tuple(aff2axcodes(np.asarray(affine, dtype=np.float64)))  # type: ignore[return-value]


def reorient_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, Reorientation]:
    """Permute/flip the first three axes of ``data`` into RAS order.

    Returns the reoriented array (a view when possible), its affine (which maps the
    new voxels to the same world points) and the :class:`Reorientation` to undo it.
    Extra trailing axes (channels) are carried along unchanged.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim < 3:
        raise ValueError(f"expected at least 3 dimensions, got shape {data.shape}")
    ornt = io_orientation(affine)
    if np.any(np.isnan(ornt)):
        raise ValueError(
            "the affine does not define a valid orientation (a voxel axis has no direction); "
            "fix the image header (qform/sform)"
        )
    to_ras = ornt_transform(ornt, _RAS)
    from_ras = ornt_transform(_RAS, ornt)
    shape = tuple(int(s) for s in data.shape[:3])
    out = apply_orientation(data, to_ras)
    new_affine = affine @ inv_ornt_aff(to_ras, shape)
    info = Reorientation(
        to_ras=to_ras,
        from_ras=from_ras,
        input_shape=shape,  # type: ignore[arg-type]
        input_axcodes=axcodes(affine),
    )
    return out, new_affine, info


def undo_reorientation(data_ras: np.ndarray, reorientation: Reorientation) -> np.ndarray:
    """Put a RAS-ordered array (same grid as produced by :func:`reorient_to_ras`) back in input voxel order."""
    out = apply_orientation(data_ras, reorientation.from_ras)
    if tuple(out.shape[:3]) != reorientation.input_shape:
        raise ValueError(
            f"array of shape {data_ras.shape[:3]} does not come from an input of shape {reorientation.input_shape}"
        )
    return out
