"""The "flat reference" ceiling: what a perfect model of the generator's T1 rendering would score.

The network is trained on synthetic targets only: every tissue class is rendered as a constant
(its T1 prior mean) and the volume is blurred by ``target_blur`` voxels
(:class:`~synthsr_bids.training.generator.GeneratorConfig`). A real T1 has texture, partial volume
and intra-tissue contrast such a rendering cannot have, so even a perfect model of the generator
cannot reach r = 1 against a real T1. This module measures how far it can get:

1. the reference's brain voxels are split into :data:`FLAT_CLASSES` intensity classes by
   one-dimensional k-means (:func:`kmeans_1d`; CSF, grey matter, white matter for a T1);
2. every voxel takes its class mean (the best constant for that class, i.e. an oracle contrast);
3. the result is blurred like the generator's target.

Scored like a prediction, it says how much of the distance between a model and the real T1 is
due to the synthetic targets (the ceiling's shortfall) and how much is left to the network
(the gap between the model and the ceiling). It uses the reference, so it is an oracle, and it is
only meaningful against a real image: a synthetic reference is already such a rendering.

Hand-written rather than taken from scikit-learn (not a dependency): Lloyd's algorithm in one
dimension is a sort of the centres and a ``searchsorted`` per iteration.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CEILING", "FLAT_CLASSES", "kmeans_1d", "flat_reference"]

#: Method name of the ceiling in the evaluation's tables.
CEILING = "flat reference"
#: Tissue classes of the flat rendering (CSF, grey matter, white matter).
FLAT_CLASSES = 3


def _lloyd(values: np.ndarray, centres: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray, float]:
    tolerance = 1e-9 * max(1.0, float(np.ptp(values)))
    k = centres.size
    for _ in range(iterations):
        centres = np.sort(centres)
        classes = np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
        counts = np.bincount(classes, minlength=k)
        sums = np.bincount(classes, weights=values, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        converged = np.allclose(updated, centres, rtol=0.0, atol=tolerance)
        centres = updated
        if converged:
            break
    centres = np.sort(centres)
    classes = np.searchsorted((centres[1:] + centres[:-1]) / 2, values)
    return centres, classes, float(np.sum((values - centres[classes]) ** 2))


def kmeans_1d(values: np.ndarray, k: int, *, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of 1-D ``values``: (sorted centres ``(k,)``, class index of every value).

    Two deterministic starts, the better (lower within-class sum of squares) kept: centres at the
    ``(2i + 1) / 2k`` quantiles (good for balanced classes) and evenly spaced between the minimum
    and the maximum (good when one class is small, e.g. little CSF). A class that empties keeps
    its previous centre.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if values.size == 0:
        raise ValueError("k-means of an empty array")
    fractions = (2 * np.arange(k) + 1) / (2 * k)
    low, high = values.min(), values.max()
    starts = (np.quantile(values, fractions), low + fractions * (high - low))
    best = min((_lloyd(values, start, iterations) for start in starts), key=lambda result: result[2])
    return best[0], best[1]


def flat_reference(reference: np.ndarray, mask: np.ndarray, *, classes: int = FLAT_CLASSES,
                   blur_voxels: float | None = None) -> np.ndarray:
    """``reference`` rendered like a training target: class means inside ``mask``, 0 outside, blurred.

    ``blur_voxels`` defaults to the training generator's ``target_blur``.
    """
    from scipy import ndimage

    if blur_voxels is None:
        from synthsr_bids.training.generator import GeneratorConfig

        blur_voxels = GeneratorConfig().target_blur
    reference = np.asarray(reference, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} != reference shape {reference.shape}")
    flat = np.zeros_like(reference)
    if mask.any():
        centres, labels = kmeans_1d(reference[mask], classes)
        flat[mask] = centres[labels]
    return ndimage.gaussian_filter(flat, blur_voxels) if blur_voxels > 0 else flat
