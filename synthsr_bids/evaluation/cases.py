"""The evaluation cases: held-out synthetic renderings and a real multiple-sclerosis patient.

**Synthetic** (:func:`synthetic_cases`): SynthSR's 5 skull-stripped label maps (never used for
training) rendered by the training generator (:class:`~synthsr_bids.training.generator.SynthGenerator`)
with the label handling of ``configs/default.toml`` (aliases ``{29: 2, 31: 4}``, left/right split).
The generator's intensity, acquisition and pathology models are used as in training, except:

* no spatial augmentation (scaling 1, no rotation/shear/translation/deformation/flip) and a
  crop of the map's brain box plus :data:`SYNTHETIC_MARGIN` voxels, so every case is the whole
  brain on the map's own 1 mm grid;
* thick slices along exactly one axis (``isotropic_prob = 0``, ``thick_axes_probs = (1, 0, 0)``:
  training also draws 1 mm, 2-axis and 3-axis low-resolution inputs), with a fixed slice spacing
  per case, :data:`SYNTHETIC_SLICE_SPACINGS` = 3, 4, 5, 6, 7 mm for cases 1-5 (training draws
  1-9 mm); the axis, the slice thickness (U(1 mm, spacing)), obliqueness and phase stay drawn by
  the generator and are recorded in the case details;
* pathology more often (:data:`SYNTHETIC_PATHOLOGY`) so that the seeded cases include lesions.

Case ``i`` (from 0) uses map ``i mod 5``, spacing ``SYNTHETIC_SLICE_SPACINGS[i mod 5]`` and its own
generator seeded with ``seed + i``: every run (and every ``--synthetic-cases`` count) evaluates
the same cases. Input: the generator's 1 mm network input (already linearly upsampled from its
thick slices, as in training: ``input_upsampled``, so there is no separate cubic baseline);
reference: its healthy synthetic T1 target (``healthy_reference``); lesion mask: where
pathology was painted into the input; NAWM: white-matter labels (2, 41) minus the lesions
dilated by 2 voxels.

**Patient** (:func:`patient_cases`): open_ms_data patient 07 (Lesjak et al. 2018; co-registered,
skull-stripped, 1 mm MNI space). Reference: the real T1; brain mask: its nonzero voxels;
lesions: the consensus mask (GOLD_STANDARD); NAWM (no labels available): brain voxels above the
80th percentile of the T1 intensity, minus the lesions dilated by 2 voxels. Inputs: FLAIR and T2
at 1 mm and degraded (:func:`~.degrade.thick_slices`, box slice profile by default) to 5 mm
axial and 5 mm coronal slices, the T1 itself degraded to 5 mm axial slices, and the 1 mm T1
itself (baselines perfect by construction; the model's score measures how far its output is
from a real T1 at best).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from synthsr_bids.errors import BadInputError
from synthsr_bids.io import load_scan

from .ceiling import flat_reference
from .degrade import DEFAULT_SLICE_PROFILE, SliceProfile, slice_axis, thick_slices
from .metrics import bright_tissue_mask, nawm_mask
from .volume import Volume, resample_onto

__all__ = [
    "DEFAULT_DATA_DIR",
    "SYNTHETIC_SEED",
    "SYNTHETIC_ALIASES",
    "SYNTHETIC_MARGIN",
    "SYNTHETIC_PATHOLOGY",
    "SYNTHETIC_SLICE_SPACINGS",
    "SYNTHETIC_THICK_AXES_PROBS",
    "PATIENT_PATTERNS",
    "CaseDataError",
    "EvalCase",
    "evaluation_generator_config",
    "synthetic_cases",
    "find_patient_files",
    "patient_cases",
]

LOGGER = logging.getLogger(__name__)

#: ``../shared/data`` next to the repository (this file is ``<repo>/synthsr_bids/evaluation/cases.py``).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SYNTHETIC_SEED = 20240611
#: As ``validation_aliases`` in configs/default.toml: undetermined -> WM, choroid plexus -> ventricle.
SYNTHETIC_ALIASES: Mapping[int, int] = {29: 2, 31: 4}
SYNTHETIC_MARGIN = 4
#: Slice spacing (mm) of synthetic case i: ``SYNTHETIC_SLICE_SPACINGS[i mod 5]`` (one per held-out map).
SYNTHETIC_SLICE_SPACINGS = (3.0, 4.0, 5.0, 6.0, 7.0)
#: P(1, 2, 3 thick axes) of the generator: always exactly one (a 2D multi-slice acquisition).
SYNTHETIC_THICK_AXES_PROBS = (1.0, 0.0, 0.0)
SYNTHETIC_PATHOLOGY = {"plaque_prob": 0.6, "stroke_prob": 0.2, "tumour_prob": 0.2}
WHITE_MATTER_LABELS = (2, 41)
NAWM_DILATION = 2
NAWM_T1_PERCENTILE = 80.0
#: Glob patterns of the patient directory (open_ms_data file names). ``T1_*`` excludes ``T1POST_*``.
PATIENT_PATTERNS: Mapping[str, str] = {
    "T1": "T1_*.nii*",
    "FLAIR": "FLAIR_*.nii*",
    "T2": "T2_*.nii*",
    "lesions": "GOLD_STANDARD*.nii*",
}
#: Patient cases: (name, source contrast, slice orientation or None for 1 mm).
PATIENT_CASES = (
    ("FLAIR 1mm", "FLAIR", None),
    ("FLAIR 5mm ax", "FLAIR", "axial"),
    ("FLAIR 5mm cor", "FLAIR", "coronal"),
    ("T2 1mm", "T2", None),
    ("T2 5mm ax", "T2", "axial"),
    ("T2 5mm cor", "T2", "coronal"),
    ("T1 5mm ax", "T1", "axial"),
    # The reference itself as input: the baselines are perfect, the model's score is how far its output
    # style (synthetic T1 targets) and its errors take it from a real 1 mm T1.
    ("T1 1mm", "T1", None),
)


class CaseDataError(RuntimeError):
    """Evaluation data is missing or unusable; the message names the path and the fix."""


@dataclass(frozen=True, eq=False)
class EvalCase:
    """One input to synthesise and what to compare the result with (all masks on the reference grid).

    Attributes:
        name: table row label, e.g. ``"FLAIR 5mm ax"`` or ``"syn1 brain1"``.
        group: ``"synthetic"`` or the patient directory's name.
        input: what the model receives (any grid).
        reference: the ground-truth T1 (its grid is where every metric is computed).
        brain_mask: where the image metrics are computed.
        lesion_mask: lesions (None when there are none or no mask exists).
        nawm_mask: normal-appearing white matter (None without lesions).
        flat_reference: the reference's flat 3-class rendering, scored like a method (:mod:`.ceiling`);
            None for a synthetic reference, which already is such a rendering. Patient cases share one array.
        healthy_reference: the reference has no lesions by construction (synthetic), so a removed lesion
            looks like the reference there (partial volume and blur included); otherwise (a real T1 with
            the lesions) like NAWM (:func:`~.metrics.lesion_contrast`).
        input_upsampled: the input already is a linear upsampling onto the reference grid (the generator's,
            synthetic): there is no separate cubic interpolation of its thick slices to compare with.
        details: facts for the JSON output (contrast, slice geometry, lesion kinds, ...).
    """

    name: str
    group: str
    input: Volume
    reference: Volume
    brain_mask: np.ndarray
    lesion_mask: np.ndarray | None = None
    nawm_mask: np.ndarray | None = None
    flat_reference: np.ndarray | None = None
    healthy_reference: bool = False
    input_upsampled: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- synthetic
def evaluation_generator_config(base: Any = None, *, crop_shape: tuple[int, int, int],
                                slice_spacing_mm: float) -> Any:
    """The training :class:`GeneratorConfig` (``base``, default: its defaults) made for evaluation.

    See the module docstring: no spatial augmentation, whole-brain crop, thick slices along one
    axis spaced ``slice_spacing_mm``, more pathology.
    """
    from synthsr_bids.training.generator import GeneratorConfig

    base = GeneratorConfig() if base is None else base
    return dataclasses.replace(
        base, crop_shape=tuple(int(s) for s in crop_shape), scaling=(1.0, 1.0), rotation_deg=0.0, shear=0.0,
        translation_mm=0.0, svf_std_max=0.0, flip_prob=0.0, skull_strip_prob=0.0, isotropic_prob=0.0,
        thick_axes_probs=SYNTHETIC_THICK_AXES_PROBS, slice_spacing=(float(slice_spacing_mm),) * 2,
        **SYNTHETIC_PATHOLOGY,
    )


def _acquisition_details(params: Any) -> dict[str, Any]:
    acq = params.acquisition
    return {
        "volume": params.volume,
        "contrast": params.contrast,
        "thick_axes": [
            {"axis": axis, "spacing_mm": round(acq.axes[axis].spacing, 2),
             "thickness_mm": round(acq.axes[axis].thickness, 2)}
            for axis in acq.thick_axes
        ],
        "oblique_deg": [round(a, 1) for a in acq.rotation_deg],
        "noise_sigma": round(acq.noise_sigma, 4),
        "lesions": list(params.lesions),
        "bias_std": round(params.bias_std, 3),
        "gamma": round(params.gamma, 3),
    }


def synthetic_cases(
    label_dir: Path,
    count: int,
    *,
    seed: int = SYNTHETIC_SEED,
    base_config: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> Iterator[EvalCase]:
    """Yield ``count`` seeded synthetic cases from the label maps in ``label_dir`` (module docstring).

    ``overrides``: :class:`GeneratorConfig` fields set after the evaluation settings (e.g. clean
    1 mm inputs for a diagnostic: ``isotropic_prob=1.0``, no pathology).
    """
    from synthsr_bids.training.generator import SynthGenerator
    from synthsr_bids.training.labels import (
        LabelFileError,
        load_contrast_priors,
        load_label_scheme,
    )
    from synthsr_bids.training.loop import TrainingError, find_label_maps, load_volumes

    if count <= 0:
        return
    label_dir = Path(label_dir)
    if not label_dir.is_dir():
        raise CaseDataError(f"{label_dir}: label-map directory does not exist (pass --label-maps or --data-dir)")
    files = find_label_maps([label_dir])
    if not files:
        raise CaseDataError(f"{label_dir}: no *.nii/*.nii.gz label maps")
    scheme = load_label_scheme()
    contrasts = load_contrast_priors(None, n_classes=scheme.n_contrast_classes)
    try:
        volumes = load_volumes(files[:count], scheme, aliases=dict(SYNTHETIC_ALIASES), split_left_right=True)
    except (TrainingError, LabelFileError, ValueError) as exc:
        raise CaseDataError(f"cannot use the label maps in {label_dir}: {exc}") from exc
    segmentation = scheme.segmentation_labels
    background = segmentation.index(0)
    wm_channels = [segmentation.index(v) for v in WHITE_MATTER_LABELS if v in segmentation]
    for index in range(count):
        volume = volumes[index % len(volumes)]
        crop = tuple(int(e) + 2 * SYNTHETIC_MARGIN for e in volume.brain_extent)
        spacing = SYNTHETIC_SLICE_SPACINGS[index % len(SYNTHETIC_SLICE_SPACINGS)]
        config = evaluation_generator_config(base_config, crop_shape=crop,  # type: ignore[arg-type]
                                             slice_spacing_mm=spacing)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        generator = SynthGenerator([volume], scheme, contrasts, config, seed=seed + index)
        image, target, labels, lesions, params = generator.sample(volume_index=0)
        labels_np = labels.numpy()
        brain = labels_np != background
        lesion = lesions.numpy() & brain
        white_matter = np.isin(labels_np, wm_channels)
        has_lesion = bool(lesion.any())
        affine = np.eye(4)
        yield EvalCase(
            name=f"syn{index + 1} {volume.name.split('.')[0]}",
            group="synthetic",
            input=Volume(image.numpy().astype(np.float64), affine),
            reference=Volume(target.numpy().astype(np.float64), affine),
            brain_mask=brain,
            lesion_mask=lesion if has_lesion else None,
            nawm_mask=nawm_mask(white_matter, lesion, dilation=NAWM_DILATION) if has_lesion else None,
            healthy_reference=True,
            input_upsampled=True,
            details={"seed": seed + index, **_acquisition_details(params)},
        )


# ---------------------------------------------------------------------------- patient
def find_patient_files(directory: Path) -> dict[str, Path]:
    """The patient's images by role (:data:`PATIENT_PATTERNS`); only the T1 is required."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CaseDataError(f"{directory}: patient directory does not exist (pass --patient-dir or --data-dir)")
    found: dict[str, Path] = {}
    for role, pattern in PATIENT_PATTERNS.items():
        matches = sorted(directory.glob(pattern))
        if len(matches) > 1:
            LOGGER.warning("%s: %d files match %s; using %s", directory, len(matches), pattern, matches[0].name)
        if matches:
            found[role] = matches[0]
    if "T1" not in found:
        raise CaseDataError(f"{directory}: no reference T1 ({PATIENT_PATTERNS['T1']}); cannot evaluate this patient")
    return found


