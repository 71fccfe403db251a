"""Participant level after synthesis: lesion masks, segmentation, volumes, subject reports.

:func:`run_downstream` is called at the end of ``run_participant`` with the run's
:class:`~synthsr_bids.pipeline.RunSummary`. For every synthetic image of the run (written now
or earlier) it

1. resamples the matching lesion mask onto the synthetic grid (see :mod:`.lesions`);
2. segments the synthetic T1w and writes the ``dseg`` image, its ``dseg.tsv`` look-up table
   and the per-structure volumes (when a segmentation model is available);

then writes one HTML report per participant of the run. Each step is skipped on rerun when
its sidecar records the same inputs (SHA-256 of the synthetic image, of the mask, of the
model). A failing step is reported (log, report, exit code 1) and the others go on.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from synthsr_bids.config import RunConfig
from synthsr_bids.progress import progress_bar
from synthsr_bids.derivatives import dataset as shared_files
from synthsr_bids.derivatives.naming import output_paths
from synthsr_bids.derivatives.sidecars import file_sha256, read_provenance
from synthsr_bids.io import is_nonempty_file, save_nifti_atomic, write_json_atomic, write_text_atomic
from synthsr_bids.morphometry.images import (
    SyntheticImage,
    bids_uri_here,
    parse_synthetic,
)
from synthsr_bids.morphometry.lesions import LesionMask, find_lesion_masks, match_lesion_mask, resample_mask
from synthsr_bids.morphometry.volumes import label_volumes, voxel_volume, volumes_to_tsv

LOGGER = logging.getLogger(__name__)

#: Files the BIDS validator does not know (morphometry tables, transforms, group tables).
#: ``sub-*/figures`` and ``sub-*/log`` without the trailing slash: bids-validator-deno 2.x
#: does not match ``sub-*/figures/`` against the folder itself.
BIDSIGNORE_LINES: tuple[str, ...] = (
    "figures", "sub-*/figures", "sub-*/log", "*_volumes.tsv", "*_xfm.h5", "*_xfm.json", "group_*",
)


@dataclass
class Failure:
    """Something that went wrong for one scan or image (shown in the reports)."""

    what: str
    error: str
    crash_file: Path | None = None


@dataclass
class DownstreamSummary:
    results: list["DownstreamResult"] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Run-level problems (reports that could not be written...)."""
    model_error: str | None = None
    """``--segmentation-model`` was given but cannot be used (a usage error)."""

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.model_error or any(r.failures for r in self.results))


@dataclass
class DownstreamResult:
    image: SyntheticImage
    lesion_mask: Path | None = None
    lesion_source: str | None = None
    dseg: Path | None = None
    volumes: Path | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


def segmentation_description(contrast: str) -> str:
    return (
        f"Whole-brain segmentation (FreeSurfer labels) of the synthetic T1w made from a {contrast} "
        "image, by the synthsr-bids segmentation U-Net"
    )


def _is_done(paths: Sequence[Path], sidecar: Path, provenance: dict[str, Any], overwrite: bool) -> bool:
    # a file left empty by a machine crash is never taken as done
    return not overwrite and all(is_nonempty_file(p) for p in paths) and read_provenance(sidecar) == provenance


# ---------------------------------------------------------------------------- lesions
def write_lesion_mask(
    image: SyntheticImage,
    mask: LesionMask,
    *,
    synthetic_sha256: str,
    overwrite: bool = False,
    reference: nib.Nifti1Image | None = None,
) -> tuple[Path, bool]:
    """Resample ``mask`` onto ``image``'s grid; returns the path and whether it was (re)written."""
    provenance = {"Source": mask.uri, "SourceSHA256": file_sha256(mask.path), "ReferenceSHA256": synthetic_sha256}
    if _is_done([image.lesion_mask], image.lesion_json, provenance, overwrite):
        return image.lesion_mask, False
    reference = reference if reference is not None else nib.load(str(image.path))
    source = nib.load(str(mask.path))
    source_data = np.asanyarray(source.dataobj)
    on_grid = resample_mask(source_data, source.affine, reference.shape[:3], reference.affine)
    save_nifti_atomic(on_grid, reference.affine, image.lesion_mask, dtype=np.uint8)
    source_volume = float((source_data > 0).sum()) * voxel_volume(source.affine)
    volume = float(on_grid.sum()) * voxel_volume(reference.affine)
    write_json_atomic(
        image.lesion_json,
        {
            "Description": "Lesion mask resampled onto the grid of the synthetic T1w (trilinear "
            "interpolation of the binary mask, then >= 0.5)",
            "Type": "Lesion",
            "Sources": [mask.uri],
            "SpatialReference": bids_uri_here(image.path, image.output_dir),
            **image.resolution_field,
            "SynthSR": {
                "LesionVolumeMM3": round(volume, 1),
                "SourceLesionVolumeMM3": round(source_volume, 1),
                "Provenance": provenance,
            },
        },
    )
    return image.lesion_mask, True


