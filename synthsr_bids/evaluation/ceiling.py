"""The "flat 3-class reference": the real T1 rendered roughly like a training target.

The network is trained on synthetic targets only: every label is rendered as a constant (its
T1 prior mean) and the volume is blurred by ``target_blur`` voxels
(:class:`~synthsr_bids.training.generator.GeneratorConfig`). This module renders the real
reference in a similar flat style:

1. the reference's brain voxels are split into :data:`FLAT_CLASSES` intensity classes by
   one-dimensional k-means (:func:`kmeans_1d`; CSF, grey matter, white matter for a T1);
2. every voxel takes its class mean (the best constant for that class: an oracle contrast);
3. the result is blurred like the generator's target.

Scored like a prediction, it shows how a flat, piecewise-constant T1 compares with the real one.
It is **not an upper bound** on what a model of the generator can score: the training targets
have a dozen distinct values in the brain (one per label group), not 3, and the score depends
heavily on the number of classes (patient07, r / SSIM: 0.965 / 0.873 with 3 classes, 0.978 /
0.914 with 4, 0.986 / 0.950 with 6). It uses the reference, so it is an oracle, and it is only
meaningful against a real image: a synthetic reference already is a flat rendering.

Its JSON key stays ``"flat reference"`` (:data:`FLAT_REFERENCE`) for compatibility; tables call it
"flat 3-class reference". (This module's name, ``ceiling``, is historical: it is not a bound.)

Hand-written rather than taken from scikit-learn (not a dependency): Lloyd's algorithm in one
dimension is a sort of the centres and a ``searchsorted`` per iteration.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FLAT_REFERENCE", "FLAT_CLASSES", "kmeans_1d", "flat_reference"]

#: Method name (JSON key) of the flat 3-class reference.
FLAT_REFERENCE = "flat reference"
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
