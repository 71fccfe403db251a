"""``synthsr-bids BIDS_DIR OUTPUT_DIR group``: tables, template space, population maps, report.

1. find the synthetic images participant level wrote (selected participants/sessions), and
   the participants and raw scans without outputs (a partial set is fine: they are listed);
2. per image: sidecar facts, QC numbers, volumes, lesion volume;
3. unless ``--skip-registration``: register every image to the TemplateFlow template
   (``--template``, ``$TEMPLATEFLOW_HOME``), then the median template (one image per
   participant, the best correlated) and, where lesion masks exist, the lesion frequency map;
4. ``group_desc-qc.tsv``, ``group_desc-volumes.tsv`` (+ JSON dictionaries) and ``group.html``;
5. every group-level file of an earlier run that this run did not write (a volumes table without
   valid segmentations, a median template under ``--skip-registration``, a lesion map without
   lesion masks, the report under ``--skip-reports``, unused figures...) is removed, so that the
   group outputs always describe exactly this run's selection.

Exit code 0, or 1 when an image could not be read or registered (the others are summarised).
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from synthsr_bids.config import RunConfig
from synthsr_bids.derivatives import dataset as shared_files
from synthsr_bids.derivatives.sidecars import file_sha256
from synthsr_bids.errors import ExitCode
from synthsr_bids.group.atlas import lesion_frequency, median_image
from synthsr_bids.group.collect import ImageRecord, collect, find_missing, select_images, selection_hint
from synthsr_bids.group.qc import outlier_flags
from synthsr_bids.group.tables import QC_COLUMNS, write_table
from synthsr_bids.group.templates import template_reference
from synthsr_bids.io import save_nifti_atomic, write_json_atomic
from synthsr_bids.morphometry.images import bids_uri_here
from synthsr_bids.morphometry.participant import BIDSIGNORE_LINES
from synthsr_bids.morphometry.volumes import asymmetry_index

LOGGER = logging.getLogger(__name__)

QC_TABLE = "group_desc-qc.tsv"
VOLUMES_TABLE = "group_desc-volumes.tsv"
MEDIAN_DESC = "median"
LESION_DESC = "lesion"
REPORT = "group.html"  # reports.group.REPORT_NAME, named here without importing the report machinery
FIGURES = "figures"


def median_path(output_dir: Path, template: str, resolution: int) -> Path:
    return output_dir / f"space-{template}_res-{resolution}_desc-{MEDIAN_DESC}_T1w.nii.gz"


def lesion_map_path(output_dir: Path, template: str, resolution: int) -> Path:
    return output_dir / f"space-{template}_res-{resolution}_desc-{LESION_DESC}_probseg.nii.gz"


def resolution_metadata(template: Any) -> str:
    """The ``Resolution`` sidecar field BIDS requires with a ``res`` entity."""
    return (f"TemplateFlow resolution index {template.resolution} of {template.name} "
            f"(tpl-{template.name}_res-{template.resolution:02d})")


def _json_of(path: Path) -> Path:
    return path.with_name(path.name.replace(".nii.gz", ".json"))


# ---------------------------------------------------------------------------- registration
def _jobs(records: Sequence[ImageRecord], template: Any, config: RunConfig) -> list[Any]:
    from synthsr_bids.group.register import RegistrationJob

    name = template.name
    reference = template_reference(template)
    template_sha = file_sha256(template.t1w)
    mask_sha = file_sha256(template.brain_mask) if template.brain_mask else None
    work = config.work_dir / f"group-{config.run_id}"
    work.mkdir(parents=True, exist_ok=True)
    jobs = []
    for record in records:
        image = record.image
        lesion = record.lesion_mask  # only a mask made from this image (collect.lesion_mask_is_current)
        xfm_uri = bids_uri_here(image.xfm(name), config.output_dir)
        provenance = {
            "SourceSHA256": record.sha256,
            "Template": name,
            "TemplateResolution": template.resolution,
            "TemplateSHA256": template_sha,
            "TemplateMaskSHA256": mask_sha,
            "TransformType": config.downstream.registration_type,
            "LesionSHA256": file_sha256(lesion) if lesion else None,
        }
        jobs.append(RegistrationJob(
            image=image.path,
            template_name=name,
            template_t1w=template.t1w,
            template_mask=template.brain_mask,
            xfm=image.xfm(name),
            xfm_json=image.xfm_json(name),
            warped=image.in_template(name, template.resolution),
            warped_json=image.in_template_json(name, template.resolution),
            lesion=lesion,
            warped_lesion=image.lesion_in_template(name, template.resolution) if lesion else None,
            warped_lesion_json=image.lesion_in_template_json(name, template.resolution) if lesion else None,
            transform_type=config.downstream.registration_type,
            overwrite=config.overwrite,
            work_dir=work,
            warped_sidecar={
                "Description": f"Synthetic T1w registered to {name} (ANTsPy {config.downstream.registration_type}) "
                               "and resampled onto the template grid (linear interpolation)",
                "Sources": [bids_uri_here(image.path, config.output_dir), xfm_uri],
                "SpatialReference": reference,
                "Resolution": resolution_metadata(template),
                "SkullStripped": False,
                "SynthSR": {"Template": name, "TemplateResolution": template.resolution,
                            "TemplateFile": template.t1w.name},
            },
            lesion_sidecar={
                "Description": f"Lesion mask moved to {name} with the image's transform (linear, then >= 0.5)",
                "Type": "Lesion",
                "Sources": [bids_uri_here(image.lesion_mask, config.output_dir), xfm_uri] if lesion else [],
                "SpatialReference": reference,
                "Resolution": resolution_metadata(template),
            },
            provenance=provenance,
        ))
    return jobs


def _register_all(records: list[ImageRecord], template: Any, config: RunConfig, errors: list[str]) -> None:
    from synthsr_bids.group.register import default_workers, run_jobs

    jobs = _jobs(records, template, config)
    workers = config.inference.nthreads or default_workers()
    by_image = {record.image.path: record for record in records}
    LOGGER.info("registering %d image(s) to %s (ANTsPy %s, %d worker(s))", len(jobs), template.name,
                config.downstream.registration_type, min(workers, len(jobs)))

    def progress(index: int, total: int, outcome: Any) -> None:
        name = outcome.image.name
        if outcome.status == "failed":
            LOGGER.error("[%d/%d] %s: registration FAILED: %s", index, total, name, outcome.error)
        elif outcome.status == "skipped" and outcome.updated_sidecars:
            LOGGER.info("[%d/%d] %s: registration up to date, skipped; rewrote %s (written by an older version, "
                        "now as this version writes it)", index, total, name, ", ".join(outcome.updated_sidecars))
        elif outcome.status == "skipped":
            LOGGER.info("[%d/%d] %s: registration up to date, skipped", index, total, name)
        else:
            LOGGER.info("[%d/%d] %s: registered in %.1f s (correlation with the template %.3f)",
                        index, total, name, outcome.seconds, outcome.correlation)

    for job, outcome in zip(jobs, run_jobs(jobs, workers=workers, progress=progress)):
        record = by_image[outcome.image]
        if outcome.status == "failed":
            record.registration_error = outcome.error
            errors.append(f"{record.image.relpath}: registration failed: {(outcome.error or '').splitlines()[0]}")
            continue
        record.template_corr = outcome.correlation
        record.registered = job.warped
        record.registered_lesion = job.warped_lesion


def _population_maps(records: list[ImageRecord], template: Any, config: RunConfig, space: Any) -> list[Path]:
    """Median template and lesion frequency map (what exists of them); returns the files written."""
    written: list[Path] = []
    output_dir = config.output_dir
    name = template.name
    registered = [r for r in records if r.registered is not None]
    best: dict[str, ImageRecord] = {}
    for record in registered:
        current = best.get(record.image.subject)
        score = record.template_corr if math.isfinite(record.template_corr) else -math.inf
        if current is None or score > (current.template_corr if math.isfinite(current.template_corr) else -math.inf):
            best[record.image.subject] = record
    if best:
        chosen = [best[s] for s in sorted(best)]
        data, affine = median_image([r.registered for r in chosen], work_dir=config.work_dir / f"group-{config.run_id}")
        path = median_path(output_dir, name, template.resolution)
        save_nifti_atomic(data, affine, path)
        write_json_atomic(_json_of(path), {
            "Description": f"Voxel-wise median of the synthetic T1w images registered to {name}, one image per "
                           "participant (the one best correlated with the template)",
            "Sources": [bids_uri_here(r.registered, output_dir) for r in chosen],
            "SpatialReference": template_reference(template),
            "Resolution": resolution_metadata(template),
            "SkullStripped": False,
            "SynthSR": {"Participants": [f"sub-{s}" for s in sorted(best)], "N": len(chosen), "Template": name,
                        "TemplateResolution": template.resolution, "TemplateFile": template.t1w.name},
        })
        space.median, space.median_n = path, len(chosen)
        written += [path, _json_of(path)]
        LOGGER.info("median template of %d participant(s): %s", len(chosen), path.name)
    masks: dict[str, list[Path]] = {}
    for record in registered:
        if record.registered_lesion is not None and record.registered_lesion.is_file():
            masks.setdefault(record.image.subject, []).append(record.registered_lesion)
    if masks:
        frequency, affine, n = lesion_frequency(masks)
        path = lesion_map_path(output_dir, name, template.resolution)
        save_nifti_atomic(frequency, affine, path)
        write_json_atomic(_json_of(path), {
            "Description": f"Lesion frequency in {name}: fraction of the participants with a lesion mask whose "
                           "lesion (union over their images) covers the voxel",
            "Sources": [bids_uri_here(p, output_dir) for s in sorted(masks) for p in masks[s]],
            "SpatialReference": template_reference(template),
            "Resolution": resolution_metadata(template),
            "SynthSR": {"Participants": [f"sub-{s}" for s in sorted(masks)], "N": n, "Template": name,
                        "TemplateResolution": template.resolution},
        })
        space.lesion_map, space.lesion_n = path, n
        written += [path, _json_of(path)]
        LOGGER.info("lesion frequency map of %d participant(s): %s (max %.2f)", n, path.name, float(frequency.max()))
    else:
        space.notes.append("No lesion masks: no lesion frequency map.")
    return written


# ---------------------------------------------------------------------------- tables
def volume_table(records: Sequence[ImageRecord]) -> tuple[list[str], list[dict[str, Any]], list[str], list[str]]:
    """(columns, rows, structure columns, asymmetry columns) of ``group_desc-volumes.tsv``."""
    segmented = [r for r in records if r.volumes is not None]
    index_of: dict[str, int] = {}
    sides: dict[str, dict[str, str]] = {}
    for record in segmented:
        for row in record.volumes or []:
            index_of.setdefault(row.name, row.index)
            if row.hemisphere in ("left", "right"):
                sides.setdefault(row.structure, {})[row.hemisphere] = row.name
    structures = sorted(index_of, key=lambda n: (index_of[n], n))
    pairs = {s: v for s, v in sides.items() if set(v) == {"left", "right"}}
    asym_columns = [f"asym_{s}" for s in sorted(pairs, key=lambda s: index_of[pairs[s]["left"]])]
    rows = []
    for record in segmented:
        volumes = {row.name: row.volume_mm3 for row in record.volumes or []}
        row: dict[str, Any] = {
            "participant_id": f"sub-{record.image.subject}",
            "session_id": f"ses-{record.image.session}" if record.image.session else None,
            "image": record.image.relpath,
            "segmentation": record.image.dseg.relative_to(record.image.output_dir).as_posix(),
            "segmentation_model": record.segmentation_model,
        }
        for name in structures:
            row[name] = volumes.get(name, math.nan)
        for structure, names in pairs.items():
            left, right = volumes.get(names["left"]), volumes.get(names["right"])
            row[f"asym_{structure}"] = asymmetry_index(left, right) if left is not None and right is not None else math.nan
        rows.append(row)
    columns = ["participant_id", "session_id", "image", "segmentation", "segmentation_model", *structures, *asym_columns]
    return columns, rows, structures, asym_columns


def volume_dictionary(structures: Sequence[str], asym_columns: Sequence[str]) -> dict[str, dict[str, str]]:
    dictionary = {
        "participant_id": {"Description": "Participant (sub-<label>)"},
        "session_id": {"Description": "Session (ses-<label>), n/a without sessions"},
        "image": {"Description": "Synthetic T1w image, relative to the derivatives root"},
        "segmentation": {"Description": "Segmentation (dseg) the volumes come from"},
        "segmentation_model": {"Description": "Segmentation model name"},
    }
    for name in structures:
        dictionary[name] = {"Description": f"Volume of {name}", "Units": "mm^3"}
    for column in asym_columns:
        structure = column[len("asym_"):]
        dictionary[column] = {"Description": f"Hemispheric asymmetry index of {structure}: 2(L-R)/(L+R)"}
    return dictionary


# ---------------------------------------------------------------------------- group outputs
def group_outputs_on_disk(output_dir: Path) -> list[Path]:
    """Every group-level file in ``output_dir``, of this run or of an earlier one (per-image files,
    such as template-space images and transforms, are not group-level outputs)."""
    patterns = [
        QC_TABLE, _table_json(QC_TABLE), VOLUMES_TABLE, _table_json(VOLUMES_TABLE), REPORT,
        f"{FIGURES}/group_*.png",
        f"space-*_desc-{MEDIAN_DESC}_T1w.nii.gz", f"space-*_desc-{MEDIAN_DESC}_T1w.json",
        f"space-*_desc-{LESION_DESC}_probseg.nii.gz", f"space-*_desc-{LESION_DESC}_probseg.json",
    ]
    return sorted({path for pattern in patterns for path in output_dir.glob(pattern) if path.is_file()})


def _table_json(name: str) -> str:
    return Path(name).with_suffix(".json").name


_LINK_RE = re.compile(r"""(?:src|href)=["']([^"'#?:]+)(?:#[^"']*)?["']""")


