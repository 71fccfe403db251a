"""Baselines the model is compared with: interpolation, optionally with an oracle intensity mapping.

* ``trilinear`` / ``cubic``: the input resampled onto the reference grid
  (:func:`~synthsr_bids.preprocessing.resample.resample_to_grid`, spline order 1 / 3).
  An input already on the reference grid is returned unchanged by both (one array, scored once).
  The synthetic inputs are such inputs, but there the input itself is the generator's linear
  upsampling of its thick slices (as the network sees them in training): there is no separate
  cubic one, so the evaluation asks for no cubic baselines (``cubic=False``) rather than
  reporting a copy of the trilinear one under that name.
* ``trilinear+map`` / ``cubic+map``: the same, then a **monotone intensity mapping fitted on
  the reference inside the brain mask** (:func:`fit_monotone_mapping`: weighted isotonic
  regression of reference intensities on 256 quantile bins of the input, increasing or
  decreasing, whichever fits better). Fitting on the reference is an *oracle* advantage the
  model does not have: these rows bound what any intensity-remapping of the upsampled input
  can achieve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .volume import Volume, resample_onto, same_grid

__all__ = [
    "BASELINES",
    "MonotoneMapping",
    "isotonic_regression",
    "fit_monotone_mapping",
    "upsample",
    "baseline_predictions",
]

#: Baseline names, in table order.
BASELINES = ("trilinear", "cubic", "trilinear+map", "cubic+map")
_ORDERS = {"trilinear": 1, "cubic": 3}


@dataclass(frozen=True, eq=False)
class MonotoneMapping:
    """Piecewise-linear monotone map through ``(knots_x, knots_y)`` (constant beyond the ends)."""

    knots_x: np.ndarray
    knots_y: np.ndarray
    increasing: bool

    def __call__(self, data: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(data, dtype=np.float64), self.knots_x, self.knots_y)


def isotonic_regression(values: np.ndarray, weights: np.ndarray | None = None, *, increasing: bool = True) -> np.ndarray:
    """Weighted least-squares monotone fit of the sequence ``values`` (pool adjacent violators)."""
    y = np.asarray(values, dtype=np.float64)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64)
    if y.shape != w.shape or y.ndim != 1:
        raise ValueError(f"values and weights must be 1D of equal length, got {y.shape} and {w.shape}")
    if not increasing:
        y = -y
    means: list[float] = []
    totals: list[float] = []
    counts: list[int] = []
    for value, weight in zip(y, w, strict=True):
        means.append(float(value))
        totals.append(float(weight))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, c2 = means.pop(), totals.pop(), counts.pop()
            m1, w1 = means[-1], totals[-1]
            total = w1 + w2
            means[-1] = (m1 * w1 + m2 * w2) / total if total > 0 else 0.5 * (m1 + m2)
            totals[-1] = total
            counts[-1] += c2
    out = np.repeat(np.asarray(means), counts)
    return out if increasing else -out


def fit_monotone_mapping(
    source: np.ndarray, reference: np.ndarray, mask: np.ndarray, *, n_bins: int = 256
) -> MonotoneMapping:
    """Monotone map from ``source`` intensities to ``reference`` intensities inside ``mask``.

    Voxels are grouped into ``n_bins`` quantile bins of ``source``; the mean reference value
    of each bin is fitted by weighted isotonic regression (bin sizes as weights), increasing
    and decreasing; the direction with the smaller squared error wins. Knots are the bins'
    mean source values.
    """
    mask = np.asarray(mask, dtype=bool)
    x = np.asarray(source, dtype=np.float64)[mask]
    y = np.asarray(reference, dtype=np.float64)[mask]
    if x.size < 2:
        raise ValueError("the mask needs at least 2 voxels to fit an intensity mapping")
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)))
    if len(edges) < 2:  # constant source: map everything to the reference mean
        return MonotoneMapping(np.array([x[0], x[0] + 1.0]), np.full(2, y.mean()), True)
    bins = np.searchsorted(edges[1:-1], x, side="right")
    counts = np.bincount(bins, minlength=len(edges) - 1).astype(np.float64)
    keep = counts > 0
    counts = counts[keep]
    mean_x = np.bincount(bins, weights=x, minlength=len(edges) - 1)[keep] / counts
    mean_y = np.bincount(bins, weights=y, minlength=len(edges) - 1)[keep] / counts
    best: MonotoneMapping | None = None
    best_error = np.inf
    for increasing in (True, False):
        fitted = isotonic_regression(mean_y, counts, increasing=increasing)
        error = float(np.sum(counts * (mean_y - fitted) ** 2))
        if error < best_error:
            best, best_error = MonotoneMapping(mean_x, fitted, increasing), error
    assert best is not None
    if len(best.knots_x) == 1:
        return MonotoneMapping(np.array([mean_x[0], mean_x[0] + 1.0]), np.repeat(best.knots_y, 2), True)
    return best


def upsample(volume: Volume, shape: Sequence[int], affine: np.ndarray, *, order: int) -> np.ndarray:
    """``volume`` on the grid ``shape``/``affine`` with a spline of ``order`` (1 trilinear, 3 cubic)."""
    return resample_onto(volume.data, volume.affine, shape, affine, order=order)


def baseline_predictions(source: Volume, reference: Volume, mask: np.ndarray, *,
                         cubic: bool = True) -> dict[str, np.ndarray]:
    """The baselines of :data:`BASELINES` on the reference grid (``mask`` selects the mapping's voxels).

    ``cubic=False``: the trilinear ones only (``trilinear``, ``trilinear+map``).
    """
    orders = {name: order for name, order in _ORDERS.items() if cubic or name != "cubic"}
    out: dict[str, np.ndarray] = {}
    if same_grid(source.shape, source.affine, reference.shape, reference.affine):
        # Every interpolation is the input itself: one array under each name (scored once).
        data = np.asarray(source.data, dtype=np.float64)
        out.update((name, data) for name in orders)
    else:
        for name, order in orders.items():
            out[name] = upsample(source, reference.shape, reference.affine, order=order)
    for name in orders:
        mapped = f"{name}+map"
        if name == "cubic" and out["cubic"] is out["trilinear"]:
            out[mapped] = out["trilinear+map"]
            continue
        out[mapped] = fit_monotone_mapping(out[name], reference.data, mask)(out[name])
    return {name: out[name] for name in BASELINES if name in out}
