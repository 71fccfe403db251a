"""Helpers for the reports / morphometry / group-level tests: a tiny segmentation U-Net with
the label metadata contract, lesion masks and a TemplateFlow-layout template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch

from bids_builder import axis_affine, phantom_labels
from models_builder import pass_channel_zero
from synthsr_bids.models.network import SynthSRUNet, UNetConfig
from synthsr_bids.models.weights import save_safetensors

#: Labels of the band segmenter (channel order) and the intensity thresholds between them.
BAND_LABELS = (0, 24, 3, 42, 2, 41)


def band_segmenter(
    thresholds: Sequence[float] = (0.1, 0.45, 0.8),
    *,
    labels: Sequence[int] = BAND_LABELS,
    sharpness: float = 60.0,
    base_features: int = 4,
    n_levels: int = 3,
) -> SynthSRUNet:
    """A softmax SynthSR U-Net that classifies each voxel by its (normalised) intensity.

    The body passes channel 0 through unchanged (centre taps, identity BatchNorm, ELU on
    x >= 0); the head makes the logits of *band* ``b`` equal to ``s * (b x - sum_{j<b} t_j)``,
    so the winning band is the number of thresholds below ``x``. Bands are, in order:
    ``labels[0]`` (background), ``labels[1]``, then pairs ``(labels[2], labels[3])``,
    ``(labels[4], labels[5])``... where both labels of a pair get the same logit (the first one,
    usually the left label, wins ties).
    """
    n_bands = len(thresholds) + 1
    band_of_channel = [0, 1] + [2 + (c - 2) // 2 for c in range(2, len(labels))]
    if max(band_of_channel) != n_bands - 1:
        raise ValueError("labels do not fit the number of thresholds")
    config = UNetConfig(out_channels=len(labels), n_levels=n_levels, base_features=base_features,
                        final_activation="softmax")
    net = pass_channel_zero(SynthSRUNet(config))
    cumulative = np.concatenate([[0.0], np.cumsum(thresholds)])
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        for channel, band in enumerate(band_of_channel):
            net.head.weight[channel, 0] = sharpness * band
            net.head.bias[channel] = -sharpness * cumulative[band]
    return net.eval()


def write_segmenter(path: Path, net: SynthSRUNet | None = None, *, labels: Sequence[int] = BAND_LABELS,
                    names: dict[int, str] | None = None, extra: dict[str, str] | None = None) -> Path:
    net = net if net is not None else band_segmenter(labels=labels)
    metadata = {"labels": json.dumps(list(labels)), "description": "test band segmenter"}
    if names is not None:
        metadata["label_names"] = json.dumps({str(k): v for k, v in names.items()})
    metadata.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(net, path, metadata)
    return path


def phantom_lesion_mask(zooms=(1.0, 1.0, 1.0)) -> nib.Nifti1Image:
    """The phantom's lesion (label 4) as a binary mask on a grid of ``zooms`` (same world
    space as :func:`bids_builder.scan`)."""
    lesion = (phantom_labels() == 4).astype(np.float64)
    from bids_builder import thick_slices

    for axis, zoom in enumerate(zooms):
        if zoom > 1:
            lesion = thick_slices(lesion, axis, int(zoom))
    img = nib.Nifti1Image((lesion >= 0.5).astype(np.uint8), axis_affine(zooms, "RAS"))
    img.header.set_xyzt_units("mm")
    return img


def template_image(shape=(48, 56, 44), *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A head-like template on a 1 mm RAS grid centred on the origin: the phantom rendered in
    T1-like contrast (what SynthSR outputs look like), brain mask = labels 2..4."""
    labels = phantom_labels(shape)
    table = np.array([0.0, 30.0, 80.0, 110.0, 60.0])
    rng = np.random.default_rng(seed)
    image = table[labels] + rng.normal(0, 1.0, labels.shape) * (labels > 0)
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0
    return image.astype(np.float32), affine


def write_templateflow_template(home: Path, name: str = "Tiny", *, shape=(48, 56, 44)) -> Path:
    """A template in the TemplateFlow layout: ``tpl-<name>/template_description.json``,
    ``tpl-<name>_res-01_T1w.nii.gz`` and ``tpl-<name>_res-01_desc-brain_mask.nii.gz``."""
    folder = home / f"tpl-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "template_description.json").write_text(json.dumps({
        "Name": f"{name}: a tiny synthetic template for tests",
        "Authors": ["synthsr-bids tests"],
        "Identifier": name,
        "License": "CC0",
        "TemplateFlowVersion": "1.0.0",
        "res": {"01": {"origin": [0, 0, 0], "shape": list(shape), "zooms": [1, 1, 1]}},
    }))
    image, affine = template_image(shape)
    nib.save(nib.Nifti1Image(image, affine), str(folder / f"tpl-{name}_res-01_T1w.nii.gz"))
    brain = (phantom_labels(shape) >= 2).astype(np.uint8)
    nib.save(nib.Nifti1Image(brain, affine), str(folder / f"tpl-{name}_res-01_desc-brain_mask.nii.gz"))
    return folder
