"""Registration of synthetic T1w images to a template with ANTsPy (PyPI ``antspyx``).

``ants.registration(type_of_transform="SyN")`` is an affine (rigid + affine, Mattes mutual
information) followed by SyN; ``"Affine"`` stops after the affine. The forward transform is
saved as one ITK composite ``.h5`` (``from-T1w_to-<tpl>_mode-image_xfm.h5``), the image is
resampled onto the template grid (linear), and its lesion mask, when there is one, too
(linear, then ``>= 0.5``).

Registrations run with a fixed seed and one ITK thread each (``ants.set_ants_deterministic``)
so reruns give the same transforms; parallelism comes from running several images at once,
each in its own ``python -m synthsr_bids.group.register JOB.json OUTCOME.json`` process
(:func:`run_jobs`; a fresh interpreter, so nothing depends on how the caller's ``__main__``
is written, unlike ``multiprocessing``'s spawn). A job is skipped on rerun when its sidecar
records the same inputs (SHA-256 of image, template and mask, transform type, seed).

QC: the Pearson correlation between the registered image and the template inside the
template's brain mask (or inside its head, > 10% of the 99th percentile, without a mask),
rounded to :data:`CORRELATION_DIGITS` decimals both when it is computed and when a skipped
job reads it back from the transform's sidecar, so a rerun reports the same number.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np

from synthsr_bids.io import copy_file_atomic, save_nifti_atomic, write_json_atomic

LOGGER = logging.getLogger(__name__)

SEED = 42
LESION_THRESHOLD = 0.5
CORRELATION_DIGITS = 4


@dataclass(frozen=True)
class RegistrationJob:
    """Everything one registration needs (picklable: sent to worker processes)."""

    image: Path
    template_name: str
    template_t1w: Path
    template_mask: Path | None
    xfm: Path
    xfm_json: Path
    warped: Path
    warped_json: Path
    lesion: Path | None = None
    warped_lesion: Path | None = None
    warped_lesion_json: Path | None = None
    transform_type: str = "SyN"
    overwrite: bool = False
    work_dir: Path | None = None
    warped_sidecar: dict[str, Any] = field(default_factory=dict)
    lesion_sidecar: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RegistrationOutcome:
    image: Path
    status: str
    """``written``, ``skipped`` or ``failed``."""
    seconds: float = 0.0
    correlation: float = float("nan")
    error: str | None = None
    updated_sidecars: tuple[str, ...] = ()
    """Names of the sidecars a skipped job rewrote because they differed from this version's."""


