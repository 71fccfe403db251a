"""Run the evaluation: load the model, synthesise every case, score it and the baselines.

The model goes through :func:`~synthsr_bids.inference.predict.synthesize` exactly as in the
participant pipeline (resample to 1 mm, RAS, normalise, network, flip averaging, sharpening,
back to the input's axes); its 1 mm output is then resampled (trilinear) onto the reference
grid. Metrics are computed on the brain's bounding box (plus the SSIM window) to save time.
Patient cases also score the flat 3-class reference (:mod:`.ceiling`); synthetic cases, whose
input the generator already upsampled linearly, have no cubic baselines (``None``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synthsr_bids.preprocessing.intensity import foreground_bbox

from .baselines import BASELINES, baseline_predictions
from .cases import (
    DEFAULT_DATA_DIR,
    NAWM_DILATION,
    SYNTHETIC_SEED,
    CaseDataError,
    EvalCase,
    patient_cases,
    synthetic_cases,
)
from .ceiling import FLAT_REFERENCE
from .degrade import DEFAULT_SLICE_PROFILE, SliceProfile
from .metrics import (
    MIN_SOURCE_CONTRAST,
    SSIM_SIGMA,
    SSIM_TRUNCATE,
    ImageMetrics,
    LesionContrast,
    image_metrics,
    lesion_contrast,
    robust_range,
)
from .volume import resample_onto

__all__ = [
    "METHODS",
    "EXPORT_HINT",
    "ModelMissingError",
    "ModelInfo",
    "LoadedModel",
    "EvaluationConfig",
    "MethodResult",
    "CaseResult",
    "EvaluationResult",
    "load_model",
    "score_predictions",
    "reference_lesion_contrast",
    "evaluate_case",
    "run_evaluation",
]

LOGGER = logging.getLogger(__name__)

#: Methods in table order: the model, the baselines, then the flat 3-class reference (real references only).
METHODS = ("model", *BASELINES, FLAT_REFERENCE)
EXPORT_HINT = (
    "Pass --model PATH (a .safetensors/.h5 file) or a registered name; to evaluate the model being trained, "
    "export its newest checkpoint with `python -m synthsr_bids.training export --config configs/default.toml "
    "--output FILE` and pass --model FILE."
)
_SSIM_MARGIN = int(np.ceil(SSIM_TRUNCATE * SSIM_SIGMA)) + 1


class ModelMissingError(RuntimeError):
    """The model cannot be found or read; the message names the file and the fix."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    sha256: str
    license: str


@dataclass(frozen=True, eq=False)
class LoadedModel:
    network: Any  #: a torch module in eval mode
    info: ModelInfo
    sharpen: bool = True  #: the post-processing the weight file asks for (see models.weights)


@dataclass(frozen=True)
class EvaluationConfig:
    """What to evaluate and how (the command-line options)."""

    model: str | None = None  #: registry name or path; None = the registry default
    synthetic_cases: int = 5
    label_maps: Path = DEFAULT_DATA_DIR / "synthsr" / "label_maps"
    patient_dir: Path = DEFAULT_DATA_DIR / "open_ms_data" / "patient07"
    seed: int = SYNTHETIC_SEED
    slice_spacing_mm: float = 5.0
    slice_profile: SliceProfile = DEFAULT_SLICE_PROFILE  #: of the patient's thick-slice degradations
    flip: bool = True
    sharpen: bool | None = None  #: None = as the model's weight file asks (resolved by run_evaluation)
    device: str = "cpu"
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class MethodResult:
    """Scores of one method on one case."""

    brain: ImageMetrics  #: inside the brain mask
    #: brain minus the lesions dilated by 2 voxels (model only); the brain's metrics for a case without lesions
    outside_lesions: ImageMetrics | None = None
    lesion: LesionContrast | None = None  #: lesion contrast left/removed (input = trilinear upsampling)

    def to_dict(self) -> dict[str, Any]:
        return {
            "brain": self.brain.to_dict(),
            "outside_lesions": None if self.outside_lesions is None else self.outside_lesions.to_dict(),
            "lesion": None if self.lesion is None else self.lesion.to_dict(),
        }


@dataclass(frozen=True)
class CaseResult:
    name: str
    group: str
    seconds: float  #: model: synthesize + resampling onto the reference grid
    methods: Mapping[str, MethodResult | None]  #: None: not applicable to this case (JSON null)
    reference_lesion: LesionContrast | None = None  #: the reference's own lesion contrast vs the input
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "seconds": self.seconds,
            "details": dict(self.details),
            "reference_lesion": None if self.reference_lesion is None else self.reference_lesion.to_dict(),
            "methods": {name: None if result is None else result.to_dict() for name, result in self.methods.items()},
        }


@dataclass(frozen=True)
class EvaluationResult:
    model: ModelInfo
    config: EvaluationConfig
    cases: tuple[CaseResult, ...]
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0


