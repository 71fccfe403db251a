"""Put a training run's networks into the package as the bundled default models.

``python -m synthsr_bids.training ship --config configs/default.toml --version 0.1.0.dev5000``

1. the regression U-Net of the newest checkpoint -> ``synthsr_bids/data/models/
   synthsr-bids_v<version>.safetensors`` (float16; the default synthesis model);
2. the frozen segmentation U-Net of the run (``segmenter.safetensors``) -> ``synthsr-bids-seg_v
   <version>.safetensors`` with the metadata the morphometry step needs (label ids, input scale;
   contract in :mod:`synthsr_bids.morphometry.segment`);
3. ``synthsr_bids/data/models.json``: both entries get the new file name, size, SHA-256 and
   version (the segmenter's entry is added if missing); weight files of earlier versions are
   deleted from the package folder, so only the newest stays in git.

Files are written atomically; the registry is rewritten last, so an interrupted run leaves the
previous registry consistent with the files it names.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synthsr_bids.hashing import sha256_file
from synthsr_bids.io import write_json_atomic
from synthsr_bids.models.weights import (
    PREVIEW_STATUS,
    STATUS_METADATA,
    WeightFileError,
    load_weights,
    save_safetensors,
)

from .loop import (
    SYNTHESIS_OUTPUT_SCALE,
    TrainingError,
    export_regression,
    regressor_from_checkpoint,
    segmenter_metadata,
)

__all__ = ["ShippedModel", "ShipError", "ship_run", "REGRESSION_NAME", "SEGMENTATION_NAME"]

LOGGER = logging.getLogger(__name__)

REGRESSION_NAME = "synthsr-bids"
SEGMENTATION_NAME = "synthsr-bids-seg"
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+-]*$")
CREDITS = (
    "Trained on synthetic images generated from the SynthSeg training label maps (Billot et al., Medical Image "
    "Analysis 2023; Apache-2.0) and validated on the SynthSR label maps (Iglesias et al.; Apache-2.0)."
)


class ShipError(RuntimeError):
    """The run cannot be shipped; the message names the file and the fix."""


@dataclass(frozen=True)
class ShippedModel:
    name: str
    path: Path
    size: int
    sha256: str
    steps: int


def _write_regression(checkpoint: Path, path: Path, *, version: str, preview: bool, sharpen: bool,
                      average: bool = True) -> int:
    try:
        regressor = regressor_from_checkpoint(checkpoint, average=average)
    except TrainingError as exc:
        raise ShipError(str(exc)) from exc
    model, steps = regressor.model, regressor.steps
    metadata = {
        "synthsr_bids.role": "regression",
        "synthsr_bids.trained_steps": str(steps),
        "synthsr_bids.weights": regressor.weights,
        "synthsr_bids.version": version,
        "synthsr_bids.output_scale": repr(SYNTHESIS_OUTPUT_SCALE),
        "license": "Apache-2.0",
        "credits": CREDITS,
    }
    if preview:
        metadata[STATUS_METADATA] = PREVIEW_STATUS
    export_regression(model, path, metadata=metadata, sharpen=sharpen)
    return steps


def _write_segmenter(source: Path, path: Path, *, version: str) -> int:
    try:
        loaded = load_weights(source)
    except (WeightFileError, OSError) as exc:
        raise ShipError(f"{source}: cannot read the run's segmenter ({exc}); it is written when the "
                        "segmentation stage ends") from exc
    meta = loaded.metadata
    labels = json.loads(meta.get("labels") or meta.get("synthsr_bids.segmentation_labels") or "null")
    if not isinstance(labels, list):
        raise ShipError(f"{source}: has no label list in its metadata; it was not written by the training loop")
    steps = int(meta.get("synthsr_bids.steps", "0"))
    metadata = segmenter_metadata(labels, steps=steps)
    metadata["synthsr_bids.version"] = version
    metadata["credits"] = CREDITS
    save_safetensors(loaded.model, path, metadata, dtype=torch.float16)
    return steps


def _entry(template: dict[str, Any], *, name: str, version: str, filename: str, size: int, sha256: str,
           description: str) -> dict[str, Any]:
    entry = dict(template)
    entry.update(name=name, version=version, filename=filename, size=size, sha256=sha256, description=description,
                 url=None, mirrors=[], license="Apache-2.0", file_format="safetensors", in_channels=1, bundled=True)
    return entry


def ship_run(run_dir: Path, checkpoint: Path, *, version: str, package_data: Path,
             sharpen: bool, preview: bool = False, average: bool = True) -> list[ShippedModel]:
    """Export ``checkpoint`` and the run's segmenter into ``package_data`` and update its ``models.json``.

    ``preview`` marks the synthesis model as an early checkpoint: every output made with it
    carries a note saying so (and the log a warning). ``average``: ship the run's weight average
    when it keeps one (False: the raw weights of the checkpoint; see ``regressor_from_checkpoint``).
    ``sharpen``: whether the pipeline sharpens this model's outputs by default
    (``[regression].output_sharpening``, recorded in the weight file).
    """
    if not _VERSION_RE.match(version):
        raise ShipError(f"version {version!r}: use letters, digits, '.', '+' and '-' (e.g. 0.1.0.dev5000)")
    registry_path = package_data / "models.json"
    document = json.loads(registry_path.read_text(encoding="utf-8"))
    models = {entry["name"]: entry for entry in document["models"]}
    if REGRESSION_NAME not in models:
        raise ShipError(f"{registry_path}: has no {REGRESSION_NAME!r} entry to update")
    out_dir = package_data / "models"
    out_dir.mkdir(parents=True, exist_ok=True)

    shipped: list[ShippedModel] = []
    seg_file = out_dir / f"{SEGMENTATION_NAME}_v{version}.safetensors"
    seg_steps = _write_segmenter(run_dir / "segmenter.safetensors", seg_file, version=version)
    reg_file = out_dir / f"{REGRESSION_NAME}_v{version}.safetensors"
    reg_steps = _write_regression(checkpoint, reg_file, version=version, preview=preview, sharpen=sharpen,
                                  average=average)
    for name, path, steps in ((REGRESSION_NAME, reg_file, reg_steps), (SEGMENTATION_NAME, seg_file, seg_steps)):
        shipped.append(ShippedModel(name, path, path.stat().st_size, sha256_file(path), steps))

    reg, seg = shipped
    citation = models[REGRESSION_NAME]["citation"]
    models[REGRESSION_NAME] = _entry(
        models[REGRESSION_NAME], name=REGRESSION_NAME, version=version, filename=reg.path.name, size=reg.size,
        sha256=reg.sha256,
        description=f"synthsr-bids' own SynthSR-style regression U-Net ({reg.steps} regression steps on synthetic "
                    f"data{'; PREVIEW: an early checkpoint below the quality targets' if preview else ''}); "
                    "shipped inside the package. See MODEL_CARD.md.")
    models[SEGMENTATION_NAME] = _entry(
        models.get(SEGMENTATION_NAME, {"citation": citation}), name=SEGMENTATION_NAME, version=version,
        filename=seg.path.name, size=seg.size, sha256=seg.sha256,
        description=f"synthsr-bids' segmentation U-Net ({seg.steps} steps, SynthSeg-style labels), frozen "
                    "loss network of the default model and the morphometry segmenter. See MODEL_CARD.md.")
    order = [entry["name"] for entry in document["models"]]
    if SEGMENTATION_NAME not in order:
        order.insert(order.index(REGRESSION_NAME) + 1, SEGMENTATION_NAME)
    document["models"] = [models[name] for name in order]
    write_json_atomic(registry_path, document)

    keep = {reg.path.name, seg.path.name}
    for old in out_dir.glob("*.safetensors"):
        if old.name not in keep:
            LOGGER.info("removing the previous bundled file %s", old)
            old.unlink()
    for model in shipped:
        LOGGER.info("shipped %s %s: %s (%.1f MB, sha256 %s, %d steps)", model.name, version, model.path,
                    model.size / 1e6, model.sha256, model.steps)
    return shipped