def _load(path: Path) -> Volume:
    try:
        scan = load_scan(path)
    except BadInputError as exc:
        raise CaseDataError(str(exc)) from exc
    return Volume(scan.data, scan.affine)


def _load_mask(path: Path) -> Volume:
    """A label image as stored: not through :func:`load_scan`, whose fixes for scans (clipping a few
    extreme voxels, ...) are not meant for labels."""
    try:
        img = nib.load(str(path))
        return Volume(np.asarray(img.dataobj, dtype=np.float64), np.asarray(img.affine, dtype=np.float64))
    except Exception as exc:  # nibabel raises many types for broken files
        raise CaseDataError(f"{path}: cannot read the lesion mask ({exc})") from exc


def patient_cases(directory: Path, *, spacing_mm: float = 5.0,
                  slice_profile: SliceProfile = DEFAULT_SLICE_PROFILE) -> list[EvalCase]:
    """The patient cases of :data:`PATIENT_CASES` whose source image exists (module docstring).

    ``slice_profile``: of the thick-slice degradations (:func:`~.degrade.thick_slices`).
    """
    directory = Path(directory)
    files = find_patient_files(directory)
    reference = _load(files["T1"])
    brain = reference.data != 0
    if brain.sum() < 2:
        raise CaseDataError(f"{files['T1']}: the T1 has no nonzero (brain) voxels")
    lesion = None
    if "lesions" in files:
        masks = _load_mask(files["lesions"])
        lesion = resample_onto(masks.data, masks.affine, reference.shape, reference.affine, order=0) > 0.5
        lesion &= brain
        if not lesion.any():
            LOGGER.warning("%s: the lesion mask is empty inside the brain; no lesion metrics", files["lesions"])
            lesion = None
    else:
        LOGGER.warning("%s: no lesion mask (%s); no lesion metrics", directory, PATIENT_PATTERNS["lesions"])
    nawm = None
    if lesion is not None:
        nawm = nawm_mask(bright_tissue_mask(reference.data, brain, percentile=NAWM_T1_PERCENTILE), lesion,
                         dilation=NAWM_DILATION)
    flat = flat_reference(reference.data, brain)  # one for every case of this patient
    sources: dict[str, Volume] = {"T1": reference}
    cases = []
    for name, contrast, orientation in PATIENT_CASES:
        if contrast not in files:
            LOGGER.warning("%s: no %s image (%s); skipping case %r", directory, contrast, PATIENT_PATTERNS[contrast], name)
            continue
        if contrast not in sources:
            sources[contrast] = _load(files[contrast])
        source = sources[contrast]
        details: dict[str, Any] = {"source": files[contrast].name, "contrast": contrast}
        if orientation is None:
            image = source
            details["slices"] = "1 mm (as acquired)"
        else:
            axis = slice_axis(source.affine, orientation)
            image = thick_slices(source, axis=axis, spacing_mm=spacing_mm, profile=slice_profile)
            details.update(slices=f"{spacing_mm:g} mm {orientation}", slice_axis=axis, slice_profile=slice_profile)
        details["input_shape"] = list(image.shape)
        details["input_zooms"] = [round(z, 3) for z in image.zooms]
        cases.append(EvalCase(name=name, group=directory.name, input=image, reference=reference, brain_mask=brain,
                              lesion_mask=lesion, nawm_mask=nawm, flat_reference=flat, details=details))
    return cases
