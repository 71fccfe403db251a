"""The group report ``group.html`` (figures under ``figures/``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from synthsr_bids.config import RunConfig
from synthsr_bids.group.templates import TemplateSpace
from synthsr_bids.group.qc import MIN_TEMPLATE_CORRELATION, OUTLIER_METRICS, OUTLIER_Z, robust_z
from synthsr_bids.io import write_text_atomic
from synthsr_bids.reports.figures import Layer, mosaic, strip_plots, thumbnails, to_ras
from synthsr_bids.reports.render import relative_link, render

REPORT_NAME = "group.html"
#: QC columns shown in the report's table.
TABLE_COLUMNS = (
    "participant_id", "session_id", "source_contrast", "source_voxel_size", "model", "runtime_s",
    "fg_fraction", "intensity_p99", "wm_median", "cjv", "lesion_volume_mm3", "template_corr", "qc_flags",
)


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


def _qc_figure(rows: Sequence[dict[str, Any]], names: Sequence[str], path: Path) -> Path:
    series = {m: [float(r.get(m, math.nan)) for r in rows] for m in OUTLIER_METRICS}
    series["source_max_voxel_mm"] = [float(r.get("source_max_voxel_mm", math.nan)) for r in rows]
    flagged = {}
    for metric, values in series.items():
        z = robust_z(values)
        marks = [bool(np.isfinite(v) and abs(v) > OUTLIER_Z) for v in z]
        if metric == "template_corr":
            marks = [m or (math.isfinite(v) and v < MIN_TEMPLATE_CORRELATION) for m, v in zip(marks, values)]
        flagged[metric] = marks
    return strip_plots(series, names, path, flagged=flagged, title="QC numbers per synthetic image")


def _volume_figures(volume_rows: Sequence[dict[str, Any]], names: Sequence[str], structures: Sequence[str],
                    asymmetry: Sequence[str], folder: Path) -> tuple[Path | None, Path | None]:
    volume_path = asym_path = None
    if structures:
        series = {s: [float(r.get(s, math.nan)) for r in volume_rows] for s in structures}
        flagged = {s: [bool(np.isfinite(z) and abs(z) > OUTLIER_Z) for z in robust_z(v)] for s, v in series.items()}
        volume_path = strip_plots(series, names, folder / "group_desc-volumes_plot.png", flagged=flagged,
                                  ylabels={s: "mm³" for s in structures}, columns=5, title="Volumes")
    if asymmetry:
        series = {a: [float(r.get(a, math.nan)) for r in volume_rows] for a in asymmetry}
        flagged = {a: [bool(np.isfinite(z) and abs(z) > OUTLIER_Z) for z in robust_z(v)] for a, v in series.items()}
        asym_path = strip_plots(series, names, folder / "group_desc-asymmetry_plot.png", flagged=flagged,
                                columns=5, title="Asymmetry index 2(L-R)/(L+R)")
    return volume_path, asym_path


def _template_figures(space: TemplateSpace, folder: Path) -> dict[str, Path]:
    figures: dict[str, Path] = {}
    template_img = nib.load(str(space.t1w))
    template = to_ras(np.asarray(template_img.dataobj, dtype=np.float32), template_img.affine)
    outline = None
    if space.brain_mask is not None:
        outline = to_ras(np.asarray(nib.load(str(space.brain_mask)).dataobj) > 0, template_img.affine)
    if space.registered:
        centre = template.shape[2] // 2
        pictures = []
        for name, path in space.registered:
            img = nib.load(str(path))
            pictures.append((name, to_ras(np.asarray(img.dataobj, dtype=np.float32), img.affine)[:, :, centre].T))
        figures["registration"] = thumbnails(
            pictures, folder / f"group_space-{space.name}_desc-registration_plot.png",
            outline=outline[:, :, centre].T if outline is not None else None,
            title=f"Synthetic T1w images registered to {space.name}",
        )
    base = template
    if space.median is not None:
        median_img = nib.load(str(space.median))
        base = to_ras(np.asarray(median_img.dataobj, dtype=np.float32), median_img.affine)
        figures["median"] = mosaic(
            [Layer(space.name, template), Layer("median", base)],
            folder / f"group_space-{space.name}_desc-median_plot.png", reference=template,
            title=f"Template {space.name} and median of {space.median_n} registered synthetic T1w images",
        )
    if space.lesion_map is not None:
        lesion_img = nib.load(str(space.lesion_map))
        frequency = to_ras(np.asarray(lesion_img.dataobj, dtype=np.float32), lesion_img.affine)
        figures["lesion"] = mosaic(
            [Layer("median" if space.median is not None else space.name, base)],
            folder / f"group_space-{space.name}_desc-lesion_plot.png", reference=template, heat=frequency,
            heat_label="fraction of participants", n_slices=6,
            title=f"Lesion frequency ({space.lesion_n} participants with a lesion mask)",
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
    names = [f"{r['participant_id']}" + (f" {r['session_id']}" if r.get("session_id") else "") for r in qc_rows]
    qc_figure = _qc_figure(qc_rows, names, folder / "group_desc-qc_plot.png") if qc_rows else None
    volume_names = [f"{r['participant_id']}" + (f" {r['session_id']}" if r.get("session_id") else "") for r in volume_rows]
    volumes_figure, asymmetry_figure = _volume_figures(volume_rows, volume_names, structures, asymmetry_columns, folder)
    template_figures = _template_figures(space, folder) if space is not None else {}

    def link(path: Path | None) -> str | None:
        return relative_link(path, output_dir) if path is not None else None

    table = []
    for row in qc_rows:
        cells = []
        for column in TABLE_COLUMNS:
            text, numeric = _fmt(row.get(column))
            cell = {"text": text, "num": numeric, "link": None}
            if column == "participant_id" and (output_dir / f"{row[column]}.html").is_file():
                cell["link"] = f"{row[column]}.html"
            cells.append(cell)
        table.append({"cells": cells, "flagged": bool(row.get("qc_flags"))})
    html = render(
        "group.html",
        n_images=len(qc_rows),
        n_subjects=len({r["participant_id"] for r in qc_rows}),
        missing_subjects=list(missing_subjects),
        missing_scans=list(missing_scans),
        n_flagged=sum(bool(r.get("qc_flags")) for r in qc_rows),
        errors=list(errors),
        outlier_z=OUTLIER_Z,
        rules=f"template correlation below {MIN_TEMPLATE_CORRELATION}" if space is not None else "",
        qc_figure=link(qc_figure),
        qc_columns=list(TABLE_COLUMNS),
        qc_rows=table,
        volumes_figure=link(volumes_figure),
        asymmetry_figure=link(asymmetry_figure),
        template=space.name if space is not None else None,
        registration_figure=link(template_figures.get("registration")),
        median_figure=link(template_figures.get("median")),
        median_n=space.median_n if space else 0,
        median_file=relative_link(space.median, output_dir) if space and space.median else "",
        lesion_figure=link(template_figures.get("lesion")),
        lesion_n=space.lesion_n if space else 0,
        lesion_file=relative_link(space.lesion_map, output_dir) if space and space.lesion_map else "",
        template_notes=space.notes if space else [],
        command=" ".join(config.command_line),
        run_id=config.run_id,
    )
    path = output_dir / REPORT_NAME
    write_text_atomic(path, html)
    return path
