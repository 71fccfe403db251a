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
deviations from the group median (with at least :data:`MIN_GROUP` values), or when
``template_corr`` is below :data:`MIN_TEMPLATE_CORRELATION`. The robust standard deviation is
``1.4826 MAD``, but at least :data:`RELATIVE_FLOOR` of the median's magnitude (so that
sub-percent differences in a very homogeneous group are not flagged) and at least the metric's
:data:`ABSOLUTE_FLOOR` (so that a group whose median is 0, e.g. no saturated voxel in most
images, still flags a clear outlier, while differences below the floor's scale do not).

The per-structure volumes and asymmetry indices of the group report are scored the same way
(:func:`column_outliers`) with :data:`VOLUME_FLOOR_MM3` and :data:`ASYMMETRY_FLOOR`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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

#: Smallest robust standard deviation per metric, in the metric's units. An outlier must lie
#: more than ``OUTLIER_Z`` times this from the median, whatever the group's spread:
#:
#: - ``fg_fraction`` 0.01: one percent of the field of view (heads differ by several percent);
#: - ``intensity_p99``, ``wm_median`` 1.0: one intensity unit of SynthSR's 0-128 scale
#:   (white matter is about 110), below what a reader can see;
#: - ``saturated_fraction`` 0.01: one percent of the head; a few voxels at the ceiling (fat,
#:   vessels) are normal, while more than 3.5 % of the head at the ceiling is flagged even when
#:   the group median is 0;
#: - ``cjv`` 0.01: about 2 % of a typical CJV (0.4-0.7);
#: - ``segmented_volume_mm3`` 1000: one millilitre, 0.1 % of a brain, below segmentation noise;
#: - ``template_corr`` 0.01: one hundredth of a correlation;
#: - ``runtime_s`` 1.0: one second, the jitter of timing on a shared machine.
ABSOLUTE_FLOOR: Mapping[str, float] = {
    "fg_fraction": 0.01,
    "intensity_p99": 1.0,
    "saturated_fraction": 0.01,
    "wm_median": 1.0,
    "cjv": 0.01,
    "segmented_volume_mm3": 1000.0,
    "template_corr": 0.01,
    "runtime_s": 1.0,
}
#: Smallest robust standard deviation of a structure's volume: 10 mm³, ten 1 mm voxels (the
#: segmentation's own uncertainty at a structure's border).
VOLUME_FLOOR_MM3 = 10.0
#: Smallest robust standard deviation of an asymmetry index 2(L-R)/(L+R): 0.01 (1 %; healthy
#: asymmetries are a few percent).
ASYMMETRY_FLOOR = 0.01


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


def robust_z(values: Sequence[float], floor: float = 0.0) -> np.ndarray:
    """``(x - median) / max(1.4826 MAD, RELATIVE_FLOOR |median|, floor)`` over the finite values
    (NaN elsewhere, and everywhere when there are fewer than :data:`MIN_GROUP` values or the
    scale is 0)."""
    array = np.asarray(values, dtype=np.float64)
    out = np.full(array.shape, np.nan)
    finite = np.isfinite(array)
    if finite.sum() < MIN_GROUP:
        return out
    median = float(np.median(array[finite]))
    scale = max(1.4826 * float(np.median(np.abs(array[finite] - median))), RELATIVE_FLOOR * abs(median), floor)
    if scale <= 0:
        return out
    out[finite] = (array[finite] - median) / scale
    return out


def outlier_flags(rows: Sequence[Mapping[str, float]], metrics: Sequence[str] = OUTLIER_METRICS) -> list[list[str]]:
    """Per row, the metrics that flag it (see the module docstring): ``<metric>+`` above the
    median, ``<metric>-`` below, ``template_corr<0.5`` for the correlation rule."""
    flags: list[list[str]] = [[] for _ in rows]
    for metric in metrics:
        for outlier in column_outliers(rows, [metric], ABSOLUTE_FLOOR.get(metric, 0.0)):
            flags[outlier.row].append(f"{metric}{'+' if outlier.z > 0 else '-'}")
    for index, row in enumerate(rows):
        corr = float(row.get("template_corr", math.nan))
        if math.isfinite(corr) and corr < MIN_TEMPLATE_CORRELATION and "template_corr-" not in flags[index]:
            flags[index].append("template_corr<%.1f" % MIN_TEMPLATE_CORRELATION)
    return flags


def flagged_metrics(flags: Sequence[str] | None) -> set[str]:
    """The metric names in one row's :func:`outlier_flags` (``"cjv+"`` -> ``"cjv"``,
    ``"template_corr<0.5"`` -> ``"template_corr"``)."""
    names = set()
    for flag in flags or ():
        flag = flag.strip()
        if "<" in flag:
            names.add(flag.split("<", 1)[0])
        elif flag.endswith(("+", "-")):
            names.add(flag[:-1])
        elif flag:
            names.add(flag)
    return names


@dataclass(frozen=True)
class Outlier:
    """One outlying value of a table column."""

    row: int
    column: str
    value: float
    median: float
    z: float

    @property
    def direction(self) -> str:
        return "above" if self.z > 0 else "below"


def column_outliers(rows: Sequence[Mapping[str, float]], columns: Sequence[str], floor: float = 0.0) -> list[Outlier]:
    """Values more than :data:`OUTLIER_Z` robust standard deviations (:func:`robust_z` with
    ``floor``) from their column's median, column by column in ``columns`` order, rows in order."""
    found = []
    for column in columns:
        values = np.array([float(row.get(column, math.nan)) for row in rows], dtype=np.float64)
        z = robust_z(values, floor)
        finite = np.isfinite(values)
        median = float(np.median(values[finite])) if finite.any() else math.nan
        for index in np.flatnonzero(np.isfinite(z) & (np.abs(z) > OUTLIER_Z)):
            found.append(Outlier(int(index), column, float(values[index]), median, float(z[index])))
    return found
