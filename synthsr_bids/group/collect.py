"""What participant level wrote, image by image, and what it did not write."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from synthsr_bids.config import RunConfig
from synthsr_bids.derivatives.naming import output_paths
from synthsr_bids.errors import NoInputError
from synthsr_bids.group.qc import image_metrics
from synthsr_bids.morphometry.images import SyntheticImage, find_synthetic_images
from synthsr_bids.morphometry.volumes import StructureVolume, read_volumes_tsv, voxel_volume

LOGGER = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One synthetic image and everything the group level knows about it."""

    image: SyntheticImage
    metadata: dict[str, Any]
    volumes: list[StructureVolume] | None = None
    segmentation_model: str | None = None
    lesion_volume_mm3: float | None = None
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


def collect(image: SyntheticImage) -> ImageRecord:
    """Read the image, its sidecar, segmentation, volumes and lesion mask; compute QC numbers."""
    metadata = image.metadata()
    record = ImageRecord(image=image, metadata=metadata)
    img = nib.load(str(image.path))
    data = np.asanyarray(img.dataobj, dtype=np.float32)
    dseg = None
    if image.dseg.is_file() and image.volumes_tsv.is_file():
        dseg = np.asanyarray(nib.load(str(image.dseg)).dataobj)
        record.volumes = read_volumes_tsv(image.volumes_tsv)
        try:
            record.segmentation_model = json.loads(image.dseg_json.read_text())["SynthSR"]["SegmentationModel"]["Name"]
        except (OSError, ValueError, KeyError):
            record.segmentation_model = None
    record.metrics = image_metrics(data, dseg, voxel_volume(img.affine))
    if image.lesion_mask.is_file():
        mask = np.asanyarray(nib.load(str(image.lesion_mask)).dataobj) > 0
        record.lesion_volume_mm3 = float(mask.sum()) * voxel_volume(img.affine)
    return record


def find_missing(config: RunConfig, images: list[SyntheticImage]) -> tuple[list[str], list[str]]:
    """(participants of the raw dataset without any synthetic image, raw scans without one).

    The raw scans are the ones participant level selects with the same options
    (``--contrasts``, ``--bids-filter-file``, labels), found with the same pybids query.
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
