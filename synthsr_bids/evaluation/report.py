"""The evaluation table (markdown) and JSON document.

Rows: the mean over the synthetic cases (and each synthetic case with ``verbose``), then every
patient case. Cells of the method columns are ``r / SSIM / MAE%`` (MAE in % of the reference's
robust range); "–" where a method does not apply (JSON ``null``: the cubic baselines of synthetic
cases) or a number is undefined (NaN, written as ``null``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from synthsr_bids import __version__
from synthsr_bids.io import write_text_atomic

from .metrics import MIN_SOURCE_CONTRAST
from .run import METHODS, CaseResult, EvaluationResult

__all__ = ["SCHEMA", "DEFINITIONS", "mean_case", "case_rows", "markdown_table", "json_document", "write_json", "dumps"]

#: /2: lesion "removed" is unsigned with signed contrasts beside it, synthetic cubic baselines are null.
SCHEMA = "synthsr-bids-evaluation/2"
SYNTHETIC_MEAN = "synthetic mean"
DEFINITIONS = {
    "brain": "metrics inside the brain mask (synthetic: non-background labels; patient: nonzero voxels of the real T1)",
    "outside_lesions": "model only: the same inside brain minus the lesions dilated by 2 voxels (unchanged "
                       "anatomy); a case without lesions: the brain's metrics",
    "r": "Pearson correlation of the raw prediction and the reference",
    "fit": "least-squares a*prediction+b to the reference inside the region, applied before ssim and mae",
    "ssim": "3D SSIM, Gaussian window sigma 1.5 voxels, mask-weighted local statistics, mean over the region, "
            "L = reference robust range",
    "mae": "mean absolute error after the fit, as a fraction of the reference robust range "
           "(99th - 1st percentile of the reference inside the brain mask)",
    "lesion": "signed contrast c = mean(image/NAWM mean in lesion) - 1 of the input (source: trilinear "
              "upsampling on the reference grid), the prediction and the reference; healthy = the contrast of "
              "healthy tissue there: 0 for a real patient T1, the reference's own contrast for a synthetic "
              "(healthy by construction) reference; left = |prediction - healthy| / |source|; removed = 1 - left "
              "(1 inpainted, 0 as visible as in the input, < 0 more; a lesion of the opposite sign is still shown); "
              f"NaN when |source| < {MIN_SOURCE_CONTRAST} (the case's details say so)",
    "nawm": "synthetic: white-matter labels minus lesions dilated by 2 voxels; patient: brain voxels above the 80th "
            "percentile of the real T1 minus lesions dilated by 2 voxels",
    "reference_lesion": "lesion metrics of the reference itself scored as the prediction: for a real T1 how "
                        "visible its lesions are; 1 by construction for a synthetic (healthy) reference",
    "flat reference": "flat 3-class reference (real references only): the reference split into 3 intensity classes "
                      "by k-means inside the brain, each voxel set to its class mean, blurred like the training "
                      "target (ORACLE). Not an upper bound: training targets have a dozen in-brain values and the "
                      "score rises with the number of classes",
    "cubic": "cubic spline upsampling of the input; null for synthetic cases, whose input the generator already "
             "upsampled linearly (no separate cubic exists)",
    "slice_profile": "patient thick slices along the slice axis: box = mean over the slab (thickness = spacing; "
                     "default), gaussian = sigma 0.42 x thickness (the training generator's, blurrier)",
    "map": "baseline + monotone intensity mapping fitted on the reference inside the brain (ORACLE: uses the answer)",
    "seconds": "model: synthesize (resample, network, flip, sharpen) + resampling onto the reference grid",
}
_LABELS = {"model": "model", "trilinear": "trilinear", "cubic": "cubic", "trilinear+map": "trilinear+map (oracle)",
           "cubic+map": "cubic+map (oracle)", "flat reference": "flat 3-class reference"}


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _clean(tree: Any) -> Any:
    """Replace NaN/inf by None everywhere (JSON has no NaN)."""
    if isinstance(tree, Mapping):
        return {str(k): _clean(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_clean(v) for v in tree]
    if isinstance(tree, float):
        return _finite(tree)
    return tree


def _mean_tree(trees: Sequence[Any]) -> Any:
    """Element-wise mean of identically-shaped dicts of numbers (NaN/None ignored; None if nothing is left)."""
    present = [t for t in trees if t is not None]
    if not present:
        return None
    if isinstance(present[0], Mapping):
        keys = list(dict.fromkeys(k for t in present for k in t))
        return {k: _mean_tree([t.get(k) for t in present]) for k in keys}
    values = [float(v) for v in present if isinstance(v, (int, float)) and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def mean_case(cases: Sequence[CaseResult], name: str = SYNTHETIC_MEAN) -> dict[str, Any]:
    """A case-shaped dict holding the mean of ``cases`` (lesion numbers over the cases that have lesions)."""
    docs = [c.to_dict() for c in cases]
    return {
        "name": name,
        "group": docs[0]["group"] if docs else "",
        "cases": len(docs),
        "cases_with_lesions": sum(1 for d in docs if d["methods"]["model"]["lesion"] is not None),
        "seconds": _mean_tree([d["seconds"] for d in docs]),
        "reference_lesion": _mean_tree([d["reference_lesion"] for d in docs]),
        "methods": _mean_tree([d["methods"] for d in docs]),
    }


def case_rows(result: EvaluationResult, *, verbose: bool = False) -> list[dict[str, Any]]:
    """Case-shaped dicts in table order (synthetic mean, synthetic cases if ``verbose``, patient cases)."""
    synthetic = [c for c in result.cases if c.group == "synthetic"]
    rows: list[dict[str, Any]] = []
    if synthetic:
        rows.append(mean_case(synthetic, f"{SYNTHETIC_MEAN} ({len(synthetic)})"))
        if verbose:
            rows.extend(c.to_dict() for c in synthetic)
    rows.extend(c.to_dict() for c in result.cases if c.group != "synthetic")
    return rows


def _fmt(value: Any, digits: int = 3, scale: float = 1.0) -> str:
    value = _finite(value)
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _triplet(metrics: Mapping[str, Any] | None) -> str:
    if metrics is None:
        return "–"
    return f"{_fmt(metrics.get('r'))} / {_fmt(metrics.get('ssim'))} / {_fmt(metrics.get('mae'), 1, 100.0)}"


def _on_off(value: bool | None) -> str:
    return "on" if value else "off"


def markdown_table(result: EvaluationResult, *, verbose: bool = False) -> str:
    """The markdown table plus a legend (see the module docstring)."""
    header = ["case", *(_LABELS[m] for m in METHODS), "model outside lesions", "lesion removed: model (ref)", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in case_rows(result, verbose=verbose):
        methods = row["methods"]
        model = methods.get("model") or {}
        lesion = model.get("lesion")
        ref = row.get("reference_lesion")
        # A synthetic reference is healthy by construction: its own score is 1 by definition, not news.
        ref_cell = "–" if row["group"] == "synthetic" else _fmt((ref or {}).get("removed"), 2)
        removed = "–" if lesion is None else f"{_fmt(lesion.get('removed'), 2)} ({ref_cell})"
        label = row["name"] if row["group"] == "synthetic" else f"{row['group']} {row['name']}"
        cells = [label, *(_triplet((methods.get(m) or {}).get("brain")) for m in METHODS),
                 _triplet(model.get("outside_lesions")), removed, _fmt(row.get("seconds"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    legend = (
        f"\nModel: {result.model.name} (sha256 {result.model.sha256[:12]}; flip averaging "
        f"{_on_off(result.config.flip)}, sharpening {_on_off(result.config.sharpen)}). Cells: r / SSIM / MAE (% of the "
        "reference's 1-99th percentile range), inside the brain, after a least-squares linear fit of each "
        "prediction to the reference. \"(oracle)\": monotone intensity mapping fitted on the reference itself. "
        "Synthetic cases: no cubic baselines (the generator upsampled their input linearly). Lesion removed: "
        "1 - |c_pred - c_healthy| / |c_input|, c = lesion contrast relative to NAWM, c_healthy = 0 for the "
        "patient and the reference's own contrast for synthetic cases; 1 = inpainted, 0 = as visible as in "
        "the input (a dark lesion from a bright one is still a lesion); \"ref\" = the real T1 scored the same "
        "way. \"flat 3-class reference\": the real T1 reduced to 3 tissue classes (k-means, class means) and "
        "blurred like the training targets (not an upper bound). Time: model synthesis per case."
    )
    if result.skipped:
        legend += "\nSkipped: " + "; ".join(result.skipped)
    return "\n".join(lines) + "\n" + legend + "\n"


def json_document(result: EvaluationResult, *, command: Sequence[str] | None = None) -> dict[str, Any]:
    synthetic = [c for c in result.cases if c.group == "synthetic"]
    doc = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "synthsr_bids_version": __version__,
        "command": list(command) if command is not None else None,
        "model": dict(result.model.__dict__),
        "settings": result.config.to_dict(),
        "methods": list(METHODS),
        "definitions": DEFINITIONS,
        "synthetic_mean": mean_case(synthetic) if synthetic else None,
        "cases": [c.to_dict() for c in result.cases],
        "skipped": list(result.skipped),
        "seconds": result.seconds,
    }
    return _clean(doc)


def write_json(result: EvaluationResult, path: Path, *, command: Sequence[str] | None = None) -> Path:
    path = Path(path)
    write_text_atomic(path, dumps(json_document(result, command=command)) + "\n")
    return path


def dumps(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, allow_nan=False)
