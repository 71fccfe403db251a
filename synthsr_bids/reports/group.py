"""The group report ``group.html`` (figures under ``figures/``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from synthsr_bids.config import RunConfig
from synthsr_bids.group.templates import TemplateSpace
from synthsr_bids.group.qc import (
    ASYMMETRY_FLOOR,
    MIN_TEMPLATE_CORRELATION,
    OUTLIER_METRICS,
    OUTLIER_Z,
    VOLUME_FLOOR_MM3,
    Outlier,
    column_outliers,
    flagged_metrics,
)
from synthsr_bids.io import write_text_atomic
from synthsr_bids.reports.figures import Layer, mosaic, pages, strip_plots, thumbnails, to_ras
from synthsr_bids.reports.render import relative_link, render
from synthsr_bids.reports.subject import report_errors

REPORT_NAME = "group.html"
#: Columns of the report's table after the image's name: what the image is, then every metric
#: that can flag it (:data:`OUTLIER_METRICS`), the lesion volume and the flags.
TABLE_COLUMNS = (
    "participant_id", "session_id", "source_contrast", "source_voxel_size", "model",
    *OUTLIER_METRICS, "lesion_volume_mm3", "qc_flags", "stale_outputs",
)
#: QC-table columns drawn in the QC figure for information only (never flagged, never red).
INFO_METRICS = ("source_max_voxel_mm",)
INFO_SUFFIX = " (info)"
#: Most images in one registration figure; more images are drawn in several figures.
MAX_THUMBNAILS = 48


def image_stem(relpath: str) -> str:
    """``sub-02/ses-1/anat/sub-02_ses-1_run-01_desc-synthsrT2w_T1w.nii.gz`` ->
    ``sub-02_ses-1_run-01_desc-synthsrT2w_T1w``."""
    name = relpath.rsplit("/", 1)[-1]
    for extension in (".nii.gz", ".nii"):
        if name.endswith(extension):
            return name[: -len(extension)]
    return name


def count(n: int, noun: str) -> str:
    """``1 participant``, ``2 participants``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _fmt(value: Any) -> tuple[str, bool]:
    if value is None:
        return "n/a", False
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a", True
        return (f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"), True
    if isinstance(value, list):
        return ", ".join(value) if value else "", False
    return str(value), isinstance(value, int)


class _SubjectReports:
    """Links into the participant reports ``sub-<label>.html`` that exist, to an image's section
    (``id`` = the image's stem, see :mod:`synthsr_bids.reports.subject`) when the report has it."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._text: dict[str, str | None] = {}

    def _read(self, participant: str) -> str | None:
        if participant not in self._text:
            path = self.output_dir / f"{participant}.html"
            try:
                self._text[participant] = path.read_text(encoding="utf-8") if path.is_file() else None
            except (OSError, UnicodeDecodeError):
                self._text[participant] = None
        return self._text[participant]

    def link(self, participant: str, anchor: str | None = None) -> str | None:
        text = self._read(participant)
        if text is None:
            return None
        if anchor and f'id="{anchor}"' in text:
            return f"{participant}.html#{anchor}"
        return f"{participant}.html"


def qc_marks(rows: Sequence[dict[str, Any]]) -> dict[str, list[bool]]:
    """Per metric of :data:`OUTLIER_METRICS`, which rows the table flags for it (their
    ``qc_flags``): the QC figure marks exactly these."""
    flagged = [flagged_metrics(r.get("qc_flags")) for r in rows]
    return {m: [m in f for f in flagged] for m in OUTLIER_METRICS}


def _qc_figure(rows: Sequence[dict[str, Any]], names: Sequence[str], path: Path) -> Path:
    series = {m: [float(r.get(m, math.nan)) for r in rows] for m in OUTLIER_METRICS}
    for metric in INFO_METRICS:  # informational panels: no red
        series[metric + INFO_SUFFIX] = [float(r.get(metric, math.nan)) for r in rows]
    return strip_plots(series, names, path, flagged=qc_marks(rows), title="QC numbers per synthetic image")


def _outlier_items(outliers: Sequence[Outlier], names: Sequence[str], links: Sequence[str | None], unit: str,
                   column_name=lambda c: c) -> list[dict[str, Any]]:
    """The outliers as lines of text for the report: image (linked), column, value and median."""
    items = []
    for o in sorted(outliers, key=lambda o: (o.row, o.column)):
        value = f"{o.value:.0f}{unit}" if unit else f"{o.value:+.3f}"
        median = f"{o.median:.0f}{unit}" if unit else f"{o.median:+.3f}"
        items.append({
            "image": names[o.row], "link": links[o.row], "what": column_name(o.column),
            "detail": f"{value}, {o.direction} the group median {median} (robust z {o.z:+.1f})",
        })
    return items


def _volume_figures(volume_rows: Sequence[dict[str, Any]], names: Sequence[str], structures: Sequence[str],
                    asymmetry: Sequence[str], folder: Path
                    ) -> tuple[Path | None, Path | None, list[Outlier], list[Outlier]]:
    """The volume and asymmetry strip plots, and the outliers they mark in red."""
    volume_path = asym_path = None
    volume_outliers = column_outliers(volume_rows, structures, VOLUME_FLOOR_MM3) if structures else []
    asym_outliers = column_outliers(volume_rows, asymmetry, ASYMMETRY_FLOOR) if asymmetry else []

    def marks(columns: Sequence[str], outliers: Sequence[Outlier]) -> dict[str, list[bool]]:
        out = {c: [False] * len(volume_rows) for c in columns}
        for o in outliers:
            out[o.column][o.row] = True
        return out

    if structures:
        series = {s: [float(r.get(s, math.nan)) for r in volume_rows] for s in structures}
        volume_path = strip_plots(series, names, folder / "group_desc-volumes_plot.png",
                                  flagged=marks(structures, volume_outliers),
                                  ylabels={s: "mm³" for s in structures}, columns=5, title="Volumes")
    if asymmetry:
        series = {a: [float(r.get(a, math.nan)) for r in volume_rows] for a in asymmetry}
        asym_path = strip_plots(series, names, folder / "group_desc-asymmetry_plot.png",
                                flagged=marks(asymmetry, asym_outliers),
                                columns=5, title="Asymmetry index 2(L-R)/(L+R)")
    return volume_path, asym_path, volume_outliers, asym_outliers


def registration_page_path(folder: Path, template: str, page: int) -> Path:
    """The first registration figure keeps its historical name; later ones are ``page-<N>``."""
    if page == 1:
        return folder / f"group_space-{template}_desc-registration_plot.png"
    return folder / f"group_space-{template}_desc-registration_page-{page}_plot.png"


def _registration_figures(space: TemplateSpace, folder: Path, outline: np.ndarray | None,
                          centre: int) -> list[dict[str, Any]]:
    """One thumbnail figure per page of at most :data:`MAX_THUMBNAILS` registered images (each
    page's images are read only while it is drawn); stale pages of an earlier, larger run are
    removed."""
    chunks = pages(len(space.registered), MAX_THUMBNAILS)
    figures = []
    for number, chunk in enumerate(chunks, start=1):
        pictures = []
        for name, path in (space.registered[i] for i in chunk):
            img = nib.load(str(path))
            pictures.append((name, to_ras(np.asarray(img.dataobj, dtype=np.float32), img.affine)[:, :, centre].T))
        which = f" (images {chunk.start + 1}-{chunk.stop} of {len(space.registered)})" if len(chunks) > 1 else ""
        figure = thumbnails(
            pictures, registration_page_path(folder, space.name, number),
            outline=outline[:, :, centre].T if outline is not None else None,
            title=f"Synthetic T1w images registered to {space.name}{which}",
        )
        figures.append({"path": figure, "first": chunk.start + 1, "last": chunk.stop,
                        "names": [space.registered[i][0] for i in chunk]})
    for stale in folder.glob(f"group_space-{space.name}_desc-registration_page-*_plot.png"):
        number = stale.name.split("_page-", 1)[1].split("_", 1)[0]
        if not number.isdigit() or int(number) > len(chunks):
            stale.unlink(missing_ok=True)
    return figures


def _template_figures(space: TemplateSpace, folder: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    template_img = nib.load(str(space.t1w))
    template = to_ras(np.asarray(template_img.dataobj, dtype=np.float32), template_img.affine)
    outline = None
    if space.brain_mask is not None:
        outline = to_ras(np.asarray(nib.load(str(space.brain_mask)).dataobj) > 0, template_img.affine)
    if space.registered:
        figures["registration"] = _registration_figures(space, folder, outline, template.shape[2] // 2)
    base = template
    if space.median is not None:
        median_img = nib.load(str(space.median))
        base = to_ras(np.asarray(median_img.dataobj, dtype=np.float32), median_img.affine)
        figures["median"] = mosaic(
            [Layer(space.name, template), Layer("median", base)],
            folder / f"group_space-{space.name}_desc-median_plot.png", reference=template,
            title=f"Template {space.name} and median of {count(space.median_n, 'registered synthetic T1w image')}",
        )
    if space.lesion_map is not None:
        lesion_img = nib.load(str(space.lesion_map))
        frequency = to_ras(np.asarray(lesion_img.dataobj, dtype=np.float32), lesion_img.affine)
        figures["lesion"] = mosaic(
            [Layer("median" if space.median is not None else space.name, base)],
            folder / f"group_space-{space.name}_desc-lesion_plot.png", reference=template, heat=frequency,
            heat_label="fraction of participants", n_slices=6,
            title=f"Lesion frequency ({count(space.lesion_n, 'participant')} with a lesion mask)",
        )
    return figures


def write_group_report(
    config: RunConfig,
    *,
    qc_rows: Sequence[dict[str, Any]],
    volume_rows: Sequence[dict[str, Any]],
    structures: Sequence[str],
    asymmetry_columns: Sequence[str],
    missing_subjects: Sequence[str],
    missing_scans: Sequence[str],
    errors: Sequence[str],
    space: TemplateSpace | None,
) -> Path:
    """Write ``group.html`` and its figures; returns the report's path."""
    output_dir = config.output_dir
    folder = output_dir / "figures"
    reports = _SubjectReports(output_dir)
    names = [image_stem(r["image"]) for r in qc_rows]
    qc_figure = _qc_figure(qc_rows, names, folder / "group_desc-qc_plot.png") if qc_rows else None
    volume_names = [image_stem(r["image"]) for r in volume_rows]
    volume_links = [reports.link(r["participant_id"], n) for r, n in zip(volume_rows, volume_names)]
    volumes_figure, asymmetry_figure, volume_outliers, asym_outliers = _volume_figures(
        volume_rows, volume_names, structures, asymmetry_columns, folder)
    template_figures = _template_figures(space, folder) if space is not None else {}

    def link(path: Path | None) -> str | None:
        return relative_link(path, output_dir) if path is not None else None

    table = []
    for row, name in zip(qc_rows, names):
        marked = flagged_metrics(row.get("qc_flags"))
        cells = [{"text": name, "cls": "image", "link": reports.link(row["participant_id"], name), "flag": False}]
        for column in TABLE_COLUMNS:
            text, numeric = _fmt(row.get(column))
            flag = column in marked
            cls = " ".join(c for c, on in (("num", numeric), ("flag", flag)) if on)
            cell = {"text": text, "cls": cls, "link": None, "flag": flag}
            if column == "participant_id":
                cell["link"] = reports.link(row[column])
            cells.append(cell)
        table.append({"cells": cells, "flagged": bool(row.get("qc_flags"))})
    n_flagged = sum(bool(r.get("qc_flags")) for r in qc_rows)
    n_informative = sum(any(math.isfinite(float(r.get(m, math.nan))) for r in qc_rows) for m in OUTLIER_METRICS)
    volume_items = _outlier_items(volume_outliers, volume_names, volume_links, " mm³")
    asym_items = _outlier_items(asym_outliers, volume_names, volume_links, "",
                                lambda c: f"asymmetry of {c[len('asym_'):]}")
    n_volumes = len(volume_rows)
    registration = [
        {
            "src": link(page["path"]),
            "alt": ("Axial slices through the template centre of "
                    f"{count(len(page['names']), 'registered synthetic T1w image')}"
                    + (f" (images {page['first']} to {page['last']} of {len(space.registered)})"
                       if len(template_figures["registration"]) > 1 else "")
                    + ": " + ", ".join(page["names"])),
        }
        for page in template_figures.get("registration", [])
    ] if space is not None else []
    missing = []
    for participant in missing_subjects:
        report = reports.link(participant)
        missing.append({
            "id": participant,
            "link": f"{report}#errors" if report else None,
            "errors": report_errors(output_dir / f"{participant}.html") if report else [],
        })
    html = render(
        "group.html",
        n_images=len(qc_rows),
        n_subjects=len({r["participant_id"] for r in qc_rows}),
        missing_subjects=missing,
        missing_scans=list(missing_scans),
        n_flagged=n_flagged,
        errors=list(errors),
        outlier_z=OUTLIER_Z,
        rules=f"template correlation below {MIN_TEMPLATE_CORRELATION}" if space is not None else "",
        qc_figure=link(qc_figure),
        qc_alt=(f"Strip plots of {count(n_informative, 'QC number')} over {count(len(qc_rows), 'synthetic image')}, "
                f"plus the largest source voxel size for information; "
                + (f"{count(n_flagged, 'flagged image')}, highlighted in the table below" if n_flagged
                   else "no image is flagged")),
        info_metrics=[m + INFO_SUFFIX for m in INFO_METRICS],
        qc_columns=["image", *TABLE_COLUMNS],
        qc_rows=table,
        volumes_figure=link(volumes_figure),
        volumes_alt=(f"Strip plots of the volumes of {count(len(structures), 'structure')} over "
                     f"{count(n_volumes, 'segmented image')}; "
                     + (f"{count(len(volume_items), 'outlying volume')}, listed below" if volume_items
                        else "no outlying volume")),
        volume_outliers=volume_items,
        asymmetry_figure=link(asymmetry_figure),
        asymmetry_alt=(f"Strip plots of the asymmetry index of {count(len(asymmetry_columns), 'paired structure')} "
                       f"over {count(n_volumes, 'segmented image')}; "
                       + (f"{count(len(asym_items), 'outlying value')}, listed below" if asym_items
                          else "no outlying value")),
        asymmetry_outliers=asym_items,
        template=space.name if space is not None else None,
        registration_figures=registration,
        registration_n=len(space.registered) if space is not None else 0,
        max_thumbnails=MAX_THUMBNAILS,
        median_figure=link(template_figures.get("median")),
        median_who=count(space.median_n, "participant") if space else "",
        median_file=relative_link(space.median, output_dir) if space and space.median else "",
        lesion_figure=link(template_figures.get("lesion")),
        lesion_who=count(space.lesion_n, "participant") if space else "",
        lesion_file=relative_link(space.lesion_map, output_dir) if space and space.lesion_map else "",
        template_notes=space.notes if space else [],
        command=" ".join(config.command_line),
        run_id=config.run_id,
    )
    path = output_dir / REPORT_NAME
    write_text_atomic(path, html)
    return path
