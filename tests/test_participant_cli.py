"""End to end: the real CLI on tiny BIDS datasets with small real model files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_builder import CLEAN_LAYOUT, add_broken_scans, build_clean_dataset
from models_builder import identity_unet, random_unet, write_model
from synthsr_bids.cli.run import main
from synthsr_bids.validation import validate_dataset

REPO = Path(__file__).resolve().parents[1]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def _expected_name(relpath: str, res: str | None = None) -> str:
    parts = relpath.split("/")
    name = parts[-1].split(".")[0]
    entities, suffix = name.rsplit("_", 1)
    extra = (f"_res-{res}" if res else "") + f"_desc-synthsr{suffix}"
    return "/".join(parts[:-1] + [f"{entities}{extra}_T1w.nii.gz"])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "identity": write_model(identity_unet(), root / "identity.safetensors"),
        "random": write_model(random_unet(), root / "random.safetensors"),
    }


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, models):
    """One validated participant-level run over the clean dataset, input read-only."""
    root = tmp_path_factory.mktemp("clean")
    bids = build_clean_dataset(root / "ds")
    before = _tree_digest(bids)
    _make_read_only(bids)
    out = root / "ds-derivatives" / "synthsr"
    argv = [str(bids), str(out), "participant", "--model", str(models["random"]), "--nthreads", "1",
            "-w", str(root / "work")]
    try:
        code = main(argv)
    finally:
        _make_writable(bids)
    return {"bids": bids, "out": out, "code": code, "before": before, "argv": argv}


def test_exit_code_and_input_untouched(clean_run):
    assert clean_run["code"] == 0
    assert _tree_digest(clean_run["bids"]) == clean_run["before"]


def test_every_scan_has_outputs_with_bids_names(clean_run):
    out = clean_run["out"]
    images = sorted(str(p.relative_to(out)) for p in out.rglob("*_T1w.nii.gz"))
    assert images == sorted(_expected_name(r) for r in CLEAN_LAYOUT)
    for image in images:
        assert (out / image.replace(".nii.gz", ".json")).is_file()
    assert not list(out.rglob(".tmp-*"))


def test_outputs_are_1mm_images_covering_the_input(clean_run):
    bids, out = clean_run["bids"], clean_run["out"]
    for relpath in CLEAN_LAYOUT:
        source = nib.load(str(bids / relpath))
        output = nib.load(str(out / _expected_name(relpath)))
        assert output.get_data_dtype() == np.float32
        np.testing.assert_allclose(output.header.get_zooms(), (1, 1, 1), atol=1e-5)
        expected_shape = np.ceil(np.array(source.shape) * np.array(source.header.get_zooms())).astype(int)
        assert output.shape == tuple(expected_shape)
        # same voxel axes as the input, same field of view in world space
        assert nib.aff2axcodes(output.affine) == nib.aff2axcodes(source.affine)

        def fov(img):
            corners = np.array([[i, j, k] for i in (-0.5, img.shape[0] - 0.5)
                                for j in (-0.5, img.shape[1] - 0.5) for k in (-0.5, img.shape[2] - 0.5)])
            world = nib.affines.apply_affine(img.affine, corners)
            return world.min(axis=0), world.max(axis=0)

        for a, b in zip(fov(source), fov(output)):
            np.testing.assert_allclose(a, b, atol=1.0)
        data = output.get_fdata()
        assert np.isfinite(data).all() and data.std() > 0


def test_sidecars_say_how_the_image_was_made(clean_run, models):
    out = clean_run["out"]
    model_sha = hashlib.sha256(models["random"].read_bytes()).hexdigest()
    relpath = "sub-01/ses-1/anat/sub-01_ses-1_run-01_T2w.nii"
    sidecar = json.loads((out / _expected_name(relpath).replace(".nii.gz", ".json")).read_text())
    assert sidecar["Sources"] == [f"bids:raw:{relpath}"]
    assert sidecar["SpatialReference"] == f"bids:raw:{relpath}"
    assert sidecar["SkullStripped"] is False
    info = sidecar["SynthSR"]
    assert info["InputContrast"] == "T2w"
    assert info["InputVoxelSizeMM"] == [1.0, 3.0, 1.0]
    assert info["InputOrientation"] == "LAS"
    assert info["Model"]["SHA256"] == model_sha and info["Model"]["Name"] == "random"
    assert info["TestTimeFlipping"] is True and info["Sharpening"] is True and info["CTClipping"] is False
    assert info["Device"] == "cpu" and info["RuntimeSeconds"] > 0
    assert {"load", "write"} <= set(info["StageSeconds"])
    assert info["Software"]["synthsr-bids"] and info["Software"]["torch"]
    assert "participant" in sidecar["CommandLine"]
    assert sidecar["DateProcessed"].startswith("20")


def test_dataset_level_files(clean_run):
    out = clean_run["out"]
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["DatasetLinks"]["raw"] == clean_run["bids"].as_uri()
    rows = (out / "descriptions.tsv").read_text().splitlines()
    assert rows[0] == "desc_id\tdescription"
    # the synthetic images and their segmentations (the bundled segmenter runs by default)
    assert sorted(r.split("\t")[0] for r in rows[1:]) == [
        "desc-synthsegFLAIR", "desc-synthsegT1w", "desc-synthsegT2w", "desc-synthsrFLAIR", "desc-synthsrT1w",
        "desc-synthsrT2w",
    ]
    assert "logs" in (out / ".bidsignore").read_text().splitlines()
    assert list((out / "logs").glob("run-*.log")) and list((out / "logs").glob("config-*.json"))


def test_derivatives_pass_the_official_validator(clean_run):
    report = validate_dataset(clean_run["out"])
    assert report.errors == (), report.summary()


def test_rerun_skips_and_overwrite_redoes(clean_run, caplog):
    out = clean_run["out"]
    image = out / _expected_name("sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz")
    stamp = image.stat().st_mtime_ns
    argv = clean_run["argv"] + ["--participant-label", "02", "--skip-bids-validation"]
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        assert main(argv) == 0
    assert "skipped" in caplog.text
    assert image.stat().st_mtime_ns == stamp
    assert main(argv + ["--overwrite"]) == 0
    assert image.stat().st_mtime_ns != stamp


def test_changed_settings_are_recomputed(clean_run):
    out = clean_run["out"]
    sidecar = out / _expected_name("sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz").replace(".nii.gz", ".json")
    argv = clean_run["argv"] + ["--participant-label", "02", "--skip-bids-validation", "--disable-flipping"]
    assert main(argv) == 0
    assert json.loads(sidecar.read_text())["SynthSR"]["TestTimeFlipping"] is False


def test_interrupted_scan_is_redone(clean_run):
    """An image without its sidecar (run killed before the sidecar) is not taken as done."""
    out = clean_run["out"]
    image = out / _expected_name("sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz")
    sidecar = Path(str(image).replace(".nii.gz", ".json"))
    sidecar.unlink()
    leftover = image.with_name(".tmp-deadbeef0000-" + image.name)
    leftover.write_bytes(b"partial")
    assert main(clean_run["argv"] + ["--participant-label", "02", "--skip-bids-validation"]) == 0
    assert sidecar.is_file() and not leftover.exists()


def test_empty_image_left_by_a_crash_is_redone_and_precision_is_recorded(clean_run):
    """A machine crash could once leave a 0-byte image next to its complete sidecar: never taken as done."""
    out = clean_run["out"]
    image = out / _expected_name("sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz")
    sidecar = Path(str(image).replace(".nii.gz", ".json"))
    assert main(clean_run["argv"] + ["--participant-label", "02", "--skip-bids-validation"]) == 0
    expected = np.asanyarray(nib.load(str(image)).dataobj)
    image.write_bytes(b"")
    assert main(clean_run["argv"] + ["--participant-label", "02", "--skip-bids-validation", "--half"]) == 0
    assert np.array_equal(np.asanyarray(nib.load(str(image)).dataobj), expected)  # redone, identically
    provenance = json.loads(sidecar.read_text())["SynthSR"]["Provenance"]
    assert provenance["Precision"] == "float32"  # --half is CUDA autocast only: ignored (and recorded) on CPU


def test_model_file_changed_behind_its_hash_record_is_refused_then_rehashed(tmp_path, models, monkeypatch, caplog):
    """The SHA-256 recorded (size + mtime unchanged) must be the SHA-256 of the bytes loaded."""
    monkeypatch.setenv("SYNTHSR_BIDS_MODELS", str(tmp_path / "cache"))
    bids = build_clean_dataset(tmp_path / "ds", layout={"sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS")})
    model = tmp_path / "mine.safetensors"
    model.write_bytes(models["random"].read_bytes())
    argv = [str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--model", str(model),
            "--skip-segmentation", "--skip-reports"]
    assert main(argv) == 0
    first = json.loads(next((tmp_path / "out").rglob("*_T1w.json")).read_text())["SynthSR"]["Provenance"]
    # Same size, same mtime, other weights: a different valid model the hash record does not see.
    stamp = model.stat()
    other = write_model(random_unet(seed=1), tmp_path / "other.safetensors")
    assert other.stat().st_size == stamp.st_size  # same architecture, other weights
    model.write_bytes(other.read_bytes())
    os.utime(model, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with caplog.at_level(logging.ERROR, logger="synthsr_bids"):
        assert main(argv) == 64
    assert f"{model}: the file loaded has SHA-256 {hashlib.sha256(other.read_bytes()).hexdigest()[:12]}" in caplog.text
    assert main(argv) == 0  # the record was refreshed: the file is used as it is now, and recomputed
    second = json.loads(next((tmp_path / "out").rglob("*_T1w.json")).read_text())["SynthSR"]["Provenance"]
    assert second["ModelSHA256"] == hashlib.sha256(other.read_bytes()).hexdigest() != first["ModelSHA256"]


def test_identity_model_overlays_input_in_world_space(tmp_path, models):
    """With a network that returns its input, the res-native output must match the input
    voxel by voxel (up to SynthSR's 0..128 clipping), for every storage orientation."""
    bids = build_clean_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "--model", str(models["identity"]), "--native-grid",
                 "--disable-sharpening", "--skip-bids-validation", "--nthreads", "1"])
    assert code == 0
    for relpath in CLEAN_LAYOUT:
        source = nib.load(str(bids / relpath))
        native = nib.load(str(out / _expected_name(relpath, res="native")))
        one_mm = nib.load(str(out / _expected_name(relpath, res="1")))
        assert native.shape == source.shape
        np.testing.assert_allclose(native.affine, source.affine, atol=1e-4)
        np.testing.assert_allclose(one_mm.header.get_zooms(), (1, 1, 1), atol=1e-5)
        x = source.get_fdata()
        expected = np.clip(255 * (x - x.min()) / (x.max() - x.min()), 0, 128)
        got = native.get_fdata()
        inside = (expected > 5) & (expected < 120)
        r = np.corrcoef(expected[inside], got[inside])[0, 1]
        assert r > 0.98, (relpath, r)
        assert np.abs(expected - got)[inside].mean() < 6.0, relpath  # out of 128 (trilinear round trip)
        for axis in range(3):  # a mirrored result would not pass
            assert np.corrcoef(expected[inside], np.flip(got, axis)[inside])[0, 1] < 0.95
        sidecar = json.loads((out / _expected_name(relpath, res="native").replace(".nii.gz", ".json")).read_text())
        assert sidecar["Resolution"]["native"].startswith("the grid of the source")
    assert validate_dataset(out).errors == ()


