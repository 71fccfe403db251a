"""Acquisition model: slice profile, slice spacing and the linear upsampling back to 1 mm.

Every 1D linear operation along one axis (Gaussian blur, slice-profile sampling at the slice
positions, linear interpolation back to the 1 mm grid) is a small dense matrix applied to the
volume with one matrix product. Dense matrices handle edges exactly (rows are renormalised) and
cost ``n_out * n`` multiply-adds per line, a few ms for a 128^3 crop on one core. TorchIO's
``RandomAnisotropy`` was not used: it has no slice-thickness/profile parameter, supports one axis
and no oblique slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SLICE_PROFILE_SIGMA",
    "AxisAcquisition",
    "gaussian_matrix",
    "slice_sampling_matrix",
    "linear_upsampling_matrix",
    "apply_along_axis",
    "blur",
    "rotate_volume",
]

#: Gaussian slice profile: sigma = 0.42 x slice thickness (FWHM = thickness).
SLICE_PROFILE_SIGMA = 0.42


@dataclass(frozen=True)
class AxisAcquisition:
    """Acquisition along one axis: slice ``spacing`` and ``thickness`` (mm), first slice ``phase``."""

    spacing: float
    thickness: float
    phase: float = 0.0

    @property
    def is_high_res(self) -> bool:
        return self.spacing <= 1.0 + 1e-6

    def positions(self, n: int) -> list[float]:
        """Slice positions (in 1 mm voxel coordinates) covering ``[0, n - 1]``."""
        if self.is_high_res:
            return [float(i) for i in range(n)]
        count = int(math.floor((n - 1 - self.phase) / self.spacing)) + 1
        return [self.phase + k * self.spacing for k in range(max(count, 1))]


def _gaussian_rows(centres: Tensor, n: int, sigma: float) -> Tensor:
    grid = torch.arange(n, dtype=torch.float64)
    if sigma < 1e-3:
        # Degenerate profile: linear interpolation at the centres.
        weights = (1.0 - (grid[None, :] - centres[:, None]).abs()).clamp_min(0.0)
    else:
        weights = torch.exp(-0.5 * ((grid[None, :] - centres[:, None]) / sigma) ** 2)
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)


def gaussian_matrix(n: int, sigma: float) -> Tensor:
    """``(n, n)`` Gaussian blur along one axis (edges renormalised), float64."""
    return _gaussian_rows(torch.arange(n, dtype=torch.float64), n, sigma)


def slice_sampling_matrix(n: int, acq: AxisAcquisition) -> Tensor:
    """``(n_slices, n)``: each row is the slice profile (Gaussian, sigma 0.42 x thickness) of one slice."""
    centres = torch.tensor(acq.positions(n), dtype=torch.float64)
    return _gaussian_rows(centres, n, SLICE_PROFILE_SIGMA * acq.thickness)


def linear_upsampling_matrix(n: int, positions: list[float]) -> Tensor:
    """``(n, len(positions))`` linear interpolation from samples at ``positions`` onto ``0..n-1``.

    Outside the first/last slice the nearest slice is repeated.
    """
    pos = torch.tensor(positions, dtype=torch.float64)
    m = len(positions)
    out = torch.zeros(n, m, dtype=torch.float64)
    if m == 1:
        out[:, 0] = 1.0
        return out
    x = torch.arange(n, dtype=torch.float64).clamp(float(pos[0]), float(pos[-1]))
    k = torch.searchsorted(pos, x, right=True).clamp(1, m - 1) - 1
    t = ((x - pos[k]) / (pos[k + 1] - pos[k])).clamp(0.0, 1.0)
    rows = torch.arange(n)
    out[rows, k] = 1.0 - t
    out[rows, k + 1] += t
    return out


def apply_along_axis(volume: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """Apply ``matrix`` (``(m, n)``) along ``axis`` (0, 1 or 2) of a 3D ``volume`` (``n`` long there)."""
    matrix = matrix.to(device=volume.device, dtype=volume.dtype)
    moved = volume.movedim(axis, 0)
    shape = moved.shape
    out = (matrix @ moved.reshape(shape[0], -1)).reshape(matrix.shape[0], *shape[1:])
    return out.movedim(0, axis).contiguous()


def blur(volume: Tensor, sigmas: tuple[float, float, float]) -> Tensor:
    """Separable Gaussian blur of a 3D volume (sigma in voxels, 0 = untouched axis)."""
    for axis, sigma in enumerate(sigmas):
        if sigma > 0:
            volume = apply_along_axis(volume, gaussian_matrix(volume.shape[axis], sigma), axis)
    return volume


def rotate_volume(volume: Tensor, rotation: Tensor, out_shape: tuple[int, int, int], *, inverse: bool = False) -> Tensor:
    """Trilinear resampling of a 3D ``volume`` into a frame rotated about the common centre.

    Output voxel ``y`` (centred coordinates) reads ``volume`` at ``rotation @ y`` (or
    ``rotation.T @ y`` when ``inverse``). Outside points replicate the border.
    """
    rot = rotation.to(device=volume.device, dtype=torch.float32)
    if inverse:
        rot = rot.T
    axes = [torch.arange(s, device=volume.device, dtype=torch.float32) - (s - 1) / 2.0 for s in out_shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) @ rot.T
    half = torch.tensor([(s - 1) / 2.0 for s in volume.shape], device=volume.device, dtype=torch.float32)
    norm = coords / half.clamp_min(0.5)
    grid = norm.flip(-1)[None]
    return F.grid_sample(volume[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]
