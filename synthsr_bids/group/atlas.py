"""Population maps in template space: median template and lesion frequency.

The median is taken voxel by voxel over one registered image per participant, through a
float32 memory map in the work folder, slab by slab, so memory stays bounded for large
groups. The lesion frequency of a voxel is the fraction of participants with a lesion mask
whose lesion (union over their images) covers it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

SLAB_BYTES = 256 * 2**20


def _load(path: Path) -> nib.Nifti1Image:
    return nib.load(str(path))


def median_image(paths: Sequence[Path], *, work_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-wise median of images on one grid; returns ``(data float32, affine)``."""
    if not paths:
        raise ValueError("no image to take the median of")
    first = _load(paths[0])
    shape, affine = first.shape[:3], first.affine
    if len(paths) == 1:
        return np.asarray(first.dataobj, dtype=np.float32), affine
    work_dir.mkdir(parents=True, exist_ok=True)
    stack_path = work_dir / f"median-stack-{uuid.uuid4().hex[:8]}.npy"
    stack = np.lib.format.open_memmap(stack_path, mode="w+", dtype=np.float32, shape=(len(paths), *shape))
    try:
        for index, path in enumerate(paths):
            img = first if index == 0 else _load(path)
            if img.shape[:3] != shape or not np.allclose(img.affine, affine, atol=1e-4):
                raise ValueError(f"{path} is not on the grid of {paths[0]}")
            stack[index] = np.asarray(img.dataobj, dtype=np.float32)
        stack.flush()
        out = np.empty(shape, dtype=np.float32)
        plane_bytes = len(paths) * int(np.prod(shape[1:])) * 4
        step = max(1, SLAB_BYTES // max(plane_bytes, 1))
        for start in range(0, shape[0], step):
            out[start : start + step] = np.median(stack[:, start : start + step], axis=0)
        return out, affine
    finally:
        del stack
        stack_path.unlink(missing_ok=True)


def lesion_frequency(masks_by_subject: Mapping[str, Sequence[Path]]) -> tuple[np.ndarray, np.ndarray, int]:
    """``(fraction float32, affine, number of participants)``."""
    subjects = [s for s, masks in masks_by_subject.items() if masks]
    if not subjects:
        raise ValueError("no lesion mask in template space")
    total = None
    affine = None
    for subject in subjects:
        union = None
        for path in masks_by_subject[subject]:
            img = _load(path)
            data = np.asarray(img.dataobj) > 0
            if affine is None:
                affine = img.affine
            union = data if union is None else union | data
        total = union.astype(np.float32) if total is None else total + union
    assert total is not None and affine is not None
    return (total / len(subjects)).astype(np.float32), affine, len(subjects)
