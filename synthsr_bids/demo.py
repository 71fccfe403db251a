"""A demo BIDS dataset built from data the installed packages carry, and a demo run.

``synthsr-bids-demo DIR`` renders nilearn's bundled MNI152 (ICBM 2009a) T1 and
grey/white-matter maps into clinical-looking scans (thick-slice FLAIR-like and
T2-like images with a simulated white-matter lesion, plus a low-resolution T1w),
writes them as a small BIDS dataset under ``DIR/rawdata``, runs the participant
level with the bundled model into ``DIR/derivatives/synthsr`` and prints where
the outputs are. No network access and no ``../shared`` data are needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoScan:
    """One simulated clinical acquisition."""

    relpath: str
    contrast: str
    slice_axis: int  # RAS axis with thick slices: 0 sagittal, 1 coronal, 2 axial
    slice_mm: int


DEMO_SCANS: tuple[DemoScan, ...] = (
    DemoScan("sub-01/anat/sub-01_acq-ax_FLAIR.nii.gz", "FLAIR", 2, 5),
    DemoScan("sub-01/anat/sub-01_acq-cor_T2w.nii.gz", "T2w", 1, 5),
    DemoScan("sub-02/anat/sub-02_acq-ax_T1w.nii.gz", "T1w", 2, 6),
)

#: Tissue intensities (CSF, grey matter, white matter, lesion) of each simulated contrast.
TISSUE_INTENSITIES = {
    "FLAIR": (60.0, 520.0, 400.0, 900.0),
    "T2w": (1400.0, 850.0, 600.0, 1200.0),
    "T1w": (200.0, 550.0, 850.0, 450.0),
}


def _mni_tissues() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grey matter, white matter and CSF probabilities plus the affine (RAS, 1 mm)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    brain = ndimage.binary_fill_holes(t1.get_fdata() > 0.05 * t1.get_fdata().max())
    brain = ndimage.binary_erosion(brain, iterations=2)
    csf = np.clip(brain - gm - wm, 0, 1) * brain
    return gm, wm, csf, t1.affine


def lesion_mask(shape: Sequence[int], affine: np.ndarray, *, centre_mm=(24.0, -10.0, 24.0), radius_mm=9.0) -> np.ndarray:
    """A spherical periventricular-like lesion, in voxels of ``affine``."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(affine, ijk)
    distance = np.linalg.norm(xyz - np.asarray(centre_mm), axis=1)
    return (distance < radius_mm).reshape(shape)


def render_contrast(
    gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, lesion: np.ndarray, contrast: str, *, seed: int = 0
) -> np.ndarray:
    """Partial-volume mixture of tissue intensities with a lesion, bias and noise."""
    c_csf, c_gm, c_wm, c_lesion = TISSUE_INTENSITIES[contrast]
    image = c_csf * csf + c_gm * gm + c_wm * wm
    image = np.where(lesion & (wm > 0.3), c_lesion * (gm + wm + csf), image)
    rng = np.random.default_rng(seed)
    x = np.linspace(-1, 1, image.shape[0])[:, None, None]
    bias = np.exp(0.15 * x)
    noise = rng.normal(0.0, 0.02 * max(c_gm, c_wm), image.shape)
    return np.clip(image * bias + noise * (image > 0), 0, None)


def thick_slice_scan(image: np.ndarray, affine: np.ndarray, *, axis: int, slice_mm: int) -> nib.Nifti1Image:
    """Simulate thick slices: Gaussian slice profile then keep every ``slice_mm``-th slice."""
    sigma = [0.0, 0.0, 0.0]
    sigma[axis] = 0.42 * slice_mm
    blurred = ndimage.gaussian_filter(image, sigma)
    index = [slice(None)] * 3
    index[axis] = slice(slice_mm // 2, None, slice_mm)
    data = blurred[tuple(index)]
    new_affine = affine.copy()
    new_affine[:3, axis] = affine[:3, axis] * slice_mm
    new_affine[:3, 3] = nib.affines.apply_affine(affine, [slice_mm // 2 if a == axis else 0 for a in range(3)])
    img = nib.Nifti1Image(data.astype(np.float32), new_affine)
    img.header.set_xyzt_units("mm")
    return img


def build_demo_dataset(root: Path) -> list[Path]:
    """Write the demo BIDS dataset under ``root``; returns the image paths."""
    gm, wm, csf, affine = _mni_tissues()
    lesion = lesion_mask(gm.shape, affine)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "synthsr-bids demo (simulated from the MNI152 ICBM 2009a template)",
                "BIDSVersion": "1.10.0",
                "DatasetType": "raw",
                "License": "CC0",
                "Authors": ["synthsr-bids demo generator"],
                "ReferencesAndLinks": ["Fonov et al., NeuroImage 2011 (MNI ICBM152 2009 templates)"],
            },
            indent=2,
        )
    )
    (root / "README").write_text(
        "Simulated clinical scans (thick slices, FLAIR/T2w/T1w-like contrasts, one white-matter\n"
        "lesion) rendered from nilearn's bundled MNI152 tissue maps by synthsr-bids' demo.\n"
    )
    subjects = sorted({scan.relpath.split("/")[0] for scan in DEMO_SCANS})
    (root / "participants.tsv").write_text("participant_id\n" + "\n".join(subjects) + "\n")
    written: list[Path] = []
    for seed, scan in enumerate(DEMO_SCANS):
        image = render_contrast(gm, wm, csf, lesion, scan.contrast, seed=seed)
        img = thick_slice_scan(image, affine, axis=scan.slice_axis, slice_mm=scan.slice_mm)
        path = root / scan.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        path.with_name(path.name.replace(".nii.gz", ".json")).write_text(
            json.dumps({"MagneticFieldStrength": 1.5, "Manufacturer": "simulated", "SliceThickness": scan.slice_mm})
        )
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="synthsr-bids-demo",
        description="Build a small simulated clinical BIDS dataset and run synthsr-bids on it "
        "with the bundled model (no downloads).",
    )
    parser.add_argument("directory", type=Path, nargs="?", default=Path("synthsr-demo"),
                        help="where to put rawdata/ and derivatives/ (default: ./synthsr-demo)")
    parser.add_argument("--model", help="model to use instead of the bundled default")
    parser.add_argument("--build-only", action="store_true", help="only build the dataset")
    opts = parser.parse_args(argv)
    from synthsr_bids.cli.run import setup_logging

    setup_logging(0)  # the same handlers the participant run uses (set up once, not twice)

    raw = opts.directory.resolve() / "rawdata"
    out = opts.directory.resolve() / "derivatives" / "synthsr"
    images = build_demo_dataset(raw)
    LOGGER.info("demo dataset with %d scans written to %s", len(images), raw)
    if opts.build_only:
        return 0
    from synthsr_bids.models.registry import ModelNotAvailableError, resolve_model

    try:
        resolve_model(opts.model)
    except ModelNotAvailableError as exc:
        print(f"\nThe demo dataset is ready in {raw}, but no model is available to run it:\n  {exc}")
        return 64
    from synthsr_bids.cli.run import main as run_main

    args = [str(raw), str(out), "participant"]
    if opts.model:
        args += ["--model", opts.model]
    code = run_main(args)
    outputs = sorted(out.glob("sub-*/anat/*_T1w.nii.gz"))
    print(f"\nsynthsr-bids demo finished (exit code {code}).")
    print(f"  input dataset: {raw}")
    print(f"  derivatives:   {out}")
    for path in outputs:
        print(f"    {path.relative_to(out)}")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
