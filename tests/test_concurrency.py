"""Participant-level jobs in parallel on one derivatives folder (SLURM arrays, BABS):
four processes of the real CLI at once, one participant each, must leave a valid
derivatives dataset with every output and intact shared files."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_builder import add_scan, scan, write_dataset_description
from synthsr_bids.derivatives.dataset import BIDSIGNORE_LINES, DESCRIPTIONS_HEADER
from synthsr_bids.validation import ValidatorUnavailableError, find_validator, validate_dataset

#: subject -> (contrast, zooms): different contrasts so each job adds its own descriptions.tsv row.
SUBJECTS = {
    "01": ("FLAIR", (1, 1, 4)),
    "02": ("T2w", (1, 3, 1)),
    "03": ("T1w", (2, 2, 2)),
    "04": ("PDw", (3, 1, 1)),
}


def _validator_missing() -> bool:
    try:
        find_validator()
    except ValidatorUnavailableError:
        return True
    return False


def tiny_model(path: Path) -> Path:
    import torch

    from synthsr_bids.models.network import SynthSRUNet, UNetConfig
    from synthsr_bids.models.weights import save_safetensors

    torch.manual_seed(0)
    save_safetensors(SynthSRUNet(UNetConfig(base_features=4, n_levels=3)), path, {"name": "tiny-test"})
    return path


@pytest.mark.slow
@pytest.mark.skipif(_validator_missing(), reason="bids-validator-deno is not installed (pip install bids-validator-deno)")
def test_four_participant_jobs_share_one_output_folder(tmp_path):
    bids = tmp_path / "ds"
    write_dataset_description(bids)
    for seed, (subject, (contrast, zooms)) in enumerate(SUBJECTS.items()):
        add_scan(bids, f"sub-{subject}/anat/sub-{subject}_{contrast}.nii.gz", scan(contrast, zooms=zooms, seed=seed))
    out = tmp_path / "derivatives" / "synthsr"
    model = tiny_model(tmp_path / "tiny.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SYNTHSR_BIDS_MODELS": str(tmp_path / "models-cache")}

    jobs = {
        subject: subprocess.Popen(
            [sys.executable, "-m", "synthsr_bids", str(bids), str(out), "participant",
             "--participant-label", subject, "--model", str(model), "--skip-bids-validation",
             "--nthreads", "1", "-w", str(tmp_path / f"work-{subject}")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for subject in SUBJECTS
    }
    logs = {subject: job.communicate(timeout=1200)[0] for subject, job in jobs.items()}
    assert {s: j.returncode for s, j in jobs.items()} == {s: 0 for s in SUBJECTS}, logs

    # every participant's outputs
    for subject, (contrast, _) in SUBJECTS.items():
        image = out / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-synthsr{contrast}_T1w.nii.gz"
        data = np.asanyarray(nib.load(image).dataobj)
        assert data.ndim == 3 and np.isfinite(data).all()
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["Sources"] == [f"bids:raw:sub-{subject}/anat/sub-{subject}_{contrast}.nii.gz"]

    # shared files: whole, each row/line once, nothing lost
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "synthsr-bids"
    rows = list(csv.reader(io.StringIO((out / "descriptions.tsv").read_text()), delimiter="\t"))
    assert tuple(rows[0]) == DESCRIPTIONS_HEADER
    expected = {f"desc-synth{kind}{c}" for c, _ in SUBJECTS.values() for kind in ("sr", "seg")}  # default segmenter
    assert sorted(r[0] for r in rows[1:]) == sorted(expected)
    assert all(len(r) == 2 and r[1] for r in rows[1:])
    ignore = (out / ".bidsignore").read_text().splitlines()
    assert sorted(ignore) == sorted(BIDSIGNORE_LINES)

    # no temporary file left behind by the atomic writes
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]
    assert leftovers == []
    assert len(list((out / "logs").glob("run-*.log"))) == len(SUBJECTS)

    report = validate_dataset(out)
    assert report.errors == (), report.summary()
