"""A 2-subject phantom BIDS dataset and a tiny (untrained) test model, for the container
smoke test and CircleCI. Needs only what the image has (numpy, nibabel, torch, synthsr_bids).

    python make_smoke_dataset.py BIDS_DIR MODELS_DIR
    podman run -i --entrypoint python IMAGE - /bids /models < make_smoke_dataset.py
"""

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from synthsr_bids.models.network import SynthSRUNet, UNetConfig
from synthsr_bids.models.weights import save_safetensors

#: subject -> (suffix, voxel size in mm, intensities of CSF, grey matter, white matter)
SCANS = {
    "01": ("FLAIR", (1.0, 1.0, 4.0), (150.0, 700.0, 500.0)),
    "02": ("T2w", (1.0, 3.0, 1.0), (1500.0, 900.0, 600.0)),
}


def main(bids_dir: Path, models_dir: Path) -> None:
    torch.manual_seed(0)
    models_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(SynthSRUNet(UNetConfig(base_features=4, n_levels=3)), models_dir / "tiny.safetensors", {"name": "smoke"})

    bids_dir.mkdir(parents=True, exist_ok=True)
    (bids_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "smoke", "BIDSVersion": "1.10.0", "License": "CC0", "Authors": ["synthsr-bids"]})
    )
    (bids_dir / "README").write_text("Phantom dataset for the synthsr-bids container smoke test.\n")
    (bids_dir / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in SCANS))
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (48, 56, 44)], indexing="ij"))
    radius = np.sqrt((grid**2).sum(axis=0))
    for subject, (suffix, zooms, (csf, grey, white)) in SCANS.items():
        image = np.where(radius < 0.6, white, np.where(radius < 0.8, grey, np.where(radius < 0.9, csf, 0.0)))
        step = tuple(int(z) for z in zooms)
        image = image[:: step[0], :: step[1], :: step[2]].astype(np.float32)
        affine = np.diag([*zooms, 1.0])
        affine[:3, 3] = (-24.0, -28.0, -22.0)
        anat = bids_dir / f"sub-{subject}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(image, affine)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(anat / f"sub-{subject}_{suffix}.nii.gz"))
        (anat / f"sub-{subject}_{suffix}.json").write_text(json.dumps({"MagneticFieldStrength": 3}))
    print(f"dataset in {bids_dir}, model in {models_dir / 'tiny.safetensors'}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_smoke_dataset.py BIDS_DIR MODELS_DIR")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
