"""Simple QC numbers of a synthetic T1w, and robust outlier flags across the group.

Per image (NaN when the ingredient is missing):

``fg_fraction``          fraction of the 1 mm field of view above 10% of the 99th percentile
                         (the head; very low or high values mean a cropped or noisy output)
``intensity_p99``        99th percentile inside that foreground (SynthSR white matter is ~110)
``saturated_fraction``   foreground fraction at SynthSR's ceiling (>= 127.5 of 128)
``wm_median``            median intensity in the segmented cerebral white matter
``cjv``                  coefficient of joint variation of white and grey matter,
                         ``(sd_wm + sd_gm) / |mean_wm - mean_gm|`` (MRIQC's; lower is better)
``segmented_volume_mm3`` volume of every non-background label
``lesion_volume_mm3``    volume of the lesion mask on the synthetic grid
``template_corr``        correlation with the template after registration (group level)

An image is flagged for a metric when it lies more than :data:`OUTLIER_Z` robust standard
deviations (``1.4826 MAD``, but at least :data:`RELATIVE_FLOOR` of the median's magnitude, so
that sub-percent differences in a very homogeneous group are not flagged) from the group
median (with at least :data:`MIN_GROUP` values), or when ``template_corr`` is below
:data:`MIN_TEMPLATE_CORRELATION`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

OUTLIER_Z = 3.5
MIN_GROUP = 5
RELATIVE_FLOOR = 0.02
MIN_TEMPLATE_CORRELATION = 0.5
SATURATION = 127.5
WHITE_MATTER = (2, 41)
GREY_MATTER = (3, 42)

#: Metrics checked for outliers (lower/upper tails both count).
OUTLIER_METRICS = (
    "fg_fraction", "intensity_p99", "saturated_fraction", "wm_median", "cjv", "segmented_volume_mm3",
    "template_corr", "runtime_s",
)


def image_metrics(image: np.ndarray, dseg: np.ndarray | None = None, voxel_mm3: float = 1.0) -> dict[str, float]:
    """QC numbers of one synthetic image (and its segmentation, same grid)."""
    data = np.nan_to_num(np.asarray(image, dtype=np.float64))
    positive = data[data > 0]
    p99 = float(np.percentile(positive, 99)) if positive.size else 0.0
    foreground = data > 0.1 * p99 if p99 > 0 else np.zeros(data.shape, dtype=bool)
    values = data[foreground]
    metrics = {
        "fg_fraction": float(foreground.mean()) if data.size else math.nan,
        "intensity_p99": float(np.percentile(values, 99)) if values.size else math.nan,
        "saturated_fraction": float((values >= SATURATION).mean()) if values.size else math.nan,
        "wm_median": math.nan,
        "cjv": math.nan,
        "segmented_volume_mm3": math.nan,
    }
    if dseg is not None:
        labels = np.asarray(dseg)
        if labels.shape != data.shape:
            raise ValueError(f"segmentation shape {labels.shape} differs from the image's {data.shape}")
        wm = data[np.isin(labels, WHITE_MATTER)]
        gm = data[np.isin(labels, GREY_MATTER)]
        metrics["segmented_volume_mm3"] = float((labels > 0).sum()) * voxel_mm3
        if wm.size:
            metrics["wm_median"] = float(np.median(wm))
        if wm.size > 1 and gm.size > 1 and wm.mean() != gm.mean():
            metrics["cjv"] = float((wm.std() + gm.std()) / abs(wm.mean() - gm.mean()))
    return metrics


def robust_z(values: Sequence[float]) -> np.ndarray:
    """``(x - median) / max(1.4826 MAD, RELATIVE_FLOOR |median|)`` over the finite values (NaN
    elsewhere, and everywhere when there are fewer than :data:`MIN_GROUP` values or the scale
    is 0)."""
    array = np.asarray(values, dtype=np.float64)
    out = np.full(array.shape, np.nan)
    finite = np.isfinite(array)
    if finite.sum() < MIN_GROUP:
        return out
    median = float(np.median(array[finite]))
    scale = max(1.4826 * float(np.median(np.abs(array[finite] - median))), RELATIVE_FLOOR * abs(median))
    if scale <= 0:
        return out
    out[finite] = (array[finite] - median) / scale
    return out


def outlier_flags(rows: Sequence[Mapping[str, float]], metrics: Sequence[str] = OUTLIER_METRICS) -> list[list[str]]:
    """Per row, the metrics that flag it (see the module docstring)."""
    flags: list[list[str]] = [[] for _ in rows]
    for metric in metrics:
        z = robust_z([float(row.get(metric, math.nan)) for row in rows])
        for index, value in enumerate(z):
            if np.isfinite(value) and abs(value) > OUTLIER_Z:
                flags[index].append(f"{metric}{'+' if value > 0 else '-'}")
    for index, row in enumerate(rows):
        corr = float(row.get("template_corr", math.nan))
        if math.isfinite(corr) and corr < MIN_TEMPLATE_CORRELATION and "template_corr-" not in flags[index]:
            flags[index].append("template_corr<%.1f" % MIN_TEMPLATE_CORRELATION)
    return flags
