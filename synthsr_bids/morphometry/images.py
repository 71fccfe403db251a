"""The synthetic T1w images of a derivatives folder, and the names of what is derived from them.

Every derived file keeps the synthetic image's entities (source entities, ``res``) and ties
itself to the source contrast, so that the outputs of a T1w synthesised from a FLAIR and one
from a T2w of the same session never collide:

=====================  ====================================================================
segmentation           ``<entities>_desc-synthseg<C>_dseg.nii.gz`` (+ ``.tsv`` look-up, ``.json``)
volumes                ``<entities>_desc-synthseg<C>_volumes.tsv``
lesion mask            ``<entities>_label-lesion_desc-synthsr<C>_mask.nii.gz`` (+ ``.json``)
template transform     ``<entities>_desc-synthsr<C>_from-T1w_to-<tpl>_mode-image_xfm.h5``
image in template      ``<entities>_space-<tpl>_res-<N>_desc-synthsr<C>_T1w.nii.gz`` (+ ``.json``)
lesion in template     ``<entities>_space-<tpl>_res-<N>_label-lesion_desc-synthsr<C>_mask.nii.gz``
report figures         ``sub-<label>/figures/<synthetic image stem>_<kind>.png``
=====================  ====================================================================

where ``<C>`` is the source suffix (``FLAIR``, ``T2w``...).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from synthsr_bids.derivatives.naming import DESC_PREFIX, RESOLUTION_LABELS
from synthsr_bids.discovery import ENTITY_KEYS, ENTITY_ORDER, parse_entities

LOGGER = logging.getLogger(__name__)

SEGMENTATION_DESC_PREFIX = "synthseg"
LESION_LABEL = "lesion"
NII = ".nii.gz"

_DESC_RE = re.compile(r"_desc-(%s[A-Za-z0-9]+)_" % DESC_PREFIX)
_RES_RE = re.compile(r"_res-([A-Za-z0-9]+)_")


def _clean(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", label)


@dataclass(frozen=True)
class SyntheticImage:
    """One synthetic T1w image written by participant level (the 1 mm one)."""

    output_dir: Path
    path: Path
    entities: Mapping[str, str] = field(default_factory=dict)
    """Source entities (long pybids names, as written), e.g. ``{"subject": "01", "acquisition": "ax"}``."""
    desc: str = ""
    """``desc`` label of the synthetic image, e.g. ``synthsrFLAIR``."""
    res: str | None = None

    # ------------------------------------------------------------------ identity
    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def session(self) -> str | None:
        return self.entities.get("session")

    @property
    def contrast(self) -> str:
        """Source suffix as encoded in ``desc`` (``FLAIR``, ``T2w``...)."""
        return self.desc[len(DESC_PREFIX):]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def resolution_field(self) -> dict[str, dict[str, str]]:
        """``{"Resolution": {res: meaning}}`` for sidecars of files carrying this image's ``res``
        entity (BIDS requires it with ``res``), else ``{}``."""
        if not self.res:
            return {}
        return {"Resolution": {self.res: RESOLUTION_LABELS.get(self.res, f"the grid of the res-{self.res} image")}}

    @property
    def stem(self) -> str:
        return self.path.name[: -len(NII)]

    @property
    def relpath(self) -> str:
        return self.path.relative_to(self.output_dir).as_posix()

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.stem + ".json")

    @property
    def folder(self) -> Path:
        return self.path.parent

    def metadata(self) -> dict[str, Any]:
        """The JSON sidecar (empty when unreadable)."""
        try:
            payload = json.loads(self.sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
        return payload if isinstance(payload, dict) else {}

    def source_relpath(self, metadata: Mapping[str, Any] | None = None) -> str | None:
        """Path of the source scan inside the raw dataset (from ``Sources``)."""
        metadata = self.metadata() if metadata is None else metadata
        for uri in metadata.get("Sources", []) or []:
            if isinstance(uri, str) and uri.startswith("bids:raw:"):
                return uri[len("bids:raw:"):]
        return None

    # ------------------------------------------------------------------ derived names
    def derived_name(
        self,
        *,
        suffix: str,
        extension: str,
        space: str | None = None,
        label: str | None = None,
        desc: str | None = None,
        tail: str = "",
        resolution: int | None = None,
    ) -> str:
        """A file name with this image's entities plus ``space``/``label``/``desc``.

        ``res``: this image's own (``res-1`` next to a ``res-native`` copy) on its grid; in a template
        ``space``, the template's resolution index ``resolution`` (as fMRIPrep's ``space-X_res-2``)."""
        parts = [
            f"{ENTITY_KEYS[key]}-{self.entities[key]}"
            for key in ENTITY_ORDER
            if self.entities.get(key) not in (None, "")
        ]
        res = self.res
        if space:
            parts.append(f"space-{space}")
            res = None if resolution is None else str(resolution)
        if res:
            parts.append(f"res-{res}")
        if label:
            parts.append(f"label-{label}")
        if desc:
            parts.append(f"desc-{desc}")
        if tail:
            parts.append(tail)
        return "_".join(parts + [suffix]) + extension

    @property
    def segmentation_desc(self) -> str:
        return SEGMENTATION_DESC_PREFIX + _clean(self.contrast)

    @property
    def dseg(self) -> Path:
        return self.folder / self.derived_name(suffix="dseg", extension=NII, desc=self.segmentation_desc)

    @property
    def dseg_tsv(self) -> Path:
        return self.folder / self.derived_name(suffix="dseg", extension=".tsv", desc=self.segmentation_desc)

    @property
    def dseg_json(self) -> Path:
        return self.folder / self.derived_name(suffix="dseg", extension=".json", desc=self.segmentation_desc)

    @property
    def volumes_tsv(self) -> Path:
        return self.folder / self.derived_name(suffix="volumes", extension=".tsv", desc=self.segmentation_desc)

    @property
    def lesion_mask(self) -> Path:
        return self.folder / self.derived_name(suffix="mask", extension=NII, label=LESION_LABEL, desc=self.desc)

    @property
    def lesion_json(self) -> Path:
        return self.folder / self.derived_name(suffix="mask", extension=".json", label=LESION_LABEL, desc=self.desc)

    def xfm(self, template: str) -> Path:
        return self.folder / self.derived_name(
            suffix="xfm", extension=".h5", desc=self.desc, tail=f"from-T1w_to-{template}_mode-image"
        )

    def xfm_json(self, template: str) -> Path:
        return self.xfm(template).with_suffix(".json")

    def in_template(self, template: str, resolution: int) -> Path:
        return self.folder / self.derived_name(suffix="T1w", extension=NII, space=template, desc=self.desc,
                                               resolution=resolution)

    def in_template_json(self, template: str, resolution: int) -> Path:
        return self.folder / self.derived_name(suffix="T1w", extension=".json", space=template, desc=self.desc,
                                               resolution=resolution)

    def lesion_in_template(self, template: str, resolution: int) -> Path:
        return self.folder / self.derived_name(
            suffix="mask", extension=NII, space=template, label=LESION_LABEL, desc=self.desc, resolution=resolution
        )

    def lesion_in_template_json(self, template: str, resolution: int) -> Path:
        return self.folder / self.derived_name(
            suffix="mask", extension=".json", space=template, label=LESION_LABEL, desc=self.desc, resolution=resolution
        )

    def figure(self, kind: str) -> Path:
        """``sub-<label>/figures/<stem>_<kind>.png``."""
        return self.output_dir / f"sub-{self.subject}" / "figures" / f"{self.stem}_{kind}.png"


def bids_uri_here(path: Path, output_dir: Path) -> str:
    """BIDS URI of a file of the derivatives dataset itself (``bids::<relpath>``)."""
    return "bids::" + path.relative_to(output_dir).as_posix()


def parse_synthetic(output_dir: Path, path: Path) -> SyntheticImage | None:
    """A :class:`SyntheticImage` for a synthetic T1w path, ``None`` for other files
    (template-space copies, ``res-native`` copies, segmentations...)."""
    name = path.name
    if not name.endswith("_T1w" + NII) or "_space-" in name:
        return None
    desc = _DESC_RE.search(name)
    if desc is None:
        return None
    res = _RES_RE.search(name)
    if res is not None and res.group(1) == "native":
        return None
    entities = parse_entities(name)
    if "subject" not in entities:
        return None
    return SyntheticImage(
        output_dir=output_dir,
        path=path,
        entities=entities,
        desc=desc.group(1),
        res=res.group(1) if res else None,
    )


def find_synthetic_images(output_dir: Path, subject: str | None = None) -> list[SyntheticImage]:
    """Every finished synthetic T1w (image and sidecar present), one per source scan, sorted by path.

    Runs with other naming settings leave several images of one scan (e.g. ``..._desc-synthsrFLAIR_T1w``
    and, after a rerun with ``--native-grid``, ``..._res-1_desc-synthsrFLAIR_T1w``): only the newest
    (by its sidecar, written last) is used, so that no scan is segmented, reported or counted twice;
    the others are named in a warning."""
    pattern = f"sub-{subject}" if subject else "sub-*"
    found: list[SyntheticImage] = []
    for path in sorted(output_dir.glob(f"{pattern}/**/anat/*_desc-{DESC_PREFIX}*_T1w{NII}")):
        image = parse_synthetic(output_dir, path)
        if image is not None and image.sidecar.is_file():
            found.append(image)
    return newest_per_source(found)


def newest_per_source(images: list[SyntheticImage]) -> list[SyntheticImage]:
    """``images`` without the older outputs of a source scan another image also comes from (order kept)."""
    by_source: dict[str, list[SyntheticImage]] = {}
    for image in images:
        source = image.source_relpath()
        if source is not None:
            by_source.setdefault(source, []).append(image)
    stale: set[Path] = set()
    for source, group in by_source.items():
        if len(group) < 2:
            continue
        newest = max(group, key=lambda i: (i.sidecar.stat().st_mtime_ns, i.name))
        older = [i for i in group if i is not newest]
        stale.update(i.path for i in older)
        LOGGER.warning("%s has %d synthetic T1w images; using the newest, %s, and ignoring %s "
                       "(left by a run with other settings: delete them to silence this)", source, len(group),
                       newest.name, ", ".join(i.name for i in older))
    return [i for i in images if i.path not in stale]