def report_files(report: Path) -> list[Path]:
    """The report and the local files it links to (its figures)."""
    links = _LINK_RE.findall(report.read_text())
    return [report, *(report.parent / link for link in links)]


def remove_stale_outputs(output_dir: Path, written: Iterable[Path]) -> list[Path]:
    """Remove every group-level file this run did not write (each removal is one atomic unlink,
    logged); returns the removed files."""
    keep = {path.resolve() for path in written}
    removed = []
    for path in group_outputs_on_disk(output_dir):
        if path.resolve() in keep:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            LOGGER.warning("cannot remove %s, a group-level output of an earlier run that this run did not write "
                           "(%s): delete it by hand, it does not describe this run", path, exc)
            continue
        removed.append(path)
        LOGGER.warning("removed %s: a group-level output of an earlier run that this run did not write "
                       "(so that the group outputs describe only this run)", path.relative_to(output_dir).as_posix())
    return removed


def _selection_text(config: RunConfig) -> str:
    parts = []
    if config.participant_labels:
        parts.append("--participant-label " + " ".join(config.participant_labels))
    if config.session_labels:
        parts.append("--session-label " + " ".join(config.session_labels))
    return " ".join(parts)


def warn_partial_selection(config: RunConfig) -> None:
    """Say that a participant/session selection makes the group outputs describe only that selection."""
    selection = _selection_text(config)
    if not selection:
        return
    LOGGER.warning(
        "group level run on a selection (%s): %s, %s, the median template, the lesion map and %s now describe only "
        "the selected images (group outputs of an earlier run, e.g. on everyone, are replaced or removed). "
        "Run the group level without --participant-label/--session-label to summarise everyone",
        selection, QC_TABLE, VOLUMES_TABLE, REPORT,
    )


