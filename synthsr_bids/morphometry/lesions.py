"""Lesion masks given with the data, matched to synthetic images and put onto their grid.

Where masks are searched (per subject):

* the raw dataset: ``sub-<label>/[ses-<label>/]anat/``;
* ``--lesion-masks DIR``: anywhere under ``DIR/sub-<label>/``.

A lesion mask is a ``*_roi`` or ``*_mask`` NIfTI file whose ``label-`` or ``desc-`` value
contains "lesion" (any case): ``*_label-lesion_roi.nii.gz``, ``*_label-lesion_mask.nii.gz``,
``*_desc-lesion_mask.nii.gz``, ATLAS-style ``*_space-orig_label-L_desc-T1lesion_mask.nii.gz``.
(The BIDS schema has no raw lesion-mask file, so masks kept in a raw dataset need a
``.bidsignore`` entry; a derivatives folder given with ``--lesion-masks`` does not.)
Masks in a template space (a ``space-`` other than ``orig``/``native``/``scanner``) are
ignored: they are not in scanner space. A mask is used for
a synthetic image of the same subject and session; among several, the one whose other
entities (``acq``, ``run``, ``rec``, ``ce``...) agree best with the source scan wins. The
synthetic image lives in the same world (scanner) space as its source, so the mask is
resampled with its own affine: trilinear interpolation of the binary mask, then ``>= 0.5``
(the partial-volume-preserving choice; nearest neighbour shifts edges by up to half a
thick-slice voxel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from synthsr_bids.discovery import parse_entities
from synthsr_bids.preprocessing.resample import resample_to_grid

_MASK_RE = re.compile(r"_(?:roi|mask)\.nii(?:\.gz)?$")
_LESION_ENTITY_RE = re.compile(r"(?:^|_)(?:label|desc)-[A-Za-z0-9]*lesion[A-Za-z0-9]*(?=_)", re.IGNORECASE)
_SPACE_RE = re.compile(r"(?:^|_)space-([A-Za-z0-9]+)(?=_)")
#: ``space-`` labels that still mean the scanner space of the acquisition.
NATIVE_SPACES = ("orig", "native", "scanner")
#: Entities compared between a mask and the source scan (subject/session must be equal).
MATCH_ENTITIES = ("acquisition", "ceagent", "reconstruction", "direction", "run", "echo", "part", "chunk")
THRESHOLD = 0.5


@dataclass(frozen=True)
class LesionMask:
    path: Path
    uri: str
    """``bids:raw:<relpath>`` for raw-dataset masks, a ``file://`` URI otherwise."""
    entities: Mapping[str, str] = field(default_factory=dict)


def is_lesion_mask(name: str) -> bool:
    """True for lesion-mask file names in scanner space (see the module docstring)."""
    if not (_MASK_RE.search(name) and _LESION_ENTITY_RE.search(name)):
        return False
    space = _SPACE_RE.search(name)
    return space is None or space.group(1).lower() in NATIVE_SPACES


def _masks_under(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file() and is_lesion_mask(p.name))


def find_lesion_masks(bids_dir: Path, subject: str, *, extra_dir: Path | None = None) -> list[LesionMask]:
    """Every lesion mask of ``subject`` in the raw dataset and in ``extra_dir``."""
    masks: list[LesionMask] = []
    raw_subject = bids_dir / f"sub-{subject}"
    for path in _masks_under(raw_subject, "anat/*") + _masks_under(raw_subject, "ses-*/anat/*"):
        masks.append(
            LesionMask(path=path, uri="bids:raw:" + path.relative_to(bids_dir).as_posix(), entities=parse_entities(path.name))
        )
    if extra_dir is not None:
        for path in _masks_under(extra_dir / f"sub-{subject}", "**/*"):
            masks.append(LesionMask(path=path, uri=path.resolve().as_uri(), entities=parse_entities(path.name)))
    return masks


def match_lesion_mask(masks: Sequence[LesionMask], entities: Mapping[str, str]) -> LesionMask | None:
    """The mask of the scan with ``entities`` (same subject and session, best agreement)."""
    best: tuple[int, int] | None = None
    chosen = None
    for mask in masks:
        if mask.entities.get("subject") != entities.get("subject"):
            continue
        if mask.entities.get("session") != entities.get("session"):
            continue
        shared = [k for k in MATCH_ENTITIES if k in mask.entities and k in entities]
        conflicts = sum(mask.entities[k] != entities[k] for k in shared)
        agreements = len(shared) - conflicts
        score = (-conflicts, agreements)
        if best is None or score > best:
            best, chosen = score, mask
    return chosen


def resample_mask(
    mask: np.ndarray, mask_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray
) -> np.ndarray:
    """A binary ``mask`` (nonzero = lesion) on the grid ``shape``/``affine`` (``uint8``)."""
    binary = (np.asarray(mask) > 0).astype(np.float64)
    if binary.ndim == 4:
        binary = binary[..., 0]
    on_grid = resample_to_grid(binary, mask_affine, shape, affine, order=1, cval=0.0)
    return (on_grid >= THRESHOLD).astype(np.uint8)
