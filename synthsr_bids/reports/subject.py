"""The participant report ``sub-<label>.html`` (figures under ``sub-<label>/figures/``).

One section per synthetic T1w of the participant found on disk (so a rerun that skips
finished scans still reports them): key sidecar facts, warnings, a mosaic of the input
resampled onto the output grid next to the synthetic T1w in the three planes (lesion mask
outlined in red when there is one), the segmentation overlay and the volume table when
they exist; then the errors of this run.

Jobs for different participants write different files. Jobs for the same participant
(e.g. one per session) serialise on ``sub-<label>/log/.report.lock`` and the report is
rebuilt from disk each time, so the last one lists everything.
"""

from __future__ import annotations

import html.parser
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from filelock import FileLock

from synthsr_bids.config import RunConfig
from synthsr_bids.io import write_text_atomic
from synthsr_bids.morphometry.images import SyntheticImage, find_synthetic_images
from synthsr_bids.morphometry.labels import read_dseg_tsv
from synthsr_bids.morphometry.volumes import asymmetry_index, read_volumes_tsv
from synthsr_bids.preprocessing.resample import resample_to_grid
from synthsr_bids.reports.figures import Layer, mosaic, to_ras
from synthsr_bids.reports.render import relative_link, render

LOGGER = logging.getLogger(__name__)

LOCK_NAME = ".report.lock"


@dataclass(frozen=True)
class FigureRef:
    src: str
    alt: str
    caption: str


def _fmt_mm(values: Sequence[float]) -> str:
    return " × ".join(f"{float(v):g}" for v in values) + " mm"


def _mtime(path: Path | None) -> float:
    try:
        return path.stat().st_mtime if path is not None else 0.0
    except OSError:
        return 0.0


def _stale(figure: Path, inputs: Sequence[Path | None]) -> bool:
    return not figure.is_file() or _mtime(figure) < max(_mtime(p) for p in inputs)