# ---------------------------------------------------------------------------- model
def _conversion_cache() -> Path | None:
    from synthsr_bids.models.registry import models_cache_dir

    cache = models_cache_dir() / "converted"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return cache if os.access(cache, os.W_OK) else None


def load_model(name_or_path: str | None) -> LoadedModel:
    """Resolve ``--model`` like the main CLI (never downloads) and load the weights.

    Raises:
        ModelMissingError: naming the missing/bad file and how to get one (:data:`EXPORT_HINT`).
    """
    from synthsr_bids.models.registry import ModelNotAvailableError, resolve_model
    from synthsr_bids.models.weights import WeightFileError, load_weights

    try:
        resolved = resolve_model(name_or_path)
        # Keras .h5 files are converted once and cached (as the pipeline does); safetensors are read directly.
        cache = None if resolved.path.suffix == ".safetensors" else _conversion_cache()
        loaded = load_weights(resolved.path, cache_dir=cache)
    except (ModelNotAvailableError, WeightFileError) as exc:
        raise ModelMissingError(f"{exc}\n{EXPORT_HINT}") from exc
    info = ModelInfo(name=resolved.name, path=str(resolved.path), sha256=resolved.sha256, license=resolved.license)
    return LoadedModel(network=loaded.model, info=info, sharpen=loaded.sharpen)