# ---------------------------------------------------------------------------- segmentation
def write_segmentation(
    image: SyntheticImage,
    segmenter: Any,
    *,
    synthetic_sha256: str,
    device: str = "cpu",
    overwrite: bool = False,
    command_line: Sequence[str] = (),
) -> tuple[Path, bool]:
    """Segment ``image``; write the dseg image, look-up TSV, sidecar and volumes TSV."""
    from synthsr_bids.morphometry.segment import segment

    provenance = {"SourceSHA256": synthetic_sha256, "ModelSHA256": segmenter.sha256}
    outputs = [image.dseg, image.dseg_tsv, image.volumes_tsv]
    if _is_done(outputs, image.dseg_json, provenance, overwrite):
        return image.dseg, False
    img = nib.load(str(image.path))
    result = segment(np.asanyarray(img.dataobj, dtype=np.float64), img.affine, segmenter, device=device)
    save_nifti_atomic(result.labels, img.affine, image.dseg, dtype=np.int16)
    write_text_atomic(image.dseg_tsv, segmenter.table.to_tsv())
    volumes = label_volumes(result.labels, img.affine, segmenter.table)
    write_text_atomic(image.volumes_tsv, volumes_to_tsv(volumes))
    write_json_atomic(
        image.dseg_json,
        {
            "Description": segmentation_description(image.contrast),
            "Sources": [bids_uri_here(image.path, image.output_dir)],
            "SpatialReference": bids_uri_here(image.path, image.output_dir),
            **image.resolution_field,
            "SynthSR": {
                "SegmentationModel": {"Name": segmenter.name, "SHA256": segmenter.sha256, "License": segmenter.license},
                "Labels": len(segmenter.table.ids),
                "LeftRightFlipAveraging": result.flipped,
                "RuntimeSeconds": round(result.seconds, 3),
                "Provenance": provenance,
                "Software": shared_files.software_versions(),
                "CommandLine": " ".join(command_line),
            },
        },
    )
    return image.dseg, True


# ---------------------------------------------------------------------------- orchestration
def images_of_run(config: RunConfig, summary: Any) -> tuple[list[SyntheticImage], dict[str, list[Failure]]]:
    """Synthetic images of the run's finished scans, and the failed scans per subject."""
    images: list[SyntheticImage] = []
    failures: dict[str, list[Failure]] = {}
    for result in summary.results:
        if result.status == "failed":
            failures.setdefault(result.scan.subject, []).append(
                Failure(what=result.scan.relpath, error=result.error or "failed", crash_file=result.crash_file)
            )
            continue
        t1w = output_paths(config.output_dir, result.scan.entities, result.scan.suffix, native_grid=config.native_grid).t1w
        image = parse_synthetic(config.output_dir, t1w)
        if image is not None and t1w.is_file():
            images.append(image)
    return images, failures


def _load_segmenter(config: RunConfig) -> tuple[Any, str | None]:
    """(segmenter or None, error message or None)."""
    from synthsr_bids.morphometry.segment import DEFAULT_SEGMENTATION_MODEL, SegmentationModelError, resolve_segmenter

    if not config.downstream.segmentation:
        LOGGER.info("segmentation skipped (--skip-segmentation)")
        return None, None
    try:
        segmenter = resolve_segmenter(config.downstream.segmentation_model)
    except SegmentationModelError as exc:
        return None, f"segmentation model unusable: {exc}"
    if segmenter is None:
        LOGGER.info(
            "segmentation skipped: no segmentation model is available (pass --segmentation-model "
            "PATH, or install the registered %r model); volumes will not be computed",
            DEFAULT_SEGMENTATION_MODEL,
        )
    else:
        LOGGER.info(
            "segmentation model %s (sha256 %s..., %d labels)", segmenter.name, segmenter.sha256[:12], len(segmenter.table.ids)
        )
    return segmenter, None


