"""Intensity maths and crop/pad bookkeeping for the SynthSR pipeline (numpy/scipy only).

Matches ``mri_synthsr``: CT intensities are clipped to [0, 80] HU, the volume is
zero-padded to a multiple of 32 voxels (low margin ``floor((W - n) / 2)``), then
min-max normalised to [0, 1] *over the padded volume* (so padding zeros take part
in the minimum), and the final prediction is sharpened with an unsharp mask
``pred + amount * (pred - G_sigma(pred))`` (``sigma = 1.5`` voxels, ``amount = 1``,
scipy ``gaussian_filter`` defaults: ``mode="reflect"``, ``truncate=4``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "BoundingBox",
    "Padding",
    "clip_ct",
    "pad_to_multiple",
    "crop_padding",
    "minmax_range",
    "minmax_normalise",
    "unsharp_mask",
    "foreground_bbox",
    "robust_threshold",
]


def clip_ct(data: np.ndarray, *, low: float = 0.0, high: float = 80.0) -> np.ndarray:
    """Clip CT Hounsfield units to the brain window ``[low, high]`` (mri_synthsr ``--ct``)."""
    return np.clip(data, low, high)


@dataclass(frozen=True)
class Padding:
    """Zero padding added to the first three axes: ``before[i]`` and ``after[i]`` voxels."""

    before: tuple[int, int, int]
    after: tuple[int, int, int]

    @property
    def any(self) -> bool:
        return any(self.before) or any(self.after)

    def slices(self, padded_shape: Sequence[int]) -> tuple[slice, slice, slice]:
        """Slices that select the original region inside a padded array of ``padded_shape``."""
        return tuple(
            slice(b, int(n) - a) for b, a, n in zip(self.before, self.after, padded_shape[:3], strict=True)
        )  # type: ignore[return-value]


def pad_to_multiple(data: np.ndarray, *, multiple: int = 32, value: float = 0.0) -> tuple[np.ndarray, Padding]:
    """Pad the first three axes up to the next multiple of ``multiple``.

    The low margin is ``floor((W - n) / 2)`` and the high margin the rest, as in
    ``mri_synthsr``. Trailing (channel) axes are not padded.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    shape = np.asarray(data.shape[:3])
    target = (np.ceil(shape / multiple) * multiple).astype(int)
    before = (target - shape) // 2
    after = target - shape - before
    padding = Padding(tuple(int(b) for b in before), tuple(int(a) for a in after))  # type: ignore[arg-type]
    if not padding.any:
        return data, padding
    widths = [(int(b), int(a)) for b, a in zip(before, after)] + [(0, 0)] * (data.ndim - 3)
    return np.pad(data, widths, mode="constant", constant_values=value), padding


def crop_padding(data: np.ndarray, padding: Padding) -> np.ndarray:
    """Remove the padding added by :func:`pad_to_multiple` (a view)."""
    return data[padding.slices(data.shape)]


