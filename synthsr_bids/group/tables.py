"""Group TSV tables (``n/a`` for missing values) and their JSON data dictionaries."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from synthsr_bids.io import write_json_atomic, write_text_atomic

NA = "n/a"

#: Columns of ``group_desc-qc.tsv`` and their descriptions (the JSON sidecar).
QC_COLUMNS: Mapping[str, dict[str, str]] = {
    "participant_id": {"Description": "Participant (sub-<label>)"},
    "session_id": {"Description": "Session (ses-<label>), n/a without sessions"},
    "image": {"Description": "Synthetic T1w image, relative to the derivatives root"},
    "source": {"Description": "Source scan, relative to the raw dataset root"},
    "source_contrast": {"Description": "BIDS suffix of the source scan"},
    "source_voxel_size": {"Description": "Voxel size of the source scan (x y z)", "Units": "mm"},
    "source_max_voxel_mm": {"Description": "Largest voxel dimension (slice thickness) of the source scan", "Units": "mm"},
    "source_anisotropy": {"Description": "Largest over smallest voxel dimension of the source scan"},
    "model": {"Description": "Synthesis model name"},
    "model_sha256": {"Description": "First 12 hex digits of the model file's SHA-256"},
    "runtime_s": {"Description": "Participant-level synthesis time of this image", "Units": "s"},
    "n_warnings": {"Description": "Number of warnings recorded in the image's sidecar"},
    "fg_fraction": {"Description": "Fraction of the field of view above 10% of the 99th percentile (head)"},
    "intensity_p99": {"Description": "99th intensity percentile in the head (SynthSR white matter is about 110)"},
    "saturated_fraction": {"Description": "Fraction of head voxels at SynthSR's output ceiling (>= 127.5)"},
    "wm_median": {"Description": "Median intensity in segmented cerebral white matter"},
    "cjv": {"Description": "Coefficient of joint variation of white and grey matter (lower is better)"},
    "segmented_volume_mm3": {"Description": "Volume of all non-background labels", "Units": "mm^3"},
    "lesion_volume_mm3": {"Description": "Volume of the lesion mask on the synthetic grid", "Units": "mm^3"},
    "template_corr": {"Description": "Correlation with the template inside its brain mask after registration "
                                     "(4 decimals)"},
    "qc_flags": {"Description": "Comma-separated metrics for which the image is an outlier (robust z > 3.5, "
                                "+ above / - below the median) or fails a rule; n/a when none"},
    "stale_outputs": {"Description": "Comma-separated participant-level outputs of this image that were ignored "
                                     "because they were made from an earlier version of the synthetic image "
                                     "(segmentation: dseg and volumes; lesion_mask); rerun the participant level "
                                     "of this participant to remake them (see the log); n/a when none"},
}


def _cell(value: Any) -> str:
    if value is None:
        return NA
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return NA
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value) if value else NA
    text = str(value)
    return text if text else NA


def tsv_text(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def write_table(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]],
                dictionary: Mapping[str, Mapping[str, str]] | None = None) -> Path:
    """Write ``path`` (TSV) and, with ``dictionary``, its JSON sidecar."""
    write_text_atomic(path, tsv_text(columns, rows))
    if dictionary is not None:
        write_json_atomic(path.with_suffix(".json"), {c: dict(dictionary[c]) for c in columns if c in dictionary})
    return path


def read_table(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text()), delimiter="\t"))


def as_float(text: str | None) -> float:
    if text in (None, "", NA):
        return math.nan
    return float(text)
