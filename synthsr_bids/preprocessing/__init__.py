"""Pure image maths for the SynthSR pipeline (numpy/scipy/nibabel only, no torch)."""

from .intensity import (
    BoundingBox,
    Padding,
    clip_ct,
    crop_padding,
    foreground_bbox,
    minmax_normalise,
    minmax_range,
    pad_to_multiple,
    robust_threshold,
    unsharp_mask,
)
from .orientation import Reorientation, axcodes, reorient_to_ras, undo_reorientation
from .resample import Resampled, resample_to_grid, resample_to_isotropic, voxel_sizes

__all__ = [
    "BoundingBox",
    "Padding",
    "Reorientation",
    "Resampled",
    "axcodes",
    "clip_ct",
    "crop_padding",
    "foreground_bbox",
    "minmax_normalise",
    "minmax_range",
    "pad_to_multiple",
    "reorient_to_ras",
    "resample_to_grid",
    "resample_to_isotropic",
    "robust_threshold",
    "undo_reorientation",
    "unsharp_mask",
    "voxel_sizes",
]