# ---------------------------------------------------------------------------- scoring
def score_predictions(
    case: EvalCase,
    predictions: Mapping[str, np.ndarray],
    source: np.ndarray,
    *,
    outside_lesions: Sequence[str] = ("model",),
) -> dict[str, MethodResult]:
    """Score every prediction (on the reference grid) of ``case``; ``source`` = the input on that grid.

    Metrics outside the lesions are computed for the methods in ``outside_lesions`` only (SSIM is
    the expensive part); in a case without lesions they are the brain's (so that a mean over
    cases averages the same cases as the brain's). A prediction passed under two names (the same
    array) is scored once.
    """
    from scipy import ndimage

    box = foreground_bbox(case.brain_mask)
    if box is None:
        raise CaseDataError(f"case {case.name}: the brain mask is empty")
    box = box.expand(_SSIM_MARGIN, case.brain_mask.shape)

    def crop(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.asarray(a)[box.slices]

    reference, brain = crop(case.reference.data), crop(case.brain_mask)
    lesion, nawm = crop(case.lesion_mask), crop(case.nawm_mask)
    source_c = crop(source)
    scale = robust_range(reference, brain)
    has_lesions = lesion is not None and bool(lesion.any())
    outside = None
    if has_lesions:
        outside = brain & ~ndimage.binary_dilation(lesion, iterations=NAWM_DILATION)
        if outside.sum() < 2:
            outside = None
    with_lesions = has_lesions and nawm is not None and nawm.any()
    results: dict[str, MethodResult] = {}
    done: dict[tuple[int, bool], MethodResult] = {}
    for name, prediction in predictions.items():
        wants_outside = name in outside_lesions and (outside is not None or not has_lesions)
        key = (id(prediction), wants_outside)
        if key not in done:
            pred = crop(prediction)
            in_brain = image_metrics(pred, reference, brain, value_range=scale)
            outside_metrics = None
            if wants_outside and has_lesions:
                outside_metrics = image_metrics(pred, reference, outside, value_range=scale)
            elif wants_outside:  # nothing to leave out
                outside_metrics = in_brain
            done[key] = MethodResult(
                brain=in_brain,
                outside_lesions=outside_metrics,
                lesion=lesion_contrast(pred, source_c, lesion, nawm, reference=reference,
                                       healthy_reference=case.healthy_reference) if with_lesions else None,
            )
        results[name] = done[key]
    return results


def reference_lesion_contrast(case: EvalCase, source: np.ndarray) -> LesionContrast | None:
    """The lesion metrics of the reference itself scored as the prediction.

    For a real T1 (lesions visible) this says how far it is from healthy-looking tissue; for a
    healthy reference (synthetic) it is 1 by construction.
    """
    if case.lesion_mask is None or case.nawm_mask is None or not case.lesion_mask.any() or not case.nawm_mask.any():
        return None
    return lesion_contrast(case.reference.data, source, case.lesion_mask, case.nawm_mask,
                           reference=case.reference.data, healthy_reference=case.healthy_reference)


def _lesion_note(lesion: LesionContrast | None) -> str | None:
    """Why a case with lesions has no "removed" number (None when it has one or has no lesions)."""
    if lesion is None or math.isfinite(lesion.removed):
        return None
    return (f"no lesion-removed number: the input's lesion contrast ({lesion.source:+.3f} relative to NAWM) is "
            f"below {MIN_SOURCE_CONTRAST:g} in magnitude")


def evaluate_case(case: EvalCase, model: Any, options: Any) -> CaseResult:
    """Synthesise ``case`` with ``model`` (:class:`SynthesisOptions` ``options``) and score it and the baselines."""
    from synthsr_bids.inference.predict import synthesize

    reference = case.reference
    started = time.perf_counter()
    result = synthesize(case.input.data, case.input.affine, model, options)
    prediction = resample_onto(result.data, result.affine, reference.shape, reference.affine, order=1)
    seconds = time.perf_counter() - started
    for note in result.notes:
        LOGGER.info("%s: %s", case.name, note)
    baselines = baseline_predictions(case.input, reference, case.brain_mask, cubic=not case.input_upsampled)
    predictions = {"model": prediction, **baselines}
    if case.flat_reference is not None:  # real references only (see .ceiling)
        predictions[FLAT_REFERENCE] = case.flat_reference
    scored = score_predictions(case, predictions, baselines["trilinear"])
    # Methods that do not apply are listed as None in table order (a flat reference is simply absent).
    methods: dict[str, MethodResult | None] = {m: scored.get(m) for m in METHODS if m in scored or m != FLAT_REFERENCE}
    details = dict(case.details)
    note = _lesion_note(scored["model"].lesion)
    if note is not None:
        details["lesion_removed"] = note
    return CaseResult(name=case.name, group=case.group, seconds=seconds, methods=methods,
                      reference_lesion=reference_lesion_contrast(case, baselines["trilinear"]), details=details)


# ---------------------------------------------------------------------------- driver
@dataclass(frozen=True, eq=False)
class _Part:
    label: str
    count: int
    cases: Iterator[EvalCase]


def _planned_parts(config: EvaluationConfig, skipped: list[str]) -> list[_Part]:
    """The synthetic and patient parts that can run (lazy); the others are skipped with a message."""
    parts: list[_Part] = []
    label_maps = Path(config.label_maps)
    if config.synthetic_cases <= 0:
        skipped.append("synthetic cases: not requested (--synthetic-cases 0)")
    elif not label_maps.is_dir() or not any(label_maps.glob("*.nii*")):
        skipped.append(f"synthetic cases: no label maps in {label_maps} (pass --label-maps or --data-dir)")
    else:
        parts.append(_Part("synthetic cases", config.synthetic_cases,
                           synthetic_cases(label_maps, config.synthetic_cases, seed=config.seed)))
    try:
        patients = patient_cases(Path(config.patient_dir), spacing_mm=config.slice_spacing_mm,
                                 slice_profile=config.slice_profile)
    except CaseDataError as exc:
        skipped.append(f"patient cases: {exc}")
    else:
        parts.append(_Part(f"patient {Path(config.patient_dir).name}", len(patients), iter(patients)))
    return parts


def run_evaluation(config: EvaluationConfig, model: LoadedModel, *, progress: bool = True) -> EvaluationResult:
    """Evaluate ``model`` and the baselines on every available case (see :mod:`.cases`)."""
    from synthsr_bids.inference.predict import SynthesisOptions
    from synthsr_bids.progress import progress_bar

    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))
    if config.sharpen is None:  # the result records what was done
        config = dataclasses.replace(config, sharpen=model.sharpen)
    options = SynthesisOptions(flip=config.flip, sharpen=bool(config.sharpen), device=config.device)
    started = time.perf_counter()
    skipped: list[str] = []
    parts = _planned_parts(config, skipped)
    for message in skipped:
        LOGGER.warning("skipped %s", message)
    total = sum(part.count for part in parts)
    results: list[CaseResult] = []
    index = 0
    with progress_bar(total, unit="case", desc="evaluation", enabled=None if progress else False) as bar:
        for part in parts:
            done = 0
            try:
                case_started = time.perf_counter()
                for case in part.cases:
                    index += 1
                    result = evaluate_case(case, model.network, options)
                    results.append(result)
                    done += 1
                    bar.update(1)
                    model_result, trilinear = result.methods["model"], result.methods["trilinear"]
                    assert model_result is not None and trilinear is not None  # scored for every case
                    m, t = model_result.brain, trilinear.brain
                    LOGGER.info("[%d/%d] %s %s: model r=%.3f SSIM=%.3f MAE=%.1f%% (trilinear r=%.3f SSIM=%.3f "
                                "MAE=%.1f%%); synthesis %.1f s, case %.1f s", index, total, case.group, case.name,
                                m.r, m.ssim, 100 * m.mae, t.r, t.ssim, 100 * t.mae, result.seconds,
                                time.perf_counter() - case_started)
                    case_started = time.perf_counter()
            except CaseDataError as exc:
                skipped.append(f"{part.label}: {exc}")
                LOGGER.error("skipped %s", skipped[-1])
                bar.update(part.count - done)
    return EvaluationResult(model=model.info, config=config, cases=tuple(results), skipped=tuple(skipped),
                            seconds=time.perf_counter() - started)
