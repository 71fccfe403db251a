"""Segmentation labels: FreeSurfer names and colours, BIDS ``dseg.tsv`` tables, hemispheres.

A segmentation model says which FreeSurfer label each output channel is (see
:mod:`.segment`); names default to FreeSurfer's ``FreeSurferColorLUT.txt`` for the labels
SynthSeg segments. Left/right pairs are found from the names (``Left-X``/``Right-X``,
``ctx-lh-X``/``ctx-rh-X``), so any label list with FreeSurfer-style names works.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

#: FreeSurfer label id -> (name, RGB colour), after ``FreeSurferColorLUT.txt`` (the labels of
#: SynthSeg 1.0/2.0 and the extra ones of its generation label maps).
FREESURFER_LUT: Mapping[int, tuple[str, tuple[int, int, int]]] = {
    0: ("Unknown", (0, 0, 0)),
    2: ("Left-Cerebral-White-Matter", (245, 245, 245)),
    3: ("Left-Cerebral-Cortex", (205, 62, 78)),
    4: ("Left-Lateral-Ventricle", (120, 18, 134)),
    5: ("Left-Inf-Lat-Vent", (196, 58, 250)),
    7: ("Left-Cerebellum-White-Matter", (220, 248, 164)),
    8: ("Left-Cerebellum-Cortex", (230, 148, 34)),
    10: ("Left-Thalamus", (0, 118, 14)),
    11: ("Left-Caudate", (122, 186, 220)),
    12: ("Left-Putamen", (236, 13, 176)),
    13: ("Left-Pallidum", (12, 48, 255)),
    14: ("3rd-Ventricle", (204, 182, 142)),
    15: ("4th-Ventricle", (42, 204, 164)),
    16: ("Brain-Stem", (119, 159, 176)),
    17: ("Left-Hippocampus", (220, 216, 20)),
    18: ("Left-Amygdala", (103, 255, 255)),
    24: ("CSF", (60, 60, 60)),
    25: ("Left-Lesion", (255, 165, 0)),
    26: ("Left-Accumbens-area", (255, 165, 0)),
    28: ("Left-VentralDC", (165, 42, 42)),
    30: ("Left-vessel", (160, 32, 240)),
    31: ("Left-choroid-plexus", (0, 200, 200)),
    41: ("Right-Cerebral-White-Matter", (245, 245, 245)),
    42: ("Right-Cerebral-Cortex", (205, 62, 78)),
    43: ("Right-Lateral-Ventricle", (120, 18, 134)),
    44: ("Right-Inf-Lat-Vent", (196, 58, 250)),
    46: ("Right-Cerebellum-White-Matter", (220, 248, 164)),
    47: ("Right-Cerebellum-Cortex", (230, 148, 34)),
    49: ("Right-Thalamus", (0, 118, 14)),
    50: ("Right-Caudate", (122, 186, 220)),
    51: ("Right-Putamen", (236, 13, 176)),
    52: ("Right-Pallidum", (13, 48, 255)),
    53: ("Right-Hippocampus", (220, 216, 20)),
    54: ("Right-Amygdala", (103, 255, 255)),
    57: ("Right-Lesion", (255, 165, 0)),
    58: ("Right-Accumbens-area", (255, 165, 0)),
    60: ("Right-VentralDC", (165, 42, 42)),
    62: ("Right-vessel", (160, 32, 240)),
    63: ("Right-choroid-plexus", (0, 200, 221)),
    77: ("WM-hypointensities", (200, 70, 255)),
    85: ("Optic-Chiasm", (234, 169, 30)),
    165: ("Skull", (255, 165, 0)),
    258: ("Head-ExtraCerebral", (150, 150, 200)),
    259: ("Eye-Fluid", (120, 120, 120)),
}

#: Name prefixes that mark a hemisphere, as (left, right) pairs.
HEMISPHERE_PREFIXES: tuple[tuple[str, str], ...] = (("Left-", "Right-"), ("ctx-lh-", "ctx-rh-"), ("lh-", "rh-"))

BACKGROUND = 0


def _hex(rgb: Sequence[int]) -> str:
    return "#" + "".join(f"{int(c):02x}" for c in rgb)


def _fallback_colour(label: int) -> tuple[int, int, int]:
    """A stable, distinguishable colour for labels without a LUT entry."""
    value = (label * 2654435761) & 0xFFFFFF
    return ((value >> 16) & 255, (value >> 8) & 255, value & 255)


def hemisphere_of(name: str) -> str:
    """``left``, ``right`` or ``none`` from a FreeSurfer-style name."""
    for left, right in HEMISPHERE_PREFIXES:
        if name.startswith(left):
            return "left"
        if name.startswith(right):
            return "right"
    return "none"


def structure_of(name: str) -> str:
    """The name without its hemisphere prefix (``Left-Hippocampus`` -> ``Hippocampus``,
    ``ctx-lh-insula`` -> ``ctx-insula``)."""
    for left, right in HEMISPHERE_PREFIXES:
        for prefix in (left, right):
            if name.startswith(prefix):
                rest = name[len(prefix):]
                return f"ctx-{rest}" if prefix.startswith("ctx-") else rest
    return name


@dataclass(frozen=True)
class LabelTable:
    """The labels of a segmentation: channel ``i`` of the network is label ``ids[i]``."""

    ids: tuple[int, ...]
    names: Mapping[int, str] = field(default_factory=dict)
    colours: Mapping[int, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"label ids must be unique, got {list(self.ids)}")
        if any(int(i) < 0 or int(i) > 32767 for i in self.ids):
            raise ValueError(f"label ids must be in 0..32767, got {list(self.ids)}")

    @classmethod
    def from_ids(cls, ids: Iterable[int], names: Mapping[int, str] | None = None) -> "LabelTable":
        """Names from ``names`` first, then FreeSurfer's LUT, then ``label-<id>``."""
        ids = tuple(int(i) for i in ids)
        given = {int(k): str(v) for k, v in (names or {}).items()}
        resolved: dict[int, str] = {}
        colours: dict[int, tuple[int, int, int]] = {}
        for label in ids:
            lut = FREESURFER_LUT.get(label)
            resolved[label] = given.get(label) or (lut[0] if lut else f"label-{label}")
            colours[label] = lut[1] if lut else _fallback_colour(label)
        return cls(ids=ids, names=resolved, colours=colours)

    def name(self, label: int) -> str:
        return self.names.get(int(label), f"label-{int(label)}")

    def colour(self, label: int) -> tuple[int, int, int]:
        return self.colours.get(int(label), _fallback_colour(int(label)))

    @property
    def foreground(self) -> tuple[int, ...]:
        return tuple(i for i in self.ids if i != BACKGROUND)

    def lateral_pairs(self) -> list[tuple[str, int, int]]:
        """``(structure, left id, right id)`` for every structure present on both sides."""
        by_name = {self.name(i): i for i in self.ids}
        pairs = []
        for label in self.ids:
            name = self.name(label)
            for left, right in HEMISPHERE_PREFIXES:
                if name.startswith(left):
                    partner = by_name.get(right + name[len(left):])
                    if partner is not None:
                        pairs.append((structure_of(name), label, partner))
                    break
        return pairs

    def channel_swap(self) -> list[int] | None:
        """Channel permutation that swaps left and right labels (for flipped inputs), or
        ``None`` when some lateral label has no partner (the flip cannot be undone)."""
        index = {label: c for c, label in enumerate(self.ids)}
        order = list(range(len(self.ids)))
        for _, left, right in self.lateral_pairs():
            order[index[left]], order[index[right]] = index[right], index[left]
        unpaired = [
            self.name(i)
            for i in self.ids
            if hemisphere_of(self.name(i)) != "none" and order[index[i]] == index[i]
        ]
        return None if unpaired else order

    def to_tsv(self) -> str:
        """BIDS ``dseg.tsv``: ``index``, ``name``, ``color`` (background included)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        writer.writerow(("index", "name", "color"))
        for label in sorted(self.ids):
            writer.writerow((label, self.name(label), _hex(self.colour(label))))
        return buffer.getvalue()


def read_dseg_tsv(path: Path) -> LabelTable:
    """Read a BIDS ``dseg.tsv`` (``index``, ``name``, optional ``color``)."""
    rows = list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))
    if not rows or "index" not in rows[0] or "name" not in rows[0]:
        raise ValueError(f"{path} is not a BIDS dseg.tsv (columns index and name are required)")
    ids = tuple(int(row["index"]) for row in rows)
    names = {int(row["index"]): row["name"] for row in rows}
    colours = {}
    for row in rows:
        colour = (row.get("color") or "").strip()
        if len(colour) == 7 and colour.startswith("#"):
            colours[int(row["index"])] = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    table = LabelTable.from_ids(ids, names)
    return LabelTable(ids=table.ids, names=table.names, colours={**table.colours, **colours})