def test_ct_flag_clips_hounsfield_units_before_the_network(tmp_path, models):
    """--ct through the command line: the input is clipped to [0, 80] first, so with a network that
    returns its input every head voxel (all above 80 in this phantom) comes out saturated."""
    from scipy import ndimage

    relpath = "sub-01/anat/sub-01_T1w.nii.gz"
    bids = build_clean_dataset(tmp_path / "ds", layout={relpath: ("T1w", (1, 1, 1), "RAS")})
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--model", str(models["identity"]), "--native-grid", "--ct",
                 "--disable-sharpening", "--disable-flipping", "--skip-bids-validation", "--skip-segmentation",
                 "--skip-reports"]) == 0
    x = nib.load(str(bids / relpath)).get_fdata()
    got = nib.load(str(out / _expected_name(relpath, res="native"))).get_fdata()
    head = ndimage.binary_erosion(x > 150, iterations=2)
    assert head.sum() > 1000 and x[head].std() > 100  # very different tissues in the input...
    assert got[head].mean() > 120 and got[head].std() < 3  # ...one value out: clip(255 * 80 / 80, 0, 128)
    assert got[~ndimage.binary_dilation(x > 150, iterations=2)].max() < 5  # air stays dark
    sidecar = json.loads((out / _expected_name(relpath, res="1").replace(".nii.gz", ".json")).read_text())
    assert sidecar["SynthSR"]["CTClipping"] is True and sidecar["SynthSR"]["Provenance"]["CTClipping"] is True