def minmax_range(data: np.ndarray, *, include_zero: bool = False) -> tuple[float, float]:
    """``(min, max)`` of ``data``; with ``include_zero`` the range also covers 0 (zero padding)."""
    low, high = float(np.min(data)), float(np.max(data))
    if include_zero:
        low, high = min(low, 0.0), max(high, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("the image contains NaN or infinite values; fix or mask them before synthesis")
    return low, high


#: share of the voxels allowed above the clipping level of :func:`clip_extreme_intensities`
OUTLIER_PERCENTILE = 99.9
#: below this share of the min-max range the bulk of the image (all but its brightest 0.1 %) is squeezed
OUTLIER_RANGE_SHARE = 0.1


def clip_extreme_intensities(data: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Clip a few extreme voxels that would squeeze the image under min-max normalisation.

    The network sees the image min-max normalised (as mri_synthsr's). When all but the brightest
    0.1 % of the voxels above the image's minimum (the background is left out, so that a small
    object in a large empty field of view counts as a whole) lie in the lowest tenth of the range
    (a few hot voxels from a conversion error, a spike), the anatomy ends up nearly black; those
    voxels are then clipped at that 99.9th percentile. Ordinary bright tissue (fat, vessels, bone)
    fills far more than 0.1 % of a head, so ordinary images are returned unchanged. Returns the data
    and a note (None: unchanged).
    """
    low, high = float(np.min(data)), float(np.max(data))
    foreground = data[data > low]
    level = float(np.percentile(foreground, OUTLIER_PERCENTILE)) if foreground.size else low
    # level == low: more than 99.9 % of the image is one value (a sparse mask?): clipping would erase it
    if not level > low or (level - low) >= OUTLIER_RANGE_SHARE * (high - low):
        return data, None
    n_clipped = int(np.count_nonzero(data > level))
    note = (f"{n_clipped} extreme voxels (up to {high:.6g}; 99.9 % of the voxels above the minimum are at most "
            f"{level:.6g}) were "
            f"clipped to {level:.6g}: min-max normalisation would have squeezed the anatomy into "
            f"{100 * (level - low) / (high - low):.2g} % of the intensity range")
    return np.minimum(data, level), note


def minmax_normalise(data: np.ndarray, *, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map ``value_range`` (default: the data's own min/max) linearly onto [0, 1]."""
    low, high = minmax_range(data) if value_range is None else value_range
    if not high > low:
        raise ValueError(
            f"the image is constant (all voxels = {low}); there is nothing to synthesise from it"
        )
    out = np.subtract(data, low, dtype=np.float64)
    out /= high - low
    return out


def unsharp_mask(data: np.ndarray, *, sigma: float = 1.5, amount: float = 1.0) -> np.ndarray:
    """``data + amount * (data - G_sigma(data))`` with scipy's ``gaussian_filter`` (reflect, truncate 4)."""
    if sigma <= 0 or amount == 0:
        return np.array(data, copy=True)
    blurred = ndimage.gaussian_filter(data, sigma, mode="reflect", truncate=4.0)
    out = np.subtract(data, blurred, dtype=blurred.dtype)
    out *= amount
    out += data
    return out


@dataclass(frozen=True)
class BoundingBox:
    """Half-open box ``[start, stop)`` over the first three axes."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    def __post_init__(self) -> None:
        if any(b < 0 or e <= b for b, e in zip(self.start, self.stop, strict=True)):
            raise ValueError(f"invalid bounding box start={self.start} stop={self.stop}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(e - b for b, e in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(b, e) for b, e in zip(self.start, self.stop))  # type: ignore[return-value]

    def crop(self, data: np.ndarray) -> np.ndarray:
        """The box's content (a view)."""
        return data[self.slices]

    def uncrop(self, data: np.ndarray, full_shape: Sequence[int], *, fill: float = 0.0) -> np.ndarray:
        """Place ``data`` (the box's content) into a new array of ``full_shape`` filled with ``fill``."""
        if tuple(data.shape[:3]) != self.shape:
            raise ValueError(f"data of shape {data.shape[:3]} does not fit a box of shape {self.shape}")
        out = np.full(tuple(full_shape[:3]) + tuple(data.shape[3:]), fill, dtype=data.dtype)
        out[self.slices] = data
        return out

    def expand(self, margin: int | Sequence[int], shape: Sequence[int]) -> "BoundingBox":
        """Grow by ``margin`` voxels on each side, clipped to ``shape``."""
        margins = [int(margin)] * 3 if np.isscalar(margin) else [int(m) for m in margin]  # type: ignore[arg-type]
        return BoundingBox(
            tuple(max(0, b - m) for b, m in zip(self.start, margins)),  # type: ignore[arg-type]
            tuple(min(int(n), e + m) for e, m, n in zip(self.stop, margins, shape[:3])),  # type: ignore[arg-type]
        )

    def align(self, multiple: int, shape: Sequence[int]) -> "BoundingBox":
        """Snap start down and stop up to multiples of ``multiple`` (stop clipped to ``shape``).

        When ``shape`` is itself a multiple of ``multiple``, the aligned box keeps a
        pooling grid identical to the full array's.
        """
        start = tuple((b // multiple) * multiple for b in self.start)
        stop = tuple(min(int(n), -(-e // multiple) * multiple) for e, n in zip(self.stop, shape[:3]))
        return BoundingBox(start, stop)  # type: ignore[arg-type]


def foreground_bbox(mask: np.ndarray) -> BoundingBox | None:
    """Tight bounding box of the True voxels of a 3D mask (``None`` when the mask is empty)."""
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D mask, got shape {mask.shape}")
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        if hits.size == 0:
            return None
        start.append(int(hits[0]))
        stop.append(int(hits[-1]) + 1)
    return BoundingBox(tuple(start), tuple(stop))  # type: ignore[arg-type]


def robust_threshold(data: np.ndarray, *, fraction: float = 0.1, percentile: float = 99.5) -> float:
    """Intensity threshold ``min + fraction * (P_percentile - min)`` separating head from background.

    The percentile (instead of the maximum) keeps a few hot voxels from raising it.
    """
    low = float(np.min(data))
    high = float(np.percentile(data, percentile))
    if not high > low:
        high = float(np.max(data))
    return low + fraction * (high - low)
