"""Image-similarity and lesion-inpainting metrics (pure numpy/scipy; every function takes arrays).

Definitions (also in ``benchmarks/README.md``):

* **Linear fit.** ``a, b = argmin sum_mask (a x + b - reference)^2``: the prediction ``x`` is
  put into the reference's intensity units before SSIM and MAE (a synthetic T1w has arbitrary
  units; so do the baselines).
* **r**: Pearson correlation of prediction and reference inside the mask (the linear fit only
  changes its sign, so the signed r of the raw prediction is reported).
* **SSIM**: 3D SSIM (Wang et al. 2004) with a Gaussian window (sigma 1.5 voxels, truncated at
  3.5 sigma), computed inside the mask only: local means, variances and the covariance are
  mask-weighted (normalised convolution, voxels outside the mask have weight 0), the SSIM map
  is averaged over the mask. ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2`` with ``L`` the reference's
  robust range.
* **MAE**: mean absolute error after the linear fit, in units of the reference's robust range
  (``L`` = 99th minus 1st percentile of the reference inside the brain mask); 0.05 = 5 %.
* **Lesion contrast**: an image expressed relative to normal-appearing white matter (NAWM) is
  ``image / mean(image in NAWM)``; its lesion contrast is ``c = mean(that in the lesion) - 1``
  (signed: > 0 brighter than NAWM, < 0 darker).
* **Lesion removed**: ``removed = 1 - |c_pred - c_healthy| / |c_src|`` (:func:`removed_fraction`)
  with ``c_src`` the input's contrast, ``c_pred`` the prediction's and ``c_healthy`` the contrast
  a lesion-free T1 has there: 0 against a real patient's T1 (healthy tissue looks like NAWM),
  the reference's own ``c_ref`` when the reference is healthy by construction (synthetic cases:
  partial volume and blur of small lesions then cancel out, and the reference itself scores 1).
  1 = inpainted, 0 = as much contrast left as in the input, < 0 = more. The distance is
  unsigned on purpose: a FLAIR-bright lesion rendered *dark* in a T1 is a lesion still shown,
  not "more than removed". Undefined (NaN) when ``|c_src| <`` :data:`MIN_SOURCE_CONTRAST`: a
  lesion barely visible in the input gives a ratio dominated by noise and partial volume.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "SSIM_SIGMA",
    "MIN_SOURCE_CONTRAST",
    "ImageMetrics",
    "LesionContrast",
    "linear_fit",
    "apply_fit",
    "robust_range",
    "pearson",
    "ssim",
    "mae",
    "image_metrics",
    "relative_contrast",
    "removed_fraction",
    "lesion_contrast",
    "nawm_mask",
    "bright_tissue_mask",
]

#: Gaussian window of SSIM (voxels), as Wang et al. 2004 and scikit-image's ``gaussian_weights``.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
#: Below this lesion contrast (magnitude) in the input, relative to NAWM, "removed" is undefined: the ratio then
#: swings with small blur or partial-volume differences (two evaluation cases at 0.05 and 0.11 moved by 0.1-0.2
#: for a one-voxel blur of the perfect reference under the earlier, signed score).
MIN_SOURCE_CONTRAST = 0.1


def _masked(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x)
    if mask is None:
        return x.astype(np.float64, copy=False).ravel()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {x.shape}")
    return x[mask].astype(np.float64, copy=False)


def linear_fit(prediction: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """Least-squares ``(a, b)`` so that ``a * prediction + b`` matches ``reference`` inside ``mask``.

    A constant prediction gets ``a = 0`` and ``b = mean(reference)``.
    """
    x, y = _masked(prediction, mask), _masked(reference, mask)
    if x.size < 2:
        raise ValueError(f"the mask has {x.size} voxel(s); at least 2 are needed for a linear fit")
    dx = x - x.mean()
    var = float(np.dot(dx, dx))
    a = float(np.dot(dx, y - y.mean()) / var) if var > 0 else 0.0
    return a, float(y.mean() - a * x.mean())


def apply_fit(prediction: np.ndarray, fit: tuple[float, float]) -> np.ndarray:
    a, b = fit
    return np.asarray(prediction, dtype=np.float64) * a + b


def robust_range(reference: np.ndarray, mask: np.ndarray | None = None,
                 percentiles: tuple[float, float] = (1.0, 99.0)) -> float:
    """``P_high - P_low`` of ``reference`` inside ``mask`` (falls back to max - min, then 1)."""
    y = _masked(reference, mask)
    if y.size == 0:
        raise ValueError("the mask is empty")
    low, high = np.percentile(y, percentiles)
    if high > low:
        return float(high - low)
    span = float(y.max() - y.min())
    return span if span > 0 else 1.0


def pearson(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation inside ``mask`` (NaN when either image is constant there)."""
    a, b = _masked(x, mask), _masked(y, mask)
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(np.dot(da, da)) * float(np.dot(db, db)))
    return float(np.dot(da, db) / denom) if denom > 0 else float("nan")


