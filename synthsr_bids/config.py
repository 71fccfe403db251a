"""Typed, immutable run configuration.

The command line is parsed into one :class:`RunConfig`; every later stage reads it
and none of them writes it. ``to_dict`` gives the JSON-serialisable form that is
saved with each run (``logs/config-<run_id>.json``) and summarised in sidecars.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

#: Anatomical MRI suffixes processed by default (non-parametric anat images of the
#: BIDS specification, plus the deprecated ``T2star``/``PD`` found in older datasets).
DEFAULT_CONTRASTS: tuple[str, ...] = (
    "T1w",
    "T2w",
    "PDw",
    "T2starw",
    "FLAIR",
    "inplaneT1",
    "inplaneT2",
    "PDT2",
    "T2star",
    "PD",
)


@dataclass(frozen=True)
class InferenceSettings:
    """How each scan goes through the network."""

    model: str | None = None
    """Registered model name or path to a weight file; ``None`` is the bundled default."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    nthreads: int | None = None
    """CPU threads for torch; ``None`` leaves torch's default."""
    flip: bool = True
    """Average the prediction with the left-right flipped prediction (as mri_synthsr)."""
    sharpen: bool | None = None
    """Unsharp-mask the output; ``None``: as the model's weight file asks (``synthsr_bids.sharpen``
    metadata), which is mri_synthsr's sharpening for files that do not say (the official models)."""
    ct: bool = False
    """Clip input intensities to [0, 80] (Hounsfield units) before the network."""
    half: bool = False
    """fp16 autocast on CUDA (ignored on CPU)."""


#: TemplateFlow template used by the group level unless ``--template`` says otherwise.
DEFAULT_TEMPLATE = "MNI152NLin2009cAsym"


@dataclass(frozen=True)
class DownstreamSettings:
    """What is done with the synthetic images: reports, segmentation and lesion masks
    (participant level), template registration and population maps (group level)."""

    reports: bool = True
    """Write the HTML reports (``sub-<label>.html``, ``group.html``) and their figures."""
    segmentation: bool = True
    """Segment each synthetic T1w when a segmentation model is available."""
    segmentation_model: str | None = None
    """Registered name or path of the segmentation U-Net; ``None`` uses the registered
    default when it is installed, else segmentation is skipped (with a log line)."""
    lesion_masks: Path | None = None
    """Extra folder (BIDS-like, ``sub-<label>/[ses-<label>/]anat/``) searched for lesion masks
    besides the raw dataset's ``*_label-lesion_roi``/``*_label-lesion_mask`` files."""
    template: str = DEFAULT_TEMPLATE
    """TemplateFlow template the group level registers to."""
    template_resolution: int = 1
    """TemplateFlow ``res-`` index of the template image."""
    registration: bool = True
    """Group level: register every synthetic T1w to the template (ANTsPy)."""
    registration_type: str = "SyN"
    """``SyN`` (affine then SyN) or ``Affine``."""


@dataclass(frozen=True)
class RunConfig:
    """Everything one invocation of ``synthsr-bids`` needs."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_labels: tuple[str, ...] = ()
    """Without ``sub-``; empty selects every participant."""
    session_labels: tuple[str, ...] = ()
    """Without ``ses-``; empty selects every session."""
    contrasts: tuple[str, ...] = DEFAULT_CONTRASTS
    bids_filters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """fMRIPrep-style filters: ``{"anat": {...}}`` applies to every scan, a suffix key
    (lower case, e.g. ``"flair"``) to that contrast only."""
    skip_bids_validation: bool = False
    bids_database_dir: Path | None = None
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    native_grid: bool = False
    """Also write the synthetic T1w resampled onto each input's own grid."""
    overwrite: bool = False
    verbosity: int = 0
    command_line: tuple[str, ...] = ()
    run_id: str = ""
    downstream: DownstreamSettings = field(default_factory=DownstreamSettings)
    """Reports, segmentation, lesion masks and the group level's template-space analyses."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (paths as strings)."""

        def convert(value: Any) -> Any:
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, (tuple, list)):
                return [convert(v) for v in value]
            if isinstance(value, Mapping):
                return {k: convert(v) for k, v in value.items()}
            return value

        return convert(dataclasses.asdict(self))

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