def _first_volume(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    return np.nan_to_num(np.asarray(data, dtype=np.float64))


def facts_of(image: SyntheticImage, metadata: dict[str, Any]) -> list[tuple[str, str]]:
    info = metadata.get("SynthSR", {}) or {}
    model = info.get("Model", {}) or {}
    facts = [
        ("Source scan", image.source_relpath(metadata) or "?"),
        ("Synthetic image", image.relpath),
        ("Input contrast", str(info.get("InputContrast", image.contrast))),
        ("Input voxel size", _fmt_mm(info["InputVoxelSizeMM"]) if info.get("InputVoxelSizeMM") else "?"),
        ("Input shape / orientation", f"{info.get('InputShape', '?')} / {info.get('InputOrientation', '?')}"),
        ("Output voxel size", _fmt_mm(info["OutputVoxelSizeMM"]) if info.get("OutputVoxelSizeMM") else "?"),
        ("Model", f"{model.get('Name', '?')} {model.get('Version', '')} (sha256 {str(model.get('SHA256', ''))[:12]}…, {model.get('License', '?')})"),
        ("Flipping / sharpening / CT", f"{info.get('TestTimeFlipping')} / {info.get('Sharpening')} / {info.get('CTClipping')}"),
        ("Device", f"{info.get('Device', '?')} ({info.get('Precision', '?')})"),
        ("Runtime", f"{float(info.get('RuntimeSeconds', 0.0)):.1f} s"),
        ("Processed", str(metadata.get("DateProcessed", "?"))),
    ]
    if image.lesion_json.is_file():
        try:
            lesion = json.loads(image.lesion_json.read_text())
            facts.append(("Lesion mask", f"{lesion['Sources'][0]} ({lesion['SynthSR']['LesionVolumeMM3']:.0f} mm³ on the synthetic grid)"))
        except (OSError, ValueError, KeyError, IndexError):
            pass
    if image.dseg_json.is_file():
        try:
            seg = json.loads(image.dseg_json.read_text())["SynthSR"]
            facts.append(("Segmentation", f"{seg['SegmentationModel']['Name']}, {seg['Labels']} labels, {seg['RuntimeSeconds']:.1f} s"))
        except (OSError, ValueError, KeyError):
            pass
    return facts


def draw_mosaic(image: SyntheticImage, bids_dir: Path, metadata: dict[str, Any]) -> Path:
    """``<stem>_mosaic.png``: input on the output grid and synthetic T1w, three planes."""
    figure = image.figure("mosaic")
    source = image.source_relpath(metadata)
    raw_path = bids_dir / source if source else None
    lesion = image.lesion_mask if image.lesion_mask.is_file() else None
    if not _stale(figure, [image.path, lesion, raw_path if raw_path and raw_path.is_file() else None]):
        return figure
    synth = nib.load(str(image.path))
    synth_data = _first_volume(synth)
    layers = []
    if raw_path is not None and raw_path.is_file():
        raw = nib.load(str(raw_path))
        on_grid = resample_to_grid(_first_volume(raw), raw.affine, synth_data.shape, synth.affine, order=1)
        contrast = metadata.get("SynthSR", {}).get("InputContrast", image.contrast)
        layers.append(Layer(f"input {contrast}", to_ras(on_grid, synth.affine)))
    else:
        LOGGER.warning("%s: source scan %s not found; the report shows the synthetic image only", image.name, source)
    synth_ras = to_ras(synth_data, synth.affine)
    layers.append(Layer("synthetic T1w", synth_ras))
    contour = to_ras(np.asanyarray(nib.load(str(lesion)).dataobj) > 0, synth.affine) if lesion else None
    return mosaic(
        layers, figure, reference=synth_ras, contour=contour,
        title=f"{image.name}" + ("  (lesion mask in red)" if lesion is not None else ""),
    )


def draw_segmentation(image: SyntheticImage) -> Path | None:
    """``<stem>_dseg.png``: segmentation over the synthetic T1w."""
    if not (image.dseg.is_file() and image.dseg_tsv.is_file()):
        return None
    figure = image.figure("dseg")
    if not _stale(figure, [image.path, image.dseg]):
        return figure
    synth = nib.load(str(image.path))
    labels = np.asarray(nib.load(str(image.dseg)).dataobj).astype(np.int32)
    table = read_dseg_tsv(image.dseg_tsv)
    synth_ras = to_ras(_first_volume(synth), synth.affine)
    return mosaic(
        [Layer("synthetic T1w", synth_ras)], figure, labels=to_ras(labels, synth.affine),
        label_colours={i: table.colour(i) for i in table.ids}, title=f"{image.dseg.name}",
    )


def volume_rows(image: SyntheticImage) -> list[dict[str, str]]:
    if not image.volumes_tsv.is_file():
        return []
    by_structure: dict[str, dict[str, float]] = {}
    for row in read_volumes_tsv(image.volumes_tsv):
        by_structure.setdefault(row.structure, {})[row.hemisphere] = row.volume_mm3
    rows = []
    for structure, sides in by_structure.items():
        left, right, other = sides.get("left"), sides.get("right"), sides.get("none")
        paired = left is not None and right is not None
        rows.append({
            "structure": structure,
            "left": f"{left:.0f}" if left is not None else "",
            "right": f"{right:.0f}" if right is not None else "",
            "asymmetry": f"{asymmetry_index(left, right):+.3f}" if paired and (left + right) > 0 else "",
            "other": f"{other:.0f}" if other is not None else "",
        })
    return rows


def image_section(image: SyntheticImage, *, bids_dir: Path, output_dir: Path) -> dict[str, Any]:
    metadata = image.metadata()
    info = metadata.get("SynthSR", {}) or {}
    figures: list[FigureRef] = []
    mosaic_path = draw_mosaic(image, bids_dir, metadata)
    figures.append(FigureRef(
        relative_link(mosaic_path, output_dir), f"mosaic of {image.name}",
        "Input resampled onto the 1 mm output grid (trilinear) and synthetic T1w, in axial, coronal and sagittal slices"
        + ("; the lesion mask is outlined in red." if image.lesion_mask.is_file() else "."),
    ))
    dseg_path = draw_segmentation(image)
    if dseg_path is not None:
        figures.append(FigureRef(relative_link(dseg_path, output_dir), f"segmentation of {image.name}",
                                 "Segmentation of the synthetic T1w (FreeSurfer colours)."))
    return {
        "name": image.name,
        "short": image.stem.replace(f"sub-{image.subject}_", ""),
        "anchor": image.stem,
        "facts": facts_of(image, metadata),
        "warnings": list(info.get("Warnings", []) or []) + list(info.get("Notes", []) or []),
        "figures": figures,
        "volumes": volume_rows(image),
    }


def write_subject_report(config: RunConfig, subject: str, *, failures: Sequence[Any] = ()) -> Path:
    """Write ``sub-<subject>.html`` and its figures; returns the report's path."""
    output_dir = config.output_dir
    lock_dir = output_dir / f"sub-{subject}" / "log"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / LOCK_NAME), timeout=600):
        images = find_synthetic_images(output_dir, subject)
        sections = [image_section(image, bids_dir=config.bids_dir, output_dir=output_dir) for image in images]
        segmented = sum(image.dseg.is_file() for image in images)
        if not config.downstream.segmentation:
            status = "skipped (--skip-segmentation)"
        elif not images:
            status = "n/a (no synthetic image)"
        elif segmented:
            status = f"{segmented} of {len(images)} image(s) segmented"
        else:
            status = "not run: no segmentation model available (--segmentation-model)"
        html = render(
            "subject.html",
            subject=subject,
            images=sections,
            failures=[
                {
                    "what": failure.what,
                    "error": failure.error,
                    "crash": relative_link(failure.crash_file, output_dir) if getattr(failure, "crash_file", None) else None,
                }
                for failure in failures
            ],
            segmentation_status=status,
            command=" ".join(config.command_line),
            run_id=config.run_id,
        )
        path = output_dir / f"sub-{subject}.html"
        write_text_atomic(path, html)
    return path


class _ErrorText(html.parser.HTMLParser):
    """The text of each ``<div class="error">`` inside ``<section id="errors">`` (subject.html)."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str] = []
        self._in_errors = False
        self._depth = 0  # open <div>s inside the current error div
        self._parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "section":
            self._in_errors = values.get("id") == "errors"
        elif tag == "div" and self._depth:
            self._depth += 1
        elif tag == "div" and self._in_errors and "error" in (values.get("class") or "").split():
            self._depth, self._parts = 1, []

    def handle_endtag(self, tag):
        if tag == "section":
            self._in_errors = False
        elif tag == "div" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.errors.append(" ".join("".join(self._parts).split()))

    def handle_data(self, data):
        if self._depth:
            self._parts.append(data)


def report_errors(path: Path) -> list[str]:
    """The errors a participant report lists (its last participant-level run), as plain text;
    ``[]`` when the report is missing or unreadable."""
    try:
        parser = _ErrorText()
        parser.feed(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return []
    return parser.errors