def process_image(
    image: SyntheticImage,
    *,
    config: RunConfig,
    segmenter: Any,
    masks: Sequence[LesionMask],
    device: str = "cpu",
) -> DownstreamResult:
    """Lesion mask and segmentation of one synthetic image; never raises."""
    result = DownstreamResult(image=image)
    try:
        sha = file_sha256(image.path)
    except OSError as exc:
        result.failures.append(Failure(image.relpath, f"cannot read the synthetic image: {exc}"))
        return result
    mask = match_lesion_mask(masks, image.entities)
    steps: list[tuple[str, Any]] = []
    if mask is not None:
        steps.append(("lesion mask", lambda: write_lesion_mask(image, mask, synthetic_sha256=sha, overwrite=config.overwrite)))
    if segmenter is not None:
        steps.append((
            "segmentation",
            lambda: write_segmentation(
                image, segmenter, synthetic_sha256=sha, device=device, overwrite=config.overwrite,
                command_line=config.command_line,
            ),
        ))
    for what, step in steps:
        started = time.perf_counter()
        try:
            path, written = step()
        except Exception as exc:  # one image must not stop the others
            crash = _crash_file(config, image, what)
            try:
                crash.parent.mkdir(parents=True, exist_ok=True)
                crash.write_text(f"image: {image.path}\nstep: {what}\nrun: {config.run_id}\n\n" + traceback.format_exc())
            except OSError:
                crash = None
            result.failures.append(Failure(f"{image.relpath} ({what})", f"{exc.__class__.__name__}: {exc}", crash))
            LOGGER.error("%s: %s FAILED: %s", image.name, what, exc)
            continue
        if what == "lesion mask":
            result.lesion_mask, result.lesion_source = path, mask.uri if mask else None
        else:
            result.dseg, result.volumes = path, image.volumes_tsv
        LOGGER.info(
            "%s: %s %s%s", image.name, what,
            f"written in {time.perf_counter() - started:.1f} s" if written else "up to date, skipped",
            f" ({mask.uri})" if what == "lesion mask" and mask else "",
        )
    return result


def _crash_file(config: RunConfig, image: SyntheticImage, what: str) -> Path:
    return (
        config.output_dir / f"sub-{image.subject}" / "log" / config.run_id
        / f"crash-{image.stem}-{what.replace(' ', '')}.txt"
    )


def run_downstream(config: RunConfig, summary: Any, *, device: str = "cpu") -> DownstreamSummary:
    """Everything after synthesis for the scans of ``summary`` (see the module docstring)."""
    shared_files.ensure_bidsignore(config.output_dir, BIDSIGNORE_LINES)
    images, failures = images_of_run(config, summary)
    segmenter, model_error = _load_segmenter(config) if images else (None, None)
    errors: list[str] = []
    if model_error:
        LOGGER.error("%s", model_error)
    if segmenter is not None:
        shared_files.add_descriptions(
            config.output_dir, {image.segmentation_desc: segmentation_description(image.contrast) for image in images}
        )
    masks_by_subject: dict[str, list[LesionMask]] = {}
    results: list[DownstreamResult] = []
    with progress_bar(len(images), unit="image", desc="segmentation and lesion masks") as bar:
        for image in images:
            bar.set_postfix_str(image.path.name, refresh=True)
            if image.subject not in masks_by_subject:
                masks_by_subject[image.subject] = find_lesion_masks(
                    config.bids_dir, image.subject, extra_dir=config.downstream.lesion_masks
                )
            results.append(process_image(image, config=config, segmenter=segmenter,
                                         masks=masks_by_subject[image.subject], device=device))
            bar.update(1)
    if config.downstream.reports:
        from synthsr_bids.reports.subject import write_subject_report

        subjects = sorted({r.scan.subject for r in summary.results})
        for subject in subjects:
            subject_failures = list(failures.get(subject, []))
            for result in results:
                if result.image.subject == subject:
                    subject_failures.extend(result.failures)
            if model_error:
                subject_failures.append(Failure("segmentation", model_error))
            try:
                path = write_subject_report(config, subject, failures=subject_failures)
            except Exception as exc:  # a report must never hide the outputs
                LOGGER.error("sub-%s: the HTML report could not be written: %s", subject, exc)
                LOGGER.debug("report traceback", exc_info=True)
                errors.append(f"sub-{subject}: report failed: {exc}")
            else:
                LOGGER.info("sub-%s: report %s", subject, path)
    return DownstreamSummary(results=results, errors=errors, model_error=model_error)