def template_mask_array(template: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is not None:
        return np.asarray(mask) > 0
    positive = template[template > 0]
    threshold = 0.1 * float(np.percentile(positive, 99)) if positive.size else 0.0
    return template > threshold


def rounded_correlation(value: float | None) -> float:
    """The template correlation as recorded and reported (NaN when undefined)."""
    if value is None or not np.isfinite(value):
        return float("nan")
    return round(float(value), CORRELATION_DIGITS)


def correlation_in_mask(image: np.ndarray, template: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images over ``mask`` (NaN when undefined)."""
    a = np.asarray(image, dtype=np.float64)[mask]
    b = np.asarray(template, dtype=np.float64)[mask]
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _recorded(job: RegistrationJob) -> dict[str, Any] | None:
    try:
        return json.loads(job.xfm_json.read_text())
    except (OSError, ValueError):
        return None


def _outputs(job: RegistrationJob) -> list[Path]:
    paths = [job.xfm, job.xfm_json, job.warped, job.warped_json]
    if job.lesion is not None and job.warped_lesion is not None:
        paths.append(job.warped_lesion)
    return paths


def _sidecars(job: RegistrationJob) -> list[tuple[Path, dict[str, Any]]]:
    """The template-space sidecars of ``job`` and the content this version writes."""
    sidecars = [(job.warped_json, job.warped_sidecar)]
    if job.lesion is not None and job.warped_lesion_json is not None:
        sidecars.append((job.warped_lesion_json, job.lesion_sidecar))
    return sidecars


def refresh_sidecars(job: RegistrationJob) -> tuple[str, ...]:
    """Rewrite (atomically) the sidecars of an up-to-date job that differ from this version's
    (written by an older version); returns their names."""
    updated = []
    for path, content in _sidecars(job):
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = None
        if current != json.loads(json.dumps(content)):  # as read back (tuples become lists)
            write_json_atomic(path, content)
            updated.append(path.name)
    return tuple(updated)


def _is_up_to_date(job: RegistrationJob, recorded: dict[str, Any]) -> bool:
    """The transform's sidecar records this job's inputs and every output is there."""
    return (
        not job.overwrite
        and recorded.get("Provenance") == job.provenance
        and all(p.is_file() for p in _outputs(job))
    )


def register_one(job: RegistrationJob) -> RegistrationOutcome:
    """Run one registration job; never raises (errors come back in the outcome)."""
    started = time.perf_counter()
    try:
        recorded = _recorded(job)
        if recorded is not None and _is_up_to_date(job, recorded):
            return RegistrationOutcome(job.image, "skipped", 0.0, rounded_correlation(recorded.get("TemplateCorrelation")),
                                       updated_sidecars=refresh_sidecars(job))
        return _register(job, started)
    except Exception as exc:  # one image must not stop the group
        detail = traceback.format_exc(limit=3)
        return RegistrationOutcome(job.image, "failed", time.perf_counter() - started,
                                   error=f"{exc.__class__.__name__}: {exc}\n{detail}")


def _register(job: RegistrationJob, started: float) -> RegistrationOutcome:
    import ants
    from ants.config import set_ants_deterministic

    set_ants_deterministic(True, seed_value=SEED)
    template_img = nib.load(str(job.template_t1w))
    with tempfile.TemporaryDirectory(prefix="synthsr-reg-", dir=job.work_dir) as tmp:
        fixed = ants.image_read(str(job.template_t1w))
        moving = ants.image_read(str(job.image))
        result = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform=job.transform_type,
            outprefix=str(Path(tmp) / "reg_"),
            write_composite_transform=True,
            verbose=False,
        )
        composite = result["fwdtransforms"]
        composite = Path(composite if isinstance(composite, str) else composite[0])
        warped = result["warpedmovout"].numpy().astype(np.float32)
        template = template_img.get_fdata(dtype=np.float32)
        if warped.shape != template.shape:
            raise RuntimeError(f"ANTs returned an image of shape {warped.shape} for a template of shape {template.shape}")
        mask_data = np.asanyarray(nib.load(str(job.template_mask)).dataobj) if job.template_mask else None
        correlation = rounded_correlation(correlation_in_mask(warped, template, template_mask_array(template, mask_data)))
        save_nifti_atomic(warped, template_img.affine, job.warped)
        if job.lesion is not None and job.warped_lesion is not None:
            lesion = ants.apply_transforms(
                fixed=fixed, moving=ants.image_read(str(job.lesion)), transformlist=[str(composite)],
                interpolator="linear",
            ).numpy()
            binary = (lesion >= LESION_THRESHOLD).astype(np.uint8)
            save_nifti_atomic(binary, template_img.affine, job.warped_lesion, dtype=np.uint8)
            if job.warped_lesion_json is not None:
                write_json_atomic(job.warped_lesion_json, job.lesion_sidecar)
        copy_file_atomic(composite, job.xfm)
    seconds = time.perf_counter() - started
    write_json_atomic(job.warped_json, job.warped_sidecar)
    # The transform's sidecar is written last: it marks the job as done.
    write_json_atomic(job.xfm_json, {
        "Description": f"ITK composite transform (ANTsPy {job.transform_type}) from the synthetic T1w to the "
                       f"{job.template_name} template; apply with antsApplyTransforms or ants.apply_transforms",
        "FromSpace": "T1w (scanner space of the synthetic image)",
        "ToSpace": job.template_name,
        "TransformType": job.transform_type,
        "TemplateCorrelation": correlation if np.isfinite(correlation) else None,
        "RuntimeSeconds": round(seconds, 2),
        "Provenance": job.provenance,
    })
    return RegistrationOutcome(job.image, "written", seconds, correlation)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def job_to_dict(job: RegistrationJob) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(job).items()}


def job_from_dict(values: dict[str, Any]) -> RegistrationJob:
    paths = {f.name for f in dataclasses.fields(RegistrationJob) if "Path" in str(f.type)}
    return RegistrationJob(**{k: (Path(v) if k in paths and v is not None else v) for k, v in values.items()})


def _outcome_to_dict(outcome: RegistrationOutcome) -> dict[str, Any]:
    values = dataclasses.asdict(outcome)
    values["image"] = str(outcome.image)
    values["correlation"] = None if not np.isfinite(outcome.correlation) else outcome.correlation
    values["updated_sidecars"] = list(outcome.updated_sidecars)
    return values


def _run_in_subprocess(job: RegistrationJob) -> RegistrationOutcome:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="synthsr-regjob-", dir=job.work_dir) as tmp:
        job_file, outcome_file = Path(tmp) / "job.json", Path(tmp) / "outcome.json"
        job_file.write_text(json.dumps(job_to_dict(job)))
        completed = subprocess.run(
            [sys.executable, "-m", "synthsr_bids.group.register", str(job_file), str(outcome_file)],
            capture_output=True, text=True, check=False,
        )
        if completed.returncode != 0 or not outcome_file.is_file():
            tail = (completed.stderr or completed.stdout).strip()[-2000:]
            return RegistrationOutcome(job.image, "failed", time.perf_counter() - started,
                                       error=f"registration process exited with {completed.returncode}: {tail}")
        values = json.loads(outcome_file.read_text())
    correlation = values.get("correlation")
    return RegistrationOutcome(
        image=Path(values["image"]), status=values["status"], seconds=float(values["seconds"]),
        correlation=float("nan") if correlation is None else float(correlation), error=values.get("error"),
        updated_sidecars=tuple(values.get("updated_sidecars", ())),
    )


def run_jobs(
    jobs: Sequence[RegistrationJob],
    *,
    workers: int = 1,
    progress: Callable[[int, int, RegistrationOutcome], None] | None = None,
) -> list[RegistrationOutcome]:
    """Run ``jobs``: in this process for one worker, else ``workers`` at a time, each in its own
    Python process. Outcomes come back in the order of ``jobs``."""
    workers = max(1, min(workers, len(jobs)))
    if workers == 1:
        outcomes: list[RegistrationOutcome] = []
        for index, job in enumerate(jobs, start=1):
            outcome = register_one(job)
            outcomes.append(outcome)
            if progress:
                progress(index, len(jobs), outcome)
        return outcomes
    results: dict[int, RegistrationOutcome] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_run_in_subprocess, job): index for index, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if progress:
                progress(done, len(jobs), results[futures[future]])
    return [results[index] for index in range(len(jobs))]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m synthsr_bids.group.register JOB.json OUTCOME.json`` (used by :func:`run_jobs`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m synthsr_bids.group.register JOB.json OUTCOME.json", file=sys.stderr)
        return 64
    job = job_from_dict(json.loads(Path(args[0]).read_text()))
    outcome = register_one(job)
    Path(args[1]).write_text(json.dumps(_outcome_to_dict(outcome)))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through run_jobs
    sys.exit(main())
