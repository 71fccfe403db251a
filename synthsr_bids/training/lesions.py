"""Synthetic pathology painted into the *input* image only (the target keeps healthy anatomy).

Three kinds, each a mask on the output crop plus intensities:

* white-matter plaques (MS-like): thresholded smooth random field inside cerebral white matter,
  one random intensity per sample;
* stroke cavities: an irregular ellipsoid in cerebral tissue filled with CSF-like fluid (the
  current contrast's CSF class mean and std);
* tumours: a heterogeneous core (two random intensities mixed by a smooth field, optionally a
  fluid-like necrotic centre) and an oedema rim that spreads along white matter. The tumour's
  mass effect is a radial displacement of the *anatomy* (see :func:`mass_effect_offsets`), applied
  to labels, input and target alike, so the target stays aligned with the input.

Intensities are drawn relative to ``scale`` (the brightest class mean of the sample), so the
same code works for 0-255 MR contrasts and 0-80 HU CT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .intensity import smooth_random_field
from .rng import RandomSource

__all__ = [
    "LesionTables",
    "TumourShape",
    "plaque_mask",
    "blob_mask",
    "pick_voxel",
    "sample_tumour",
    "mass_effect_offsets",
    "paint_plaques",
    "paint_stroke",
    "paint_tumour",
]


@dataclass(frozen=True, eq=False)
class LesionTables:
    """Boolean lookup tables (generation label index -> membership) used to place lesions."""

    white_matter: Tensor  #: cerebral white matter
    cerebral_tissue: Tensor  #: cerebral white matter and cortex
    brain: Tensor  #: non-background, non-extra-cerebral labels other than CSF spaces

    def to(self, device: torch.device) -> LesionTables:
        return LesionTables(self.white_matter.to(device), self.cerebral_tissue.to(device), self.brain.to(device))


def pick_voxel(mask: Tensor, rng: RandomSource) -> tuple[int, int, int] | None:
    """A random voxel of ``mask`` (None when it is empty)."""
    flat = torch.nonzero(mask.reshape(-1)).view(-1)
    if flat.numel() == 0:
        return None
    i = int(flat[rng.randint(flat.numel())])
    _, h, w = mask.shape
    return (i // (h * w), (i // w) % h, i % w)


def _ellipsoid_distance(shape: tuple[int, int, int], centre: tuple[int, int, int], radii: tuple[float, float, float],
                        device: torch.device) -> Tensor:
    """Normalised ellipsoidal distance ``sqrt(sum(((x - c) / r)^2))`` on the crop."""
    axes = [((torch.arange(s, device=device, dtype=torch.float32) - c) / r) ** 2
            for s, c, r in zip(shape, centre, radii, strict=True)]
    return torch.sqrt(axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :])


def blob_mask(
    shape: tuple[int, int, int],
    centre: tuple[int, int, int],
    radii: tuple[float, float, float],
    *,
    roughness: float,
    rng: RandomSource,
) -> Tensor:
    """Irregular ellipsoid: normalised distance + smooth noise (std ``roughness``) below 1."""
    dist = _ellipsoid_distance(shape, centre, radii, rng.device)
    if roughness > 0:
        dist = dist + smooth_random_field(shape, spacing_mm=max(3.0, min(radii) / 2), std=roughness, rng=rng)
    return dist < 1.0


def plaque_mask(label_idx: Tensor, tables: LesionTables, *, rng: RandomSource) -> Tensor:
    """MS-like plaques: blobs of a thresholded smooth random field, inside cerebral white matter."""
    shape = tuple(label_idx.shape)
    spacing = rng.uniform(4.0, 9.0)
    threshold = rng.uniform(2.0, 3.0)
    field = smooth_random_field(shape, spacing_mm=spacing, std=1.0, rng=rng)  # type: ignore[arg-type]
    return (field > threshold) & tables.white_matter[label_idx.long()]


def mass_effect_offsets(coords: Tensor, centre: Tensor, *, radius: float, strength: float) -> Tensor:
    """Output-space offsets that expand the anatomy around ``centre`` (a tumour pushing tissue away).

    Output voxel ``x`` reads the anatomy at ``x - strength * g(x) * (x - centre)`` with
    ``g = exp(-|x - centre|^2 / (2 radius^2))``; for ``strength < 1`` this map is one-to-one.
    Returns the offsets ``-strength * g * (x - centre)`` (``(..., 3)``, to be added to ``coords``).
    """
    rel = coords - centre
    g = torch.exp(-(rel * rel).sum(-1, keepdim=True) / (2.0 * radius * radius))
    return -strength * g * rel


def paint_plaques(image: Tensor, mask: Tensor, *, scale: float, rng: RandomSource) -> Tensor:
    """Fill ``mask`` with one random intensity (relative to ``scale``) plus texture."""
    mean = rng.uniform(0.0, 1.0) * scale
    std = rng.uniform(0.0, 0.08) * scale
    return torch.where(mask, mean + std * rng.randn(tuple(image.shape)), image)


def paint_stroke(
    image: Tensor,
    label_idx: Tensor,
    tables: LesionTables,
    *,
    csf_mean: float,
    csf_std: float,
    rng: RandomSource,
) -> tuple[Tensor, Tensor]:
    """Stroke cavity: CSF-like fluid replacing cerebral tissue in an irregular ellipsoid."""
    idx = label_idx.long()
    centre = pick_voxel(tables.cerebral_tissue[idx], rng)
    if centre is None:
        return image, torch.zeros(image.shape, dtype=torch.bool, device=image.device)
    radii = (rng.uniform(4.0, 20.0), rng.uniform(4.0, 20.0), rng.uniform(4.0, 20.0))
    mask = blob_mask(tuple(image.shape), centre, radii, roughness=0.25, rng=rng) & tables.brain[idx]  # type: ignore[arg-type]
    values = csf_mean + csf_std * rng.randn(tuple(image.shape))
    return torch.where(mask, values, image), mask


@dataclass(frozen=True)
class TumourShape:
    """Where and how big a tumour is (voxel centre in the crop, radii in mm)."""

    centre: tuple[int, int, int]
    core_radius: float
    oedema_factor: float
    necrosis_factor: float  #: 0 = no necrotic centre


def sample_tumour(label_idx: Tensor, tables: LesionTables, *, rng: RandomSource) -> TumourShape | None:
    """Place a tumour in cerebral white matter (None when the crop has none)."""
    centre = pick_voxel(tables.white_matter[label_idx.long()], rng)
    if centre is None:
        return None
    necrosis = rng.uniform(0.3, 0.6) if rng.bernoulli(0.5) else 0.0
    return TumourShape(centre=centre, core_radius=rng.uniform(5.0, 18.0),
                       oedema_factor=rng.uniform(1.3, 2.2), necrosis_factor=necrosis)


def paint_tumour(
    image: Tensor,
    label_idx: Tensor,
    tables: LesionTables,
    tumour: TumourShape,
    *,
    scale: float,
    csf_mean: float,
    csf_std: float,
    rng: RandomSource,
) -> tuple[Tensor, Tensor]:
    """Heterogeneous core (+ optional necrosis) and a white-matter oedema rim; returns (image, mask)."""
    shape = tuple(image.shape)
    idx = label_idx.long()
    brain, wm = tables.brain[idx], tables.white_matter[idx]
    r = tumour.core_radius
    radii = (r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25), r * rng.uniform(0.8, 1.25))
    core = blob_mask(shape, tumour.centre, radii, roughness=0.15, rng=rng) & brain  # type: ignore[arg-type]
    rim = tuple(e * tumour.oedema_factor for e in radii)
    oedema = blob_mask(shape, tumour.centre, rim, roughness=0.3, rng=rng) & wm & ~core  # type: ignore[arg-type]
    # Heterogeneous core: two random intensities mixed by a smooth field in [0, 1].
    mix = torch.sigmoid(3.0 * smooth_random_field(shape, spacing_mm=rng.uniform(3.0, 8.0), std=1.0, rng=rng))  # type: ignore[arg-type]
    a, b = rng.uniform(0.0, 1.0) * scale, rng.uniform(0.0, 1.0) * scale
    core_std = rng.uniform(0.0, 0.08) * scale
    out = torch.where(core, a + (b - a) * mix + core_std * rng.randn(shape), image)
    if tumour.necrosis_factor > 0:
        inner = tuple(e * tumour.necrosis_factor for e in radii)
        necrosis = blob_mask(shape, tumour.centre, inner, roughness=0.2, rng=rng) & core  # type: ignore[arg-type]
        out = torch.where(necrosis, csf_mean + csf_std * rng.randn(shape), out)
    oedema_mean = rng.uniform(0.0, 1.0) * scale
    oedema_std = rng.uniform(0.0, 0.06) * scale
    out = torch.where(oedema, oedema_mean + oedema_std * rng.randn(shape), out)
    return out, core | oedema