def test_default_model_is_the_bundled_one_without_sharpening(tmp_path, monkeypatch):
    """No --model: the bundled model, as its weight file asks (no sharpening), named in the sidecar."""
    from synthsr_bids.models.registry import DEFAULT_MODEL, REGISTRY

    monkeypatch.setenv("SYNTHSR_BIDS_MODELS", str(tmp_path / "cache"))
    relpath = "sub-01/anat/sub-01_FLAIR.nii.gz"
    bids = build_clean_dataset(tmp_path / "ds", layout={relpath: ("FLAIR", (1, 1, 3), "RAS")})
    out = tmp_path / "out"
    assert main([str(bids), str(out), "participant", "--skip-bids-validation", "--skip-segmentation",
                 "--skip-reports", "--nthreads", "2"]) == 0
    sidecar = json.loads((out / _expected_name(relpath).replace(".nii.gz", ".json")).read_text())
    model = sidecar["SynthSR"]["Model"]
    assert model["Name"] == DEFAULT_MODEL and model["SHA256"] == REGISTRY[DEFAULT_MODEL].sha256
    assert model["License"] == "Apache-2.0" and sidecar["SynthSR"]["Sharpening"] is False
    image = nib.load(str(out / _expected_name(relpath)))
    assert np.allclose(image.header.get_zooms(), 1.0) and np.isfinite(image.get_fdata()).all()


