"""The README's demo: a simulated clinical dataset from nilearn's bundled MNI152 maps."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from models_builder import random_unet, write_model
from synthsr_bids.demo import DEMO_SCANS, build_demo_dataset
from synthsr_bids.validation import validate_dataset


def test_demo_dataset_is_valid_bids_with_thick_slices(tmp_path):
    paths = build_demo_dataset(tmp_path / "raw")
    assert validate_dataset(tmp_path / "raw").errors == ()
    for scan, path in zip(DEMO_SCANS, paths):
        img = nib.load(str(path))
        zooms = img.header.get_zooms()
        assert zooms[scan.slice_axis] == pytest.approx(scan.slice_mm)
        assert sorted(zooms)[:2] == pytest.approx([1.0, 1.0])
        data = img.get_fdata()
        assert data.min() >= 0 and data.max() > 100
    flair = nib.load(str(paths[0]))
    # the simulated lesion is the brightest tissue of the FLAIR
    lesion_world = np.array([24.0, -10.0, 24.0, 1.0])
    i, j, k = np.round(np.linalg.solve(flair.affine, lesion_world)[:3]).astype(int)
    data = flair.get_fdata()
    assert data[i, j, k] > np.percentile(data[data > 0], 95)


@pytest.mark.slow
def test_demo_runs_end_to_end_with_a_given_model(tmp_path):
    model = write_model(random_unet(), tmp_path / "tiny.safetensors")
    # As a user runs it: a fresh interpreter, so logging is configured by the demo itself.
    done = subprocess.run([sys.executable, "-m", "synthsr_bids.demo", str(tmp_path / "demo"), "--model", str(model)],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    out = tmp_path / "demo" / "derivatives" / "synthsr"
    printed = done.stdout
    assert done.stderr.count("participant level finished") == 1  # one log handler, not two
    images = sorted(out.rglob("*_T1w.nii.gz"))
    assert len(images) == len(DEMO_SCANS)
    for image in images:
        assert str(image.relative_to(out)) in printed
        assert nib.load(str(image)).header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SynthSR"]["Model"]["Name"] == "tiny"
    assert validate_dataset(out).errors == ()
