"""Spatial part of the generative model: random affine + diffeomorphic deformation, crop, flip.

Hand-written rather than taken from TorchIO/cornucopia (both measured here on 96^3-128^3 crops
of the training maps, one core): TorchIO's ``RandomElasticDeformation`` is a B-spline (not a
stationary velocity field), runs per subject through SimpleITK and cost 0.4-1.0 s; cornucopia's
``RandomAffineElasticTransform`` cost 2-6 s. Here the whole transform is *one* coordinate map
from the output crop to the source label map, so:

* the velocity field lives on a coarse grid (node spacing ``svf_spacing`` mm) and is integrated
  by scaling and squaring on a grid ``integration_factor`` times coarser than the crop, then
  upsampled (trilinear) to the crop - the field is smooth, so this loses nothing visible;
* labels are read with *one* nearest-neighbour gather per sample, directly from the ``uint8``
  index map (no one-hot, no float copy of the 256^3 map): only crop-sized tensors are built.

Coordinates are voxel indices (1 mm) with the channel order of the tensor dimensions (D, H, W).
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "rotation_matrix",
    "affine_matrix",
    "integrate_velocity",
    "identity_coordinates",
    "gather_nearest",
    "to_grid_sample",
]


def rotation_matrix(angles_rad: Tensor) -> Tensor:
    """``R = Rz @ Ry @ Rx`` for ``angles_rad = (ax, ay, az)`` (rotations about axes 0, 1, 2)."""
    ax, ay, az = (angles_rad[i] for i in range(3))
    one, zero = torch.ones((), dtype=angles_rad.dtype), torch.zeros((), dtype=angles_rad.dtype)
    rx = torch.stack([one, zero, zero, zero, ax.cos(), -ax.sin(), zero, ax.sin(), ax.cos()]).view(3, 3)
    ry = torch.stack([ay.cos(), zero, ay.sin(), zero, one, zero, -ay.sin(), zero, ay.cos()]).view(3, 3)
    rz = torch.stack([az.cos(), -az.sin(), zero, az.sin(), az.cos(), zero, zero, zero, one]).view(3, 3)
    return rz @ ry @ rx


def affine_matrix(scales: Tensor, angles_deg: Tensor, shears: Tensor) -> Tensor:
    """``R @ Sh @ S``: 3x3 float64 linear part of the random affine (maps output mm to source mm).

    ``shears`` holds the three off-diagonal terms (01, 02, 12) of an upper-triangular shear.
    """
    s = torch.diag(scales.to(torch.float64))
    sh = torch.eye(3, dtype=torch.float64)
    sh[0, 1], sh[0, 2], sh[1, 2] = shears.to(torch.float64)
    r = rotation_matrix(angles_deg.to(torch.float64) * (math.pi / 180.0))
    return r @ sh @ s


def to_grid_sample(disp: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Voxel displacement ``(N, 3, D, H, W)`` -> normalised ``grid_sample`` offsets ``(N, D, H, W, 3)``.

    ``align_corners=True`` convention on a grid of ``shape`` voxels; the last dimension is in
    grid_sample's (W, H, D) order.
    """
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], dtype=disp.dtype, device=disp.device)
    return (disp * scale.view(1, 3, 1, 1, 1)).permute(0, 2, 3, 4, 1).flip(-1)


def _identity_grid(shape: tuple[int, int, int], *, device: torch.device, dtype: torch.dtype) -> Tensor:
    axes = [torch.linspace(-1.0, 1.0, s, device=device, dtype=dtype) if s > 1 else torch.zeros(1, device=device, dtype=dtype)
            for s in shape]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([w, h, d], dim=-1)[None]


def integrate_velocity(velocity: Tensor, *, steps: int = 7, spacing: float | tuple[float, float, float] = 1.0) -> Tensor:
    """Scaling and squaring of a stationary velocity field.

    Args:
        velocity: ``(N, 3, d, h, w)`` velocity in mm, on a grid whose nodes are ``spacing`` mm apart.
        steps: number of squarings (the field is divided by ``2**steps`` first).
        spacing: node spacing in mm of the grid ``velocity`` lives on (one value or one per axis).

    Returns:
        The displacement (mm) of the time-1 flow, same grid.
    """
    shape = tuple(int(s) for s in velocity.shape[2:])
    spacings = (float(spacing),) * 3 if isinstance(spacing, (int, float)) else tuple(float(s) for s in spacing)
    per_mm = torch.tensor([1.0 / s for s in spacings], dtype=velocity.dtype, device=velocity.device).view(1, 3, 1, 1, 1)
    disp = velocity / (2.0**steps)
    ident = _identity_grid(shape, device=velocity.device, dtype=velocity.dtype)  # type: ignore[arg-type]
    for _ in range(steps):
        grid = ident + to_grid_sample(disp * per_mm, shape)  # type: ignore[arg-type]
        disp = disp + F.grid_sample(disp, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return disp


def identity_coordinates(shape: tuple[int, int, int], *, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(D, H, W, 3)`` voxel coordinates centred on the crop centre."""
    axes = [torch.arange(s, device=device, dtype=dtype) - (s - 1) / 2.0 for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def gather_nearest(volume: Tensor, coords: Tensor) -> Tensor:
    """Nearest-neighbour read of ``volume`` (3D, any dtype) at voxel ``coords`` (``(..., 3)``).

    Points outside the volume read 0. One flat gather: no float copy of ``volume``.
    """
    size = torch.tensor(volume.shape, device=coords.device)
    idx = torch.round(coords).to(torch.int64)
    inside = ((idx >= 0) & (idx < size)).all(dim=-1)
    idx = torch.minimum(idx.clamp_min(0), size - 1)
    flat = (idx[..., 0] * volume.shape[1] + idx[..., 1]) * volume.shape[2] + idx[..., 2]
    out = volume.reshape(-1)[flat.reshape(-1)].view(coords.shape[:-1])
    return torch.where(inside, out, torch.zeros((), dtype=volume.dtype, device=volume.device))
