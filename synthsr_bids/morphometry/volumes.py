"""Per-structure volumes of a segmentation, and hemispheric asymmetry.

Volumes are voxel counts times the voxel volume ``|det(A[:3, :3])|`` in mm^3. The asymmetry
index of a structure is ``2 (L - R) / (L + R)`` (positive: larger on the left; undefined,
NaN, when both sides are empty).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from synthsr_bids.morphometry.labels import LabelTable, hemisphere_of, structure_of

VOLUMES_HEADER = ("index", "name", "structure", "hemisphere", "volume_mm3")


@dataclass(frozen=True)
class StructureVolume:
    index: int
    name: str
    structure: str
    hemisphere: str
    volume_mm3: float


def voxel_volume(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def label_volumes(dseg: np.ndarray, affine: np.ndarray, table: LabelTable) -> list[StructureVolume]:
    """Volume of every foreground label of ``table`` (absent labels get 0)."""
    labels = np.asarray(dseg)
    if labels.size and labels.min() < 0:
        raise ValueError("a segmentation cannot hold negative labels")
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(table.ids, default=0) + 1)
    unit = voxel_volume(affine)
    out = []
    for label in sorted(table.foreground):
        name = table.name(label)
        out.append(
            StructureVolume(
                index=label,
                name=name,
                structure=structure_of(name),
                hemisphere=hemisphere_of(name),
                volume_mm3=float(counts[label]) * unit if label < len(counts) else 0.0,
            )
        )
    return out


def asymmetry_index(left: float, right: float) -> float:
    """``2 (L - R) / (L + R)``; NaN when ``L + R`` is 0."""
    total = float(left) + float(right)
    if total <= 0 or not math.isfinite(total):
        return math.nan
    return 2.0 * (float(left) - float(right)) / total


def asymmetries(volumes: Mapping[str, float], table: LabelTable) -> dict[str, float]:
    """Asymmetry index per lateral structure, keyed by structure name."""
    return {
        structure: asymmetry_index(volumes.get(table.name(left), 0.0), volumes.get(table.name(right), 0.0))
        for structure, left, right in table.lateral_pairs()
    }


def volumes_to_tsv(rows: Sequence[StructureVolume]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(VOLUMES_HEADER)
    for row in rows:
        writer.writerow((row.index, row.name, row.structure, row.hemisphere, f"{row.volume_mm3:.1f}"))
    return buffer.getvalue()


def read_volumes_tsv(path: Path) -> list[StructureVolume]:
    rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))
    if rows and tuple(rows[0].keys()) != VOLUMES_HEADER:
        raise ValueError(f"{path}: unexpected columns {list(rows[0].keys())}, expected {list(VOLUMES_HEADER)}")
    return [
        StructureVolume(
            index=int(row["index"]),
            name=row["name"],
            structure=row["structure"],
            hemisphere=row["hemisphere"],
            volume_mm3=float(row["volume_mm3"]),
        )
        for row in rows
    ]