# ---------------------------------------------------------------------------- entry point
def run_group_level(config: RunConfig) -> ExitCode:
    """The group level (module docstring), one run at a time per output folder."""
    with shared_files.group_lock(config.output_dir):
        try:
            return _run_group_level(config)
        finally:
            _remove_if_empty(config.work_dir / f"group-{config.run_id}")


def _remove_if_empty(folder: Path) -> None:
    """The run's work folder: every step cleans its own files inside it, the folder remains."""
    try:
        folder.rmdir()
    except OSError:  # absent, or not empty (kept for inspection)
        pass


def _run_group_level(config: RunConfig) -> ExitCode:
    started = time.perf_counter()
    output_dir = config.output_dir
    images = select_images(config)
    warn_partial_selection(config)
    missing_subjects, missing_scans = find_missing(config, images)
    LOGGER.info("group level: %d synthetic T1w image(s) for %d participant(s)", len(images),
                len({i.subject for i in images}))
    if missing_subjects:
        LOGGER.warning("participants without any synthetic image (failed or not run): %s", ", ".join(missing_subjects))
    for relpath in missing_scans:
        LOGGER.warning("no synthetic image for raw scan %s", relpath)
    if missing_scans:
        LOGGER.warning("%s", selection_hint(config, len(missing_scans)))
    shared_files.ensure_bidsignore(output_dir, BIDSIGNORE_LINES)

    errors: list[str] = []
    records: list[ImageRecord] = []
    for image in images:
        try:
            records.append(collect(image))
        except Exception as exc:  # an unreadable output is reported, the others go on
            LOGGER.error("%s: cannot be read: %s", image.relpath, exc)
            errors.append(f"{image.relpath}: cannot be read: {exc}")

    written: list[Path] = []
    space = None
    if config.downstream.registration and records:
        from synthsr_bids.group.templates import TemplateSpace, get_template

        template = get_template(config.downstream.template, config.downstream.template_resolution)
        space = TemplateSpace(name=template.name, t1w=template.t1w, brain_mask=template.brain_mask)
        _register_all(records, template, config, errors)
        space.registered = [(r.image.stem, r.registered) for r in records if r.registered is not None]
        if space.registered:
            written += _population_maps(records, template, config, space)
            shared_files.add_descriptions(output_dir, {
                MEDIAN_DESC: f"Voxel-wise median of the registered synthetic T1w images ({template.name})",
                LESION_DESC: f"Lesion frequency: fraction of participants lesioned per voxel ({template.name})",
            })
    elif not config.downstream.registration:
        LOGGER.info("template registration skipped (--skip-registration)")

    rows = [record.qc_row() for record in records]
    for record, flags in zip(records, outlier_flags(rows)):
        record.flags = flags
    qc_rows = [record.qc_row() for record in records]
    written += _write_table_files(output_dir / QC_TABLE, list(QC_COLUMNS), qc_rows, QC_COLUMNS)
    flagged = [r for r in qc_rows if r.get("qc_flags")]
    for row in flagged:
        LOGGER.warning("QC: %s flagged (%s)", row["image"], ", ".join(row["qc_flags"]))
    columns, volume_rows, structures, asym_columns = volume_table(records)
    if volume_rows:
        written += _write_table_files(output_dir / VOLUMES_TABLE, columns, volume_rows,
                                      volume_dictionary(structures, asym_columns))
    else:
        LOGGER.info("no valid segmentation found: %s not written", VOLUMES_TABLE)

    if config.downstream.reports:
        from synthsr_bids.reports.group import write_group_report

        path = write_group_report(
            config, qc_rows=qc_rows, volume_rows=volume_rows, structures=structures,
            asymmetry_columns=asym_columns, missing_subjects=missing_subjects, missing_scans=missing_scans,
            errors=errors, space=space,
        )
        written += report_files(path)
        LOGGER.info("group report: %s", path)
    remove_stale_outputs(output_dir, written)
    LOGGER.info("group level finished in %.1f s: %d image(s), %d flagged, %d error(s)",
                time.perf_counter() - started, len(records), len(flagged), len(errors))
    return ExitCode.SCAN_FAILED if errors else ExitCode.OK


def _write_table_files(path: Path, columns: list[str], rows: Sequence[dict[str, Any]],
                       dictionary: Any) -> list[Path]:
    """Write a group table and its JSON dictionary; returns both paths."""
    write_table(path, columns, rows, dictionary)
    return [path, path.with_suffix(".json")]