def test_bad_scans_fail_alone(tmp_path, models, caplog):
    bids = build_clean_dataset(tmp_path / "ds", layout={
        "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii.gz": ("FLAIR", (1, 1, 3), "RAS")})
    broken = add_broken_scans(bids)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        code = main([str(bids), str(out), "participant", "--model", str(models["random"]),
                     "--skip-bids-validation", "--nthreads", "1"])
    assert code == 1
    assert str(broken["empty"]) in caplog.text and "0-byte" in caplog.text
    assert str(broken["corrupt"]) in caplog.text
    written = sorted(p.name for p in out.rglob("*_T1w.nii.gz"))
    assert written == ["sub-01_ses-1_desc-synthsrFLAIR_T1w.nii.gz", "sub-03_ses-1_desc-synthsrFLAIR_T1w.nii.gz"]
    assert "1 failed" not in caplog.text and "2 failed" in caplog.text


def test_a_non_finite_synthetic_image_is_never_written(tmp_path, models, monkeypatch, caplog):
    from synthsr_bids.inference import predict

    real = predict.synthesize

    def broken_network(data, affine, model, options):
        result = real(data, affine, model, options)
        result.data[0, 0, 0] = np.nan
        return result

    monkeypatch.setattr(predict, "synthesize", broken_network)
    bids = build_clean_dataset(tmp_path / "ds", layout={
        "sub-01/anat/sub-01_FLAIR.nii.gz": ("FLAIR", (1, 1, 3), "RAS")})
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        code = main([str(bids), str(out), "participant", "--model", str(models["random"]),
                     "--skip-bids-validation", "--nthreads", "1", "-w", str(tmp_path / "work")])
    assert code == 1
    assert "the synthetic image has 1 NaN/Inf voxels; nothing was written" in caplog.text
    assert not list(out.rglob("sub-01*_T1w.*"))


