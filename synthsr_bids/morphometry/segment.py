"""Segmentation of a synthetic T1w with the segmentation U-Net (SynthSeg-style).

Model contract (agreed with the training code, ``synthsr_bids/training``): a synthsr-bids
``.safetensors`` file holding a :class:`~synthsr_bids.models.network.SynthSRUNet` with
``final_activation="softmax"`` whose free metadata has

* ``"labels"``: JSON list of FreeSurfer label ids, channel ``i`` -> ``labels[i]`` (required;
  ``"synthsr_bids.segmentation_labels"``, written by the training loop, is accepted too);
* ``"label_names"``: JSON object ``{"<id>": "<name>"}`` (optional; FreeSurfer's names are the
  default);
* ``"input_scale"``: the network input is ``max(T1, 0) * input_scale`` (optional; e.g.
  ``"0.0078125"`` = 1/128 for a segmenter trained on SynthSR targets). Without it the input
  is min-max normalised to [0, 1] as SynthSeg does.

Steps: resample to 1 mm if needed, reorder the axes to RAS, normalise, zero-pad to a
multiple of ``2**(n_levels-1)``, softmax posteriors averaged with those of the left-right
flipped volume (channels of left and right labels swapped back, as SynthSeg; skipped when a
lateral label has no partner), argmax, back to the image's grid and voxel order.

This module imports torch (like ``models/`` and ``inference/``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from synthsr_bids.inference import engine
from synthsr_bids.morphometry.labels import LabelTable
from synthsr_bids.preprocessing.intensity import crop_padding, pad_to_multiple
from synthsr_bids.preprocessing.orientation import reorient_to_ras, undo_reorientation
from synthsr_bids.preprocessing.resample import resample_to_grid, resample_to_isotropic

LOGGER = logging.getLogger(__name__)

METADATA_LABELS = "labels"
METADATA_LABEL_NAMES = "label_names"
METADATA_INPUT_SCALE = "input_scale"
LEGACY_METADATA_LABELS = "synthsr_bids.segmentation_labels"
#: Registry name of the segmentation model used when ``--segmentation-model`` is not given.
DEFAULT_SEGMENTATION_MODEL = "synthsr-bids-seg"
VOXEL_TOLERANCE_MM = 0.05


class SegmentationModelError(Exception):
    """A segmentation model file cannot be used; the message names the file and the fix."""


@dataclass
class Segmenter:
    model: Any
    table: LabelTable
    name: str
    sha256: str
    license: str = ""
    input_scale: float | None = None


@dataclass
class SegmentationResult:
    labels: np.ndarray
    """Label ids (int16) on the grid and in the voxel order of the input."""
    seconds: float
    flipped: bool


def _metadata_json(metadata: dict[str, str], key: str, path: Any) -> Any:
    try:
        return json.loads(metadata[key])
    except (TypeError, ValueError) as exc:
        raise SegmentationModelError(f"{path}: metadata {key!r} is not valid JSON ({exc})") from exc


def segmenter_from_network(model: Any, metadata: dict[str, str], *, name: str, sha256: str, license: str = "",
                           path: Any = "<model>") -> Segmenter:
    """Check ``model``/``metadata`` against the contract (module docstring)."""
    config = getattr(model, "config", None)
    if getattr(config, "final_activation", None) != "softmax":
        raise SegmentationModelError(
            f"{path}: is not a segmentation network (its output activation is "
            f"{getattr(config, 'final_activation', '?')!r}, not softmax); pass a segmentation U-Net "
            "with --segmentation-model"
        )
    key = METADATA_LABELS if METADATA_LABELS in metadata else LEGACY_METADATA_LABELS
    if key not in metadata:
        raise SegmentationModelError(
            f"{path}: has no {METADATA_LABELS!r} metadata (JSON list of FreeSurfer label ids, one per "
            "output channel); re-export it with that metadata"
        )
    ids = _metadata_json(metadata, key, path)
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise SegmentationModelError(f"{path}: metadata {key!r} must be a JSON list of integers, got {metadata[key][:80]}")
    if len(ids) != config.out_channels:
        raise SegmentationModelError(
            f"{path}: metadata {key!r} lists {len(ids)} labels but the network has {config.out_channels} output channels"
        )
    names: dict[int, str] = {}
    if METADATA_LABEL_NAMES in metadata:
        raw = _metadata_json(metadata, METADATA_LABEL_NAMES, path)
        if not isinstance(raw, dict):
            raise SegmentationModelError(f"{path}: metadata {METADATA_LABEL_NAMES!r} must be a JSON object id -> name")
        try:
            names = {int(k): str(v) for k, v in raw.items()}
        except ValueError as exc:
            raise SegmentationModelError(f"{path}: metadata {METADATA_LABEL_NAMES!r} has a non-integer key ({exc})") from exc
    scale = None
    if METADATA_INPUT_SCALE in metadata:
        try:
            scale = float(metadata[METADATA_INPUT_SCALE])
        except ValueError as exc:
            raise SegmentationModelError(f"{path}: metadata {METADATA_INPUT_SCALE!r} is not a number") from exc
        if not (math.isfinite(scale) and scale > 0):
            raise SegmentationModelError(f"{path}: metadata {METADATA_INPUT_SCALE!r} must be positive, got {scale}")
    try:
        table = LabelTable.from_ids(ids, names)
    except ValueError as exc:
        raise SegmentationModelError(f"{path}: {exc}") from exc
    return Segmenter(model=model, table=table, name=name, sha256=sha256, license=license, input_scale=scale)


def resolve_segmenter(spec: str | None) -> Segmenter | None:
    """Load the segmentation model named by ``spec`` (a registered name or a file).

    ``None`` means :data:`DEFAULT_SEGMENTATION_MODEL` if it is registered and installed;
    when it is not, ``None`` is returned (segmentation is skipped). A model that was asked
    for explicitly but cannot be used raises :class:`SegmentationModelError`.
    """
    from synthsr_bids.models.registry import ModelNotAvailableError, get_registry, resolve_model
    from synthsr_bids.models.weights import WeightFileError, load_weights

    if spec is None:
        if DEFAULT_SEGMENTATION_MODEL not in get_registry():
            return None
        try:
            resolved = resolve_model(DEFAULT_SEGMENTATION_MODEL)
        except ModelNotAvailableError as exc:
            LOGGER.info("the default segmentation model is not installed: %s", exc)
            return None
    else:
        try:
            resolved = resolve_model(spec)
        except ModelNotAvailableError as exc:
            raise SegmentationModelError(str(exc)) from exc
    try:
        loaded = load_weights(resolved.path)
    except WeightFileError as exc:
        raise SegmentationModelError(str(exc)) from exc
    return segmenter_from_network(
        loaded.model, loaded.metadata, name=resolved.name, sha256=resolved.sha256, license=resolved.license,
        path=resolved.path,
    )


def _normalise(volume: np.ndarray, scale: float | None) -> np.ndarray:
    volume = np.maximum(volume, 0.0)
    if scale is not None:
        return (volume * scale).astype(np.float32)
    high = float(volume.max())
    if high <= 0:
        raise ValueError("the image is empty (no positive voxel); there is nothing to segment")
    return (volume / high).astype(np.float32)


def _posteriors(model: Any, x: torch.Tensor) -> torch.Tensor:
    return engine.forward(model, x).float()


def segment(
    data: np.ndarray, affine: np.ndarray, segmenter: Segmenter, *, flip: bool = True, device: str = "cpu"
) -> SegmentationResult:
    """Segment a synthetic T1w (3D array on ``affine``); see the module docstring."""
    started = time.perf_counter()
    data = np.asarray(data, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D image, got shape {data.shape}")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    resampled = None
    if np.any(np.abs(zooms - 1.0) > VOXEL_TOLERANCE_MM):
        resampled = resample_to_isotropic(data, affine)
        work, work_affine = resampled.data, resampled.affine
    else:
        work, work_affine = data, affine
    volume, _, reorientation = reorient_to_ras(work, work_affine)
    normalised = _normalise(np.ascontiguousarray(volume), segmenter.input_scale)
    multiple = int(getattr(segmenter.model.config, "size_multiple", 16))
    padded, padding = pad_to_multiple(normalised, multiple=multiple)
    swap = segmenter.table.channel_swap() if flip else None
    if flip and swap is None:
        LOGGER.info("segmentation: a lateral label has no partner; left-right flip averaging is skipped")
    model = segmenter.model
    model.to(torch.device(device))
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(padded))[None, None].to(device)
        posteriors = _posteriors(model, x)
        if swap is not None:
            flipped = _posteriors(model, torch.flip(x, dims=(2,)))
            flipped = torch.flip(flipped, dims=(2,))[:, swap]
            posteriors.add_(flipped)
            del flipped
        channels = posteriors[0].argmax(dim=0).cpu().numpy()
    ids = np.asarray(segmenter.table.ids, dtype=np.int16)
    labels_ras = ids[crop_padding(channels, padding)]
    labels = np.ascontiguousarray(undo_reorientation(labels_ras, reorientation))
    if resampled is not None:
        labels = resample_to_grid(labels.astype(np.float64), work_affine, data.shape, affine, order=0).astype(np.int16)
    return SegmentationResult(labels=labels.astype(np.int16), seconds=time.perf_counter() - started, flipped=swap is not None)
