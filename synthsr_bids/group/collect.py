"""What participant level wrote, image by image, and what it did not write.

A segmentation (``dseg`` + volumes) or lesion mask is only used when its sidecar records the
SHA-256 of the synthetic image as it is now (``SynthSR.Provenance.SourceSHA256`` of the dseg,
``SynthSR.Provenance.ReferenceSHA256`` of the lesion mask): a participant rerun that replaced
the image but not them (``--skip-segmentation``, a lesion mask no longer found) leaves files
that describe another image. Those are ignored, with a warning naming the file and the fix, and
listed in the QC table's ``stale_outputs`` column.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from synthsr_bids.config import DEFAULT_CONTRASTS, RunConfig
from synthsr_bids.derivatives.naming import output_paths
from synthsr_bids.derivatives.sidecars import file_sha256, read_provenance
from synthsr_bids.errors import NoInputError
from synthsr_bids.group.qc import image_metrics
from synthsr_bids.morphometry.images import SyntheticImage, find_synthetic_images
from synthsr_bids.morphometry.volumes import StructureVolume, read_volumes_tsv, voxel_volume

LOGGER = logging.getLogger(__name__)

#: ``stale_outputs`` values, and the sidecar key recording the synthetic image each was made from.
STALE_SEGMENTATION = "segmentation"
STALE_LESION_MASK = "lesion_mask"
SEGMENTATION_IMAGE_KEY = "SourceSHA256"
LESION_IMAGE_KEY = "ReferenceSHA256"


@dataclass
class ImageRecord:
    """One synthetic image and everything the group level knows about it."""

    image: SyntheticImage
    metadata: dict[str, Any]
    sha256: str = ""
    """SHA-256 of the synthetic image (also the registration's rerun key)."""
    volumes: list[StructureVolume] | None = None
    segmentation_model: str | None = None
    lesion_volume_mm3: float | None = None
    lesion_mask: Path | None = None
    """The image's lesion mask when it exists and was made from this image (else ``None``)."""
    stale_outputs: list[str] = field(default_factory=list)
    """Participant-level outputs ignored because they were made from another version of the image."""
    metrics: dict[str, float] = field(default_factory=dict)
    template_corr: float = math.nan
    registered: Path | None = None
    registered_lesion: Path | None = None
    flags: list[str] = field(default_factory=list)
    registration_error: str | None = None

    @property
    def info(self) -> dict[str, Any]:
        return self.metadata.get("SynthSR", {}) or {}

    def qc_row(self) -> dict[str, Any]:
        info = self.info
        zooms = [float(z) for z in info.get("InputVoxelSizeMM", [])]
        model = info.get("Model", {}) or {}
        return {
            "participant_id": f"sub-{self.image.subject}",
            "session_id": f"ses-{self.image.session}" if self.image.session else None,
            "image": self.image.relpath,
            "source": self.image.source_relpath(self.metadata),
            "source_contrast": info.get("InputContrast", self.image.contrast),
            "source_voxel_size": " ".join(f"{z:g}" for z in zooms) if zooms else None,
            "source_max_voxel_mm": max(zooms) if zooms else math.nan,
            "source_anisotropy": (max(zooms) / min(zooms)) if zooms and min(zooms) > 0 else math.nan,
            "model": model.get("Name"),
            "model_sha256": str(model.get("SHA256", ""))[:12] or None,
            "runtime_s": float(info.get("RuntimeSeconds", math.nan)),
            "n_warnings": len(info.get("Warnings", []) or []),
            **self.metrics,
            "lesion_volume_mm3": self.lesion_volume_mm3 if self.lesion_volume_mm3 is not None else math.nan,
            "template_corr": self.template_corr,
            "qc_flags": self.flags or None,
            "stale_outputs": self.stale_outputs or None,
        }


def select_images(config: RunConfig) -> list[SyntheticImage]:
    """Synthetic images of the selected participants/sessions."""
    if not (config.output_dir / "dataset_description.json").is_file():
        raise NoInputError(
            f"{config.output_dir} holds no synthsr-bids derivatives: run the participant level first"
        )
    images = find_synthetic_images(config.output_dir)
    if config.participant_labels:
        images = [i for i in images if i.subject in config.participant_labels]
    if config.session_labels:
        images = [i for i in images if i.session in config.session_labels]
    if not images:
        raise NoInputError(
            f"no synthetic T1w image in {config.output_dir}"
            + (f" for participants {', '.join(config.participant_labels)}" if config.participant_labels else "")
            + ": run the participant level first"
        )
    return images


def recorded_image_sha256(sidecar: Path, key: str) -> str | None:
    """``SynthSR.Provenance[key]`` of a participant-level sidecar (``None`` when absent or unreadable)."""
    value = (read_provenance(sidecar) or {}).get(key)
    return value if isinstance(value, str) else None


def made_from_image(path: Path, sidecar: Path, key: str, image: SyntheticImage, image_sha256: str, fix: str) -> bool:
    """True when ``sidecar`` (of the participant-level output ``path``) records ``image_sha256`` under
    ``SynthSR.Provenance[key]``; else log that ``path`` is ignored, and ``fix``."""
    recorded = recorded_image_sha256(sidecar, key)
    if recorded == image_sha256:
        return True
    reason = (f"was made from an earlier version of {image.name} (the SHA-256 in {sidecar.name} differs "
              "from the image's)" if recorded
              else f"does not record which synthetic image it was made from (no SynthSR.Provenance.{key} "
                   f"in {sidecar.name})")
    LOGGER.warning("%s %s: ignored by the group level (tables, template space, report). Fix: %s",
                   path.relative_to(image.output_dir).as_posix(), reason, fix)
    return False


def _rerun_command(image: SyntheticImage, option: str = "") -> str:
    session = f" --session-label {image.session}" if image.session else ""
    return (f"synthsr-bids BIDS_DIR OUTPUT_DIR participant --participant-label {image.subject}{session}{option} "
            "plus the options that wrote the image (its model and settings are in its sidecar, the command "
            "lines in logs/config-*.json), or the image is synthesised again")


def segmentation_is_current(image: SyntheticImage, image_sha256: str) -> bool:
    """The image's segmentation (dseg + volumes) was made from the image as it is now."""
    return made_from_image(
        image.dseg, image.dseg_json, SEGMENTATION_IMAGE_KEY, image, image_sha256,
        f"rerun the participant level for sub-{image.subject} without --skip-segmentation "
        f"({_rerun_command(image)}) to segment the current image",
    )


def lesion_mask_is_current(image: SyntheticImage, image_sha256: str) -> bool:
    """The image's lesion mask was resampled onto the image as it is now."""
    return made_from_image(
        image.lesion_mask, image.lesion_json, LESION_IMAGE_KEY, image, image_sha256,
        f"rerun the participant level for sub-{image.subject} with its lesion mask "
        f"({_rerun_command(image, ' [--lesion-masks DIR]')}), or delete {image.lesion_mask.name} "
        "(+ .json) if the participant has no lesion mask any more",
    )


def collect(image: SyntheticImage) -> ImageRecord:
    """Read the image, its sidecar, segmentation, volumes and lesion mask (those made from this
    image); compute QC numbers."""
    metadata = image.metadata()
    record = ImageRecord(image=image, metadata=metadata, sha256=file_sha256(image.path))
    img = nib.load(str(image.path))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    dseg = None
    if image.dseg.is_file() and image.volumes_tsv.is_file():
        if segmentation_is_current(image, record.sha256):
            dseg = np.asanyarray(nib.load(str(image.dseg)).dataobj)
            record.volumes = read_volumes_tsv(image.volumes_tsv)
            record.segmentation_model = _segmentation_model(image)
        else:
            record.stale_outputs.append(STALE_SEGMENTATION)
    record.metrics = image_metrics(data, dseg, voxel_volume(img.affine))
    if image.lesion_mask.is_file():
        if lesion_mask_is_current(image, record.sha256):
            record.lesion_mask = image.lesion_mask
            mask = np.asanyarray(nib.load(str(image.lesion_mask)).dataobj) > 0
            record.lesion_volume_mm3 = float(mask.sum()) * voxel_volume(img.affine)
        else:
            record.stale_outputs.append(STALE_LESION_MASK)
    return record


def _segmentation_model(image: SyntheticImage) -> str | None:
    try:
        return json.loads(image.dseg_json.read_text())["SynthSR"]["SegmentationModel"]["Name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_missing(config: RunConfig, images: list[SyntheticImage]) -> tuple[list[str], list[str]]:
    """(participants of the raw dataset without any synthetic image, raw scans without one).

    The raw scans are the ones participant level would select with the group run's own options
    (``--contrasts``, ``--bids-filter-file``, labels), found with the same pybids query: the
    group level does not guess the participant runs' options (see :func:`selection_hint`).
    """
    from synthsr_bids.discovery import find_scans

    done_subjects = {i.subject for i in images}
    try:
        scans = find_scans(config)
    except NoInputError as exc:
        LOGGER.warning("cannot list the raw scans to find missing outputs: %s", exc)
        return [], []
    except Exception as exc:  # a broken raw dataset must not stop the summary
        LOGGER.warning("cannot index the raw dataset %s to find missing outputs: %s", config.bids_dir, exc)
        return [], []
    missing_scans = []
    for scan in scans:
        candidates = [
            output_paths(config.output_dir, scan.entities, scan.suffix, native_grid=native).t1w
            for native in (False, True)
        ]
        if not any(p.is_file() and p.with_name(p.name.replace(".nii.gz", ".json")).is_file() for p in candidates):
            missing_scans.append(scan.relpath)
    raw_subjects = sorted({s.subject for s in scans})
    missing_subjects = [f"sub-{s}" for s in raw_subjects if s not in done_subjects]
    return missing_subjects, missing_scans


# ---------------------------------------------------------------------------- scan selection
@dataclass(frozen=True)
class ScanSelection:
    """The options that select the kinds of raw scans (the rest of a run's configuration does not
    matter here; neither do participant and session labels, which split the work into jobs, e.g.
    the one-session tasks of a ``--per-session`` SLURM array)."""

    contrasts: tuple[str, ...]
    bids_filters: str
    """Canonical JSON of ``--bids-filter-file``'s filters (``{}`` without one)."""

    @classmethod
    def from_config_dict(cls, values: dict[str, Any]) -> "ScanSelection":
        return cls(
            contrasts=tuple(values.get("contrasts") or DEFAULT_CONTRASTS),
            bids_filters=json.dumps(values.get("bids_filters") or {}, sort_keys=True),
        )

    @classmethod
    def of(cls, config: RunConfig) -> "ScanSelection":
        return cls.from_config_dict(config.to_dict())

    def describe(self) -> str:
        parts = ["default --contrasts" if set(self.contrasts) == set(DEFAULT_CONTRASTS)
                 else "--contrasts " + " ".join(self.contrasts)]
        if self.bids_filters != "{}":
            parts.append(f"--bids-filter-file with {self.bids_filters}")
        return ", ".join(parts)


def participant_selections(output_dir: Path) -> list[ScanSelection]:
    """The distinct scan selections of the participant runs recorded in ``logs/config-*.json``
    (oldest first; unreadable files are skipped)."""
    selections: list[ScanSelection] = []
    for path in sorted((output_dir / "logs").glob("config-*.json")):
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(values, dict) or values.get("analysis_level") != "participant":
            continue
        selection = ScanSelection.from_config_dict(values)
        if selection in selections:
            selections.remove(selection)
        selections.append(selection)
    return selections


def selection_hint(config: RunConfig, n_missing: int, *, shown: int = 3) -> str:
    """Why ``n_missing`` raw scans may be listed as missing: the group level selects them with its own
    options, which the participant runs recorded in ``logs/config-*.json`` may not share."""
    own = ScanSelection.of(config)
    recorded = participant_selections(config.output_dir)
    others = [s for s in recorded if s != own]
    if recorded and not others:
        return (f"{n_missing} raw scan(s) have no synthetic image although the participant runs selected scans "
                f"as this run does ({own.describe()}): they failed or were not run (see the participant reports)")
    hint = (
        f"{n_missing} raw scan(s) have no synthetic image. The group level selects raw scans with its own "
        f"--contrasts/--bids-filter-file/--session-label (this run: {own.describe()}), not with those of the "
        "participant runs: if the participant level was run with other ones, pass the same ones to the group "
        "level so that only the scans it was asked to process are listed as missing"
    )
    if others:
        hint += (". Participant runs of this folder used: "
                 + "; ".join(s.describe() for s in others[-shown:]) + " (logs/config-*.json)")
    return hint