def test_two_files_of_one_image_fail_both_instead_of_overwriting_each_other(tmp_path, models, caplog):
    bids = build_clean_dataset(tmp_path / "ds", layout={
        "sub-01/anat/sub-01_T2w.nii": ("T2w", (1, 1, 3), "RAS"),
        "sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 4), "RAS"),
        "sub-01/anat/sub-01_FLAIR.nii.gz": ("FLAIR", (1, 1, 3), "RAS")})
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "--model", str(models["random"]), "--skip-bids-validation",
            "--nthreads", "1", "-w", str(tmp_path / "work")]
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        assert main(argv) == 1
    assert ("sub-01_T2w.nii: has the same BIDS entities and suffix as sub-01/anat/sub-01_T2w.nii.gz" in caplog.text)
    assert "sub-01_T2w.nii.gz: has the same BIDS entities and suffix as sub-01/anat/sub-01_T2w.nii " in caplog.text
    assert sorted(p.name for p in out.rglob("*_T1w.nii.gz")) == ["sub-01_desc-synthsrFLAIR_T1w.nii.gz"]
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"anat": {"extension": ".nii.gz"}}))
    assert main(argv + ["--bids-filter-file", str(filters)]) == 0
    written = json.loads((out / "sub-01" / "anat" / "sub-01_desc-synthsrT2w_T1w.json").read_text())
    assert written["Sources"] == ["bids:raw:sub-01/anat/sub-01_T2w.nii.gz"]


def test_a_scan_that_fails_after_an_earlier_success_says_its_old_outputs_remain(tmp_path, models, caplog):
    bids = build_clean_dataset(tmp_path / "ds", layout={
        "sub-01/anat/sub-01_FLAIR.nii.gz": ("FLAIR", (1, 1, 3), "RAS")})
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "--model", str(models["random"]), "--skip-bids-validation",
            "--nthreads", "1", "-w", str(tmp_path / "work")]
    assert main(argv) == 0
    source = bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz"
    source.write_bytes(source.read_bytes()[:300])  # replaced by a broken copy
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        assert main(argv) == 1
    assert ("is truncated or corrupt" in caplog.text and "The outputs of an earlier run of this scan "
            "(sub-01_desc-synthsrFLAIR_T1w.nii.gz, its sidecar and what was derived from it) are left in place"
            in caplog.text)


def test_invalid_dataset_exits_16(tmp_path, models):
    bids = build_clean_dataset(tmp_path / "ds", layout={
        "sub-01/anat/sub-01_FLAIR.nii.gz": ("FLAIR", (1, 1, 3), "RAS")})
    (bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz").write_bytes(b"")
    assert main([str(bids), str(tmp_path / "out"), "participant", "--model", str(models["random"])]) == 16


@pytest.mark.parametrize(
    "setup,extra,code",
    [
        ("missing", [], 66),
        ("not-bids", [], 65),
        ("clean", ["--participant-label", "42"], 66),
        ("clean", ["--contrasts", "angio"], 66),
        ("clean", ["--model", "no-such-model"], 64),
        pytest.param("clean", ["--device", "cuda:7"], 64, marks=pytest.mark.skipif(
            __import__("torch").cuda.device_count() > 7, reason="a machine with 8 GPUs")),
    ],
)
def test_exit_codes(tmp_path, models, setup, extra, code):
    bids = tmp_path / "ds"
    if setup == "not-bids":
        bids.mkdir()
    elif setup == "clean":
        build_clean_dataset(bids, layout={"sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS")})
    argv = [str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation"]
    if "--model" not in extra:
        argv += ["--model", str(models["random"])]
    assert main(argv + extra) == code


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder nobody running the test can write into: without write permission for a normal user;
    for root (who ignores permissions, as in CI), a read-only tmpfs, as a container's read-only mount."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
        yield locked
        locked.chmod(0o700)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:  # pragma: no cover - root without CAP_SYS_ADMIN
        pytest.skip(f"root cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield locked
    finally:
        subprocess.run(["umount", str(locked)], check=True)


def test_unwritable_output_exits_73_and_says_why(tmp_path, models, unwritable_dir, caplog):
    bids = build_clean_dataset(tmp_path / "ds", layout={"sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS")})
    argv = [str(bids), str(unwritable_dir / "out"), "participant", "--skip-bids-validation",
            "--model", str(models["random"])]
    with caplog.at_level(logging.ERROR, logger="synthsr_bids"):
        assert main(argv) == 73
    assert f"cannot write to {unwritable_dir / 'out'}" in caplog.text and "read-write" in caplog.text


def test_unwritable_work_dir_exits_73(tmp_path, models, unwritable_dir, caplog):
    bids = build_clean_dataset(tmp_path / "ds", layout={"sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS")})
    argv = [str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation",
            "--model", str(models["random"]), "-w", str(unwritable_dir)]
    with caplog.at_level(logging.ERROR, logger="synthsr_bids"):
        assert main(argv) == 73
    assert f"cannot write to {unwritable_dir}" in caplog.text