def mae(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute difference inside ``mask`` (in the images' units)."""
    return float(np.mean(np.abs(_masked(x, mask) - _masked(y, mask))))


def ssim(
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    data_range: float,
    sigma: float = SSIM_SIGMA,
    truncate: float = SSIM_TRUNCATE,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean 3D SSIM of ``x`` and ``y`` over ``mask`` with mask-weighted Gaussian local statistics.

    At voxel ``v``, with weights ``w_u = G(v - u) m_u`` (``m`` = mask, ``G`` the Gaussian window):
    ``mu_x = sum w x / sum w``, ``var_x = sum w x^2 / sum w - mu_x^2``, ``cov = sum w x y / sum w
    - mu_x mu_y`` and ``SSIM = (2 mu_x mu_y + C1)(2 cov + C2) / ((mu_x^2 + mu_y^2 + C1)(var_x +
    var_y + C2))``. Without a mask every voxel counts (zero padding outside the array is
    excluded the same way).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    m = np.ones(x.shape, dtype=np.float64) if mask is None else np.asarray(mask, dtype=np.float64)
    if m.shape != x.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {x.shape}")
    inside = m > 0
    if not inside.any():
        raise ValueError("the mask is empty")

    def smooth(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma, mode="constant", cval=0.0, truncate=truncate)[inside]

    weight = smooth(m)
    xm, ym = x * m, y * m
    mu_x, mu_y = smooth(xm) / weight, smooth(ym) / weight
    var_x = smooth(xm * x) / weight - mu_x * mu_x
    var_y = smooth(ym * y) / weight - mu_y * mu_y
    cov = smooth(xm * y) / weight - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return float(np.mean(numerator / denominator))


@dataclass(frozen=True)
class ImageMetrics:
    """Similarity of a prediction to the reference in one region (see the module docstring)."""

    r: float
    ssim: float
    mae: float  #: after the linear fit, in units of the reference's robust range
    fit_slope: float
    fit_intercept: float
    voxels: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def image_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    mask: np.ndarray,
    *,
    value_range: float | None = None,
) -> ImageMetrics:
    """r, SSIM and MAE of ``prediction`` against ``reference`` inside ``mask``, after a linear fit.

    ``value_range`` is the SSIM ``L`` and the MAE unit (default: :func:`robust_range` of the
    reference inside ``mask``; pass the brain's range to compare sub-regions on one scale).
    """
    mask = np.asarray(mask, dtype=bool)
    scale = robust_range(reference, mask) if value_range is None else float(value_range)
    fit = linear_fit(prediction, reference, mask)
    fitted = apply_fit(prediction, fit)
    return ImageMetrics(
        r=pearson(prediction, reference, mask),
        ssim=ssim(fitted, reference, mask, data_range=scale),
        mae=mae(fitted, reference, mask) / scale,
        fit_slope=fit[0],
        fit_intercept=fit[1],
        voxels=int(mask.sum()),
    )


@dataclass(frozen=True)
class LesionContrast:
    """Signed lesion contrasts relative to NAWM and the fraction removed (module docstring)."""

    source: float  #: c_src: mean(input / NAWM mean of input, in lesion) - 1
    prediction: float  #: c_pred: the same for the prediction
    reference: float  #: c_ref: the same for the reference (NaN when not given)
    healthy: float  #: c_healthy: what a lesion-free T1 shows there (0, or c_ref for a healthy reference)
    left: float  #: |c_pred - c_healthy| / |c_src| (NaN when |c_src| < MIN_SOURCE_CONTRAST)
    removed: float  #: 1 - left
    lesion_voxels: int
    nawm_voxels: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def relative_contrast(image: np.ndarray, lesion: np.ndarray, nawm: np.ndarray) -> float:
    """``mean(image in lesion) / mean(image in NAWM) - 1`` (NaN if a region is empty or NAWM <= 0)."""
    lesion, nawm = np.asarray(lesion, dtype=bool), np.asarray(nawm, dtype=bool)
    if not lesion.any() or not nawm.any():
        return float("nan")
    reference = float(np.mean(image[nawm], dtype=np.float64))
    if not reference > 0:
        return float("nan")
    return float(np.mean(image[lesion], dtype=np.float64)) / reference - 1.0


def removed_fraction(source: float, prediction: float, healthy: float = 0.0) -> float:
    """``1 - |prediction - healthy| / |source|`` for signed contrasts (NaN when ``|source|`` is too small)."""
    if not abs(source) >= MIN_SOURCE_CONTRAST:  # also NaN
        return float("nan")
    return 1.0 - abs(prediction - healthy) / abs(source)


def lesion_contrast(
    prediction: np.ndarray,
    source: np.ndarray,
    lesion: np.ndarray,
    nawm: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    healthy_reference: bool = False,
) -> LesionContrast:
    """How much of the input's (``source``) lesion contrast ``prediction`` removed.

    ``reference``: the ground truth, for its contrast ``c_ref`` (reported). ``healthy_reference``:
    the reference has no lesions by construction, so ``c_healthy = c_ref`` (requires
    ``reference``); otherwise ``c_healthy = 0``. Every image must be on the masks' grid (the input
    after upsampling onto the reference grid).
    """
    if healthy_reference and reference is None:
        raise ValueError("healthy_reference needs the reference image")
    c_source = relative_contrast(source, lesion, nawm)
    c_pred = relative_contrast(prediction, lesion, nawm)
    c_ref = float("nan") if reference is None else relative_contrast(reference, lesion, nawm)
    c_healthy = c_ref if healthy_reference else 0.0
    removed = removed_fraction(c_source, c_pred, c_healthy)
    return LesionContrast(source=c_source, prediction=c_pred, reference=c_ref, healthy=c_healthy,
                          left=1.0 - removed, removed=removed,
                          lesion_voxels=int(np.count_nonzero(lesion)), nawm_voxels=int(np.count_nonzero(nawm)))


def _dilate(mask: np.ndarray, voxels: int) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    return ndimage.binary_dilation(mask, iterations=voxels) if voxels > 0 and mask.any() else mask


def nawm_mask(white_matter: np.ndarray, lesion: np.ndarray, *, dilation: int = 2) -> np.ndarray:
    """White matter outside the lesions dilated by ``dilation`` voxels (6-connected steps)."""
    return np.asarray(white_matter, dtype=bool) & ~_dilate(lesion, dilation)


def bright_tissue_mask(t1: np.ndarray, brain: np.ndarray, *, percentile: float = 80.0) -> np.ndarray:
    """White matter from a T1w without labels: brain voxels above the ``percentile`` of the brain."""
    brain = np.asarray(brain, dtype=bool)
    threshold = np.percentile(np.asarray(t1)[brain], percentile)
    return brain & (np.asarray(t1) > threshold)
