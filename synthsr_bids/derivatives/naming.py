"""Derivative file names: every source entity kept, the source contrast encoded.

``sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz`` becomes
``sub-01/ses-1/anat/sub-01_ses-1_acq-ax_desc-synthsrFLAIR_T1w.nii.gz``, so a T1w
synthesised from a FLAIR and one from a T2w of the same session never collide,
and two runs stay two files (pybids' default derivative patterns drop ``run``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from synthsr_bids.discovery import ENTITY_KEYS, ENTITY_ORDER

#: Entities appended after the source ones, in BIDS order.
DERIVED_ORDER: tuple[str, ...] = ("space", "res", "desc")
DESC_PREFIX = "synthsr"
OUTPUT_SUFFIX = "T1w"
#: Meaning of the ``res`` entity values (the ``Resolution`` field of every sidecar of a ``res-`` file).
RESOLUTION_LABELS = {
    "1": "1 mm isotropic grid of the synthetic T1w (SynthSR output)",
    "native": "the grid of the source image (the synthetic T1w resampled onto it with trilinear interpolation)",
}


def desc_for(source_suffix: str) -> str:
    """``desc`` label of the synthetic T1w made from ``source_suffix`` images."""
    label = DESC_PREFIX + re.sub(r"[^A-Za-z0-9]", "", source_suffix)
    return label


def description_for(source_suffix: str) -> str:
    """Row of ``descriptions.tsv`` for :func:`desc_for`."""
    return (
        f"Synthetic 1 mm isotropic T1-weighted MPRAGE-like image synthesised with SynthSR "
        f"from a {source_suffix} image"
    )


@dataclass(frozen=True)
class OutputPaths:
    """Where one scan's outputs go (absolute paths)."""

    t1w: Path
    sidecar: Path
    native_t1w: Path | None = None
    native_sidecar: Path | None = None

    def images(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.t1w, self.native_t1w) if p is not None)


def build_name(
    entities: Mapping[str, str],
    *,
    suffix: str,
    extension: str,
    extra: Mapping[str, str] | None = None,
) -> str:
    """A BIDS file name from long entity names, in specification order."""
    parts: list[str] = []
    for name in ENTITY_ORDER:
        if name in entities and entities[name] not in (None, ""):
            parts.append(f"{ENTITY_KEYS[name]}-{entities[name]}")
    for name in DERIVED_ORDER:
        if extra and extra.get(name):
            parts.append(f"{name}-{extra[name]}")
    return "_".join(parts + [suffix]) + extension


def scan_folder(output_dir: Path, entities: Mapping[str, str]) -> Path:
    folder = output_dir / f"sub-{entities['subject']}"
    if entities.get("session"):
        folder = folder / f"ses-{entities['session']}"
    return folder / "anat"


def output_paths(
    output_dir: Path,
    entities: Mapping[str, str],
    source_suffix: str,
    *,
    native_grid: bool = False,
) -> OutputPaths:
    """Output paths of one scan.

    With ``native_grid`` the 1 mm image gets ``res-1`` and the copy on the input's
    grid ``res-native`` (both described by the sidecar's ``Resolution`` field).
    """
    folder = scan_folder(output_dir, entities)
    desc = desc_for(source_suffix)

    def path(res: str | None, extension: str) -> Path:
        extra = {"res": res, "desc": desc} if res else {"desc": desc}
        return folder / build_name(entities, suffix=OUTPUT_SUFFIX, extension=extension, extra=extra)

    if not native_grid:
        return OutputPaths(t1w=path(None, ".nii.gz"), sidecar=path(None, ".json"))
    return OutputPaths(
        t1w=path("1", ".nii.gz"),
        sidecar=path("1", ".json"),
        native_t1w=path("native", ".nii.gz"),
        native_sidecar=path("native", ".json"),
    )