def test_small_work_folder_is_warned_about(tmp_path, models, caplog):
    """As in a container's 64 MB /tmp: the run goes on, with a warning that names the fix."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:  # pragma: no cover - not root, or no CAP_SYS_ADMIN
        pytest.skip("cannot mount a small tmpfs here")
    try:
        bids = build_clean_dataset(tmp_path / "ds",
                                   layout={"sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS")})
        argv = [str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--skip-segmentation",
                "--skip-reports", "--model", str(models["random"]), "-w", str(small)]
        with caplog.at_level(logging.WARNING, logger="synthsr_bids"):
            assert main(argv) == 0
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert f"the work folder {small} has only 16 MB free" in caplog.text and "-w/--work-dir" in caplog.text


def test_output_under_a_file_exits_73(tmp_path, models):
    bids = build_clean_dataset(tmp_path / "ds", layout={"sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS")})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    argv = [str(bids), str(blocker / "out"), "participant", "--skip-bids-validation", "--model", str(models["random"])]
    assert main(argv) == 73


def test_group_level_on_a_mistyped_output_folder_creates_nothing(clean_run, tmp_path, caplog):
    typo = tmp_path / "ds-derivativs" / "synthsr"
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        assert main([str(clean_run["bids"]), str(typo), "group", "--skip-registration"]) == 66
    assert f"{typo} holds no synthsr-bids derivatives" in caplog.text and "check the output_dir path" in caplog.text
    assert not typo.parent.exists()


def test_group_level_reports_missing_participants(clean_run, caplog):
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        assert main([str(clean_run["bids"]), str(clean_run["out"]), "group", "--skip-registration"]) == 0
    assert "5 synthetic T1w image(s) for 2 participant(s)" in caplog.text


@pytest.mark.parametrize(("selection", "expected"), [
    (["--participant-label", "sub-02"], {("sub-02", "ses-1")}),
    (["--participant-label", "01", "--session-label", "2"], {("sub-01", "ses-2")}),
])
def test_group_level_takes_only_the_selected_participants_and_sessions(clean_run, tmp_path, selection, expected):
    import csv

    argv = [str(clean_run["bids"]), str(clean_run["out"]), "group", "--skip-registration", "--skip-reports",
            "-w", str(tmp_path / "work"), *selection]
    assert main(argv) == 0
    with open(clean_run["out"] / "group_desc-qc.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    assert rows and {(r["participant_id"], r["session_id"]) for r in rows} == expected


def test_one_group_run_at_a_time_and_its_work_folder_is_removed(clean_run, tmp_path, caplog):
    """A second group run on the same derivatives stops at once (exit 73) instead of mixing its
    tables and report with the first run's."""
    work = tmp_path / "work"
    argv = [str(clean_run["bids"]), str(clean_run["out"]), "group", "--skip-registration", "-w", str(work)]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from synthsr_bids.derivatives.dataset import group_lock\n"
        f"with group_lock(Path({str(clean_run['out'])!r})):\n    print('held', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        table = clean_run["out"] / "group_desc-qc.tsv"
        table.unlink(missing_ok=True)
        with caplog.at_level(logging.ERROR, logger="synthsr_bids"):
            assert main(argv) == 73
        assert "another group-level run is writing in" in caplog.text
        assert not table.exists()  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the lock died with its process
    assert (clean_run["out"] / "group_desc-qc.tsv").is_file()
    assert list(work.glob("group-*")) == []  # the run's (emptied) work folder is gone


