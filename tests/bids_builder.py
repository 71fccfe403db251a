"""Tiny BIDS datasets and head-like phantoms for the tests (no external data)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np

#: Rough tissue intensities per contrast: background, CSF, grey matter, white matter, lesion.
CONTRAST_INTENSITIES: Mapping[str, tuple[float, float, float, float, float]] = {
    "T1w": (0.0, 250.0, 600.0, 900.0, 500.0),
    "T2w": (0.0, 1500.0, 900.0, 600.0, 1300.0),
    "FLAIR": (0.0, 150.0, 700.0, 500.0, 1100.0),
    "PDw": (0.0, 1000.0, 900.0, 750.0, 950.0),
}


def phantom_labels(shape_mm: Sequence[int] = (48, 56, 44)) -> np.ndarray:
    """A 1 mm label phantom: 1 CSF shell, 2 'cortex', 3 'white matter', 4 a lesion,
    with a left-right asymmetry so flips are detectable."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_mm], indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    labels = np.zeros(shape_mm, dtype=np.int16)
    labels[radius < 0.9] = 1
    labels[radius < 0.8] = 2
    labels[radius < 0.6] = 3
    lesion = ((grid[0] - 0.3) ** 2 + grid[1] ** 2 + (grid[2] - 0.1) ** 2) < 0.15**2
    labels[lesion] = 4
    # an off-centre fluid-filled box breaks every mirror symmetry
    box = (grid[0] > -0.55) & (grid[0] < -0.15) & (grid[1] > 0.05) & (grid[1] < 0.45) & (grid[2] > 0.1) & (grid[2] < 0.5)
    labels[box] = 1
    return labels


def render(labels: np.ndarray, contrast: str, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = np.asarray(CONTRAST_INTENSITIES[contrast])
    image = table[labels]
    return image + rng.normal(0, 10.0, labels.shape) * (labels > 0)


def thick_slices(image: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """Average groups of ``factor`` 1 mm slices along ``axis`` (a thick-slice scan)."""
    n = image.shape[axis] // factor * factor
    moved = np.moveaxis(image, axis, 0)[:n]
    reduced = moved.reshape(n // factor, factor, *moved.shape[1:]).mean(axis=1)
    return np.moveaxis(reduced, 0, axis)


def axis_affine(zooms: Sequence[float], axcodes: str = "RAS", origin: Sequence[float] = (-24, -28, -22)) -> np.ndarray:
    """An affine storing voxels in ``axcodes`` order with the given voxel sizes."""
    affine = np.eye(4)
    ras = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine[:3, :3] = 0
    for column, code in enumerate(axcodes):
        row, sign = ras[code]
        affine[row, column] = sign * zooms[column]
    affine[:3, 3] = origin
    return affine


def scan(contrast: str, *, zooms=(1.0, 1.0, 3.0), axcodes: str = "RAS", seed: int = 0) -> nib.Nifti1Image:
    """A phantom scan of ``contrast`` with voxel sizes ``zooms`` (integers) in ``axcodes``
    storage order. The world position of every voxel is consistent across scans."""
    labels = phantom_labels()
    image = render(labels, contrast, seed=seed)
    for axis, zoom in enumerate(zooms):
        if zoom > 1:
            image = thick_slices(image, axis, int(zoom))
    ras_affine = axis_affine(zooms, "RAS")
    img = nib.Nifti1Image(image.astype(np.float32), ras_affine)
    if axcodes != "RAS":
        target = nib.orientations.axcodes2ornt(tuple(axcodes))
        current = nib.orientations.io_orientation(ras_affine)
        img = img.as_reoriented(nib.orientations.ornt_transform(current, target))
    img.header.set_xyzt_units("mm")
    return img


def write_dataset_description(root: Path, name: str = "tiny") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": name, "BIDSVersion": "1.10.0", "License": "CC0", "Authors": ["Test", "Suite"]})
    )
    (root / "README").write_text("A tiny synthetic dataset for synthsr-bids tests.\n")
    (root / "participants.tsv").write_text("participant_id\n")


def add_scan(root: Path, relpath: str, img: nib.Nifti1Image, metadata: Mapping | None = None) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    sidecar = path.with_name(path.name.split(".")[0] + ".json")
    sidecar.write_text(json.dumps(dict(metadata or {"MagneticFieldStrength": 3})))
    participants = root / "participants.tsv"
    subject = relpath.split("/")[0]
    lines = participants.read_text().splitlines()
    if subject not in lines:
        participants.write_text("\n".join(lines + [subject]) + "\n")
    return path


#: name -> (contrast, zooms, axcodes)
CLEAN_LAYOUT: Mapping[str, tuple[str, tuple[float, float, float], str]] = {
    "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz": ("FLAIR", (1, 1, 4), "RAS"),
    "sub-01/ses-1/anat/sub-01_ses-1_run-01_T2w.nii": ("T2w", (1, 3, 1), "LAS"),
    "sub-01/ses-1/anat/sub-01_ses-1_run-02_T2w.nii.gz": ("T2w", (3, 1, 1), "PSR"),
    "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz": ("T1w", (1, 1, 1), "LIA"),
    "sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz": ("FLAIR", (2, 2, 2), "RAS"),
}


def build_clean_dataset(root: Path, layout=CLEAN_LAYOUT) -> Path:
    write_dataset_description(root)
    for seed, (relpath, (contrast, zooms, axcodes)) in enumerate(layout.items()):
        add_scan(root, relpath, scan(contrast, zooms=zooms, axcodes=axcodes, seed=seed))
    return root


def add_broken_scans(root: Path) -> dict[str, Path]:
    """A zero-byte file and a truncated .nii.gz for sub-03 (plus one good scan)."""
    good = add_scan(root, "sub-03/ses-1/anat/sub-03_ses-1_FLAIR.nii.gz", scan("FLAIR", zooms=(1, 1, 3)))
    empty = add_scan(root, "sub-03/ses-1/anat/sub-03_ses-1_T2w.nii.gz", scan("T2w"))
    empty.write_bytes(b"")
    corrupt = add_scan(root, "sub-03/ses-1/anat/sub-03_ses-1_PDw.nii.gz", scan("PDw"))
    payload = corrupt.read_bytes()
    corrupt.write_bytes(payload[: len(payload) // 3])
    return {"good": good, "empty": empty, "corrupt": corrupt}


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)
