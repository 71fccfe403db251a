"""JSON sidecars: exactly how each synthetic image was made.

The ``Provenance`` block doubles as the rerun key: a scan is skipped on rerun
only when its sidecar exists and records the same source file, model and
settings (see :func:`provenance_matches`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from synthsr_bids.hashing import sha256_file as file_sha256  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class ModelInfo:
    """What the sidecar says about the network weights."""

    name: str
    sha256: str
    license: str
    version: str = ""


def bids_uri(relpath: str, dataset: str = "raw") -> str:
    """BIDS URI of a file of the linked dataset (``DatasetLinks``)."""
    return f"bids:{dataset}:{relpath}"


def provenance(
    *,
    source_relpath: str,
    source_sha256: str,
    model: ModelInfo,
    flip: bool,
    sharpen: bool,
    ct: bool,
    native_grid: bool,
    precision: str,
) -> dict[str, Any]:
    """What must be equal for a previous output to be reused."""
    return {
        "Source": source_relpath,
        "SourceSHA256": source_sha256,
        "ModelSHA256": model.sha256,
        "TestTimeFlipping": flip,
        "Sharpening": sharpen,
        "CTClipping": ct,
        "NativeGrid": native_grid,
        "Precision": precision,
    }


def read_provenance(sidecar: Path) -> dict[str, Any] | None:
    """``SynthSR.Provenance`` of a sidecar written by this package (None when absent or unreadable)."""
    try:
        recorded = json.loads(sidecar.read_text()).get("SynthSR", {}).get("Provenance")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


def provenance_matches(sidecar: Path, expected: Mapping[str, Any]) -> bool:
    """True when ``sidecar`` exists, parses and records ``expected``.

    Sidecars written before ``Precision`` joined the provenance (0.1.0.dev24341 and earlier) record
    the same value as ``SynthSR.Precision``: it stands in, so that upgrading redoes nothing."""
    try:
        synthsr = json.loads(sidecar.read_text()).get("SynthSR", {})
        recorded = synthsr.get("Provenance")
        if isinstance(recorded, dict) and "Precision" not in recorded and "Precision" in expected:
            recorded = {**recorded, "Precision": synthsr.get("Precision")}
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return recorded == dict(expected)


def _rounded(values: Sequence[float], digits: int = 4) -> list[float]:
    return [round(float(v), digits) for v in values]


def build_sidecar(
    *,
    source_relpath: str,
    source_suffix: str,
    input_zooms: Sequence[float],
    input_shape: Sequence[int],
    input_axcodes: Sequence[str],
    affine_source: str,
    model: ModelInfo,
    prov: Mapping[str, Any],
    device: str,
    precision: str,
    timings: Mapping[str, float],
    runtime_seconds: float,
    warnings: Sequence[str],
    notes: Sequence[str],
    software: Mapping[str, str],
    command_line: Sequence[str],
    output_shape: Sequence[int],
    output_zooms: Sequence[float],
    resolution: str | None = None,
    resolution_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The sidecar of one synthetic T1w image."""
    sidecar: dict[str, Any] = {
        "Description": (
            f"Synthetic 1 mm isotropic T1-weighted MPRAGE-like image synthesised by SynthSR "
            f"from a {source_suffix} image"
            + (" and resampled back onto the source image grid" if resolution == "native" else "")
        ),
        "Sources": [bids_uri(source_relpath)],
        "SpatialReference": bids_uri(source_relpath),
        "SkullStripped": False,
    }
    if resolution_labels:
        sidecar["Resolution"] = dict(resolution_labels)
    sidecar["SynthSR"] = {
        "InputContrast": source_suffix,
        "InputVoxelSizeMM": _rounded(input_zooms),
        "InputShape": [int(n) for n in input_shape],
        "InputOrientation": "".join(input_axcodes),
        "InputAffineSource": affine_source,
        "OutputShape": [int(n) for n in output_shape],
        "OutputVoxelSizeMM": _rounded(output_zooms),
        "Model": {"Name": model.name, "Version": model.version, "SHA256": model.sha256, "License": model.license},
        "TestTimeFlipping": bool(prov["TestTimeFlipping"]),
        "Sharpening": bool(prov["Sharpening"]),
        "CTClipping": bool(prov["CTClipping"]),
        "Device": device,
        "Precision": precision,
        "RuntimeSeconds": round(float(runtime_seconds), 3),
        "StageSeconds": {k: round(float(v), 3) for k, v in timings.items()},
        "Warnings": list(warnings),
        "Notes": list(notes),
        "Provenance": dict(prov),
        "Software": dict(software),
    }
    sidecar["CommandLine"] = " ".join(command_line)
    sidecar["DateProcessed"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return sidecar


def zooms_of(affine: np.ndarray) -> list[float]:
    return [float(z) for z in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]