def test_console_scripts_run():
    version = subprocess.run([sys.executable, "-m", "synthsr_bids", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "synthsr-bids" in version.stdout
    helped = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--participant-label" in helped.stdout


def test_preview_model_is_announced_in_the_log_and_in_every_sidecar(tmp_path, caplog):
    from synthsr_bids.models.weights import PREVIEW_STATUS, STATUS_METADATA, save_safetensors

    model = tmp_path / "early.safetensors"
    save_safetensors(random_unet(), model, {STATUS_METADATA: PREVIEW_STATUS})
    bids = build_clean_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    argv = [str(bids), str(out), "participant", "--model", str(model), "--nthreads", "1", "--participant-label", "01",
            "--skip-bids-validation", "-w", str(tmp_path / "work")]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert "early" in caplog.text and "is a preview" in caplog.text
    sidecars = sorted(out.glob("sub-01/**/*_T1w.json"))
    assert sidecars
    for path in sidecars:
        notes = json.loads(path.read_text())["SynthSR"]["Notes"]
        assert any("is a preview" in note and "synthsr-v1" in note for note in notes), path


def test_sharpening_follows_the_model_unless_the_command_line_says(tmp_path, models, caplog):
    """A weight file that asks for no sharpening (``synthsr_bids.sharpen`` = false, as the bundled model's)
    is not sharpened by default; --enable-sharpening overrides it and the rerun recomputes the outputs."""
    from synthsr_bids.models.weights import SHARPEN_METADATA, save_safetensors

    plain = tmp_path / "plain.safetensors"
    save_safetensors(identity_unet(), plain, {SHARPEN_METADATA: "false"})
    bids = build_clean_dataset(tmp_path / "ds")

    def run(out: Path, *extra: str, model: Path = plain) -> dict[str, np.ndarray]:
        argv = [str(bids), str(out), "participant", "--model", str(model), "--nthreads", "1",
                "--participant-label", "01", "--skip-bids-validation", "-w", str(tmp_path / "work"), *extra]
        assert main(argv) == 0
        images = sorted(out.glob("sub-01/**/*_T1w.nii.gz"))
        assert images
        return {str(p.relative_to(out)): nib.load(str(p)).get_fdata() for p in images}

    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        asked = run(tmp_path / "asked")
    assert "sharpening off (as model" in caplog.text
    forced_off = run(tmp_path / "off", "--disable-sharpening")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        sharpened = run(tmp_path / "on", "--enable-sharpening")
    assert "sharpening on (command line), although model plain asks for it off" in caplog.text
    default_file = run(tmp_path / "file-default", model=models["identity"])  # no metadata: mri_synthsr's sharpening
    for name, image in asked.items():
        np.testing.assert_array_equal(image, forced_off[name])
        np.testing.assert_array_equal(sharpened[name], default_file[name])
        assert np.abs(sharpened[name] - image).max() > 1.0, name
    sidecars = {path.parent.parent.name: json.loads(path.read_text())["SynthSR"]["Sharpening"]
                for path in (tmp_path / "asked").glob("sub-01/**/*_T1w.json")}
    assert sidecars and not any(sidecars.values())
    # The same folder rerun with --enable-sharpening: the settings changed, so the outputs are recomputed.
    rerun = run(tmp_path / "asked", "--enable-sharpening")
    for name, image in rerun.items():
        np.testing.assert_array_equal(image, sharpened[name])
    for path in (tmp_path / "asked").glob("sub-01/**/*_T1w.json"):
        assert json.loads(path.read_text())["SynthSR"]["Sharpening"] is True
