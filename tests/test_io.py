import os
import time

import nibabel as nib
import numpy as np
import pytest

from bids_builder import axis_affine, scan
from synthsr_bids.errors import BadInputError
from synthsr_bids.io import copy_file_atomic, load_scan, save_nifti_atomic, sweep_stale_temporaries


def _save(tmp_path, data, affine, name="img.nii.gz", dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), None)
    img.set_sform(affine, code=1)  # sform only: nibabel refuses degenerate qforms
    img.set_qform(None, code=0)
    path = tmp_path / name
    nib.save(img, str(path))
    return path


def test_loads_values_affine_and_orientation(tmp_path):
    img = scan("FLAIR", zooms=(1, 1, 4), axcodes="LAS")
    path = tmp_path / "a.nii.gz"
    nib.save(img, str(path))
    loaded = load_scan(path)
    assert loaded.data.dtype == np.float64
    np.testing.assert_allclose(loaded.data, img.get_fdata())
    np.testing.assert_allclose(loaded.affine, img.affine)
    assert loaded.axcodes == ("L", "A", "S")
    assert loaded.zooms == pytest.approx((1, 1, 4))
    assert loaded.warnings == ()


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(BadInputError, match="0-byte") as excinfo:
        load_scan(path)
    assert excinfo.value.path == path and "Fix:" in str(excinfo.value)


def test_truncated_gzip(tmp_path):
    path = _save(tmp_path, np.random.rand(20, 20, 20), np.eye(4))
    path.write_bytes(path.read_bytes()[:400])
    with pytest.raises(BadInputError, match="truncated or corrupt|cannot be read"):
        load_scan(path)


@pytest.mark.parametrize("saved,misnamed,message", [
    ("sub-01_T2w.nii", "sub-01_T2w.nii.gz",
     r"uncompressed NIfTI file although its name ends in \.gz\. Fix: rename it to sub-01_T2w\.nii "),
    ("sub-03_T2w.nii.gz", "sub-03_T2w.nii",
     r"is a gzip-compressed NIfTI file although .* Fix: rename it to sub-03_T2w\.nii\.gz "),
])
def test_compression_that_contradicts_the_name_says_to_rename(tmp_path, saved, misnamed, message):
    path = _save(tmp_path, np.random.rand(6, 6, 6), np.eye(4), name=saved)
    path.rename(tmp_path / misnamed)
    with pytest.raises(BadInputError, match=message):
        load_scan(tmp_path / misnamed)


def test_a_file_that_is_not_nifti_gets_no_renaming_advice(tmp_path):
    # not NIfTI under either reading (e.g. a git-lfs pointer): no renaming advice
    pointer = tmp_path / "sub-04_T2w.nii.gz"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12345\n")
    with pytest.raises(BadInputError, match="cannot be read as NIfTI") as error:
        load_scan(pointer)
    assert "rename" not in str(error.value)


def test_not_nifti(tmp_path):
    path = tmp_path / "x.nii"
    path.write_text("hello world, I am not an image" * 20)
    with pytest.raises(BadInputError, match="cannot be read as NIfTI"):
        load_scan(path)


def test_broken_symlink_mentions_datalad(tmp_path):
    link = tmp_path / "annexed.nii.gz"
    os.symlink(tmp_path / "missing-object", link)
    with pytest.raises(BadInputError, match="datalad get"):
        load_scan(link)


def test_unlocked_annex_pointer_file_mentions_datalad(tmp_path):
    """What git-annex leaves for an unlocked file whose content was not fetched: a one-line pointer."""
    pointer = tmp_path / "sub-01_T2w.nii.gz"
    pointer.write_text("/annex/objects/MD5E-s123456--0123456789abcdef0123456789abcdef.nii.gz\n")
    with pytest.raises(BadInputError, match=r"sub-01_T2w\.nii\.gz.*git-annex pointer file.*datalad get"):
        load_scan(pointer)


def test_4d_uses_first_volume_with_warning(tmp_path):
    data = np.stack([np.full((6, 6, 6), v) for v in (1.0, 2.0, 3.0)], axis=-1)
    data[0, 0, 0, :] = 0
    path = _save(tmp_path, data, np.eye(4))
    loaded = load_scan(path)
    assert loaded.shape == (6, 6, 6)
    assert loaded.data[1, 1, 1] == 1.0
    assert any("first volume" in w for w in loaded.warnings)


def test_nan_inf_set_to_zero(tmp_path):
    data = np.random.rand(8, 8, 8) + 1
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    loaded = load_scan(_save(tmp_path, data, np.eye(4)))
    assert loaded.data[0, 0, 0] == 0 and loaded.data[1, 1, 1] == 0
    assert np.isfinite(loaded.data).all()
    assert any("2 NaN/Inf" in w for w in loaded.warnings)


@pytest.mark.parametrize(
    "data,affine,match",
    [
        (np.random.rand(8, 8, 8), np.diag([1.0, 1.0, 0.0, 1.0]), "degenerate"),
        (np.random.rand(8, 8, 8), np.diag([1.0, 1.0, 50.0, 1.0]), "implausible voxel sizes"),
        (np.random.rand(8, 8, 8), np.diag([0.01, 1.0, 1.0, 1.0]), "implausible voxel sizes"),
        # a header in metres: the fix is the units, not "degenerate"
        (np.random.rand(8, 8, 8), np.diag([0.001, 0.001, 0.001, 1.0]), "implausible voxel sizes.*millimetres"),
        (np.random.rand(8, 8, 8) * np.array([-1e308, 1e308])[np.random.randint(0, 2, (8, 8, 8))], np.eye(4),
         "range too wide"),
        (np.ones((8, 8, 8)), np.eye(4), "constant"),
        (np.full((8, 8, 8), np.nan), np.eye(4), "no finite voxel"),
        (np.random.rand(8, 8, 1), np.eye(4), "single slice"),
    ],
)
def test_refused_images(tmp_path, data, affine, match):
    with pytest.raises(BadInputError, match=match):
        load_scan(_save(tmp_path, data.astype(np.float64), affine, dtype=np.float64))


def test_constant_first_volume_of_a_4d_file_is_named_with_the_fix(tmp_path):
    data = np.stack([np.zeros((6, 6, 6)), np.random.rand(6, 6, 6)], axis=-1)
    with pytest.raises(BadInputError, match=r"constant \(its first volume: every voxel is 0\).*Fix: exclude it"):
        load_scan(_save(tmp_path, data, np.eye(4)))


def test_rgb_image_is_refused_with_a_fix(tmp_path):
    rgb = np.zeros((6, 6, 6), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    with pytest.raises(BadInputError, match=r"sub-01_T2w\.nii\.gz: holds colour \(RGB\) voxels.*Fix: exclude it"):
        load_scan(path)


def test_complex_image_gives_its_magnitude_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    data = (rng.random((6, 7, 8)) + 1) * np.exp(1j * rng.uniform(-np.pi, np.pi, (6, 7, 8)))
    path = tmp_path / "c.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.complex64), np.eye(4)), str(path))
    loaded = load_scan(path)
    assert loaded.data.dtype == np.float64
    np.testing.assert_allclose(loaded.data, np.abs(data), rtol=1e-6)
    assert loaded.warnings == ("has complex voxels: their magnitude is synthesised",)


def test_a_few_extreme_voxels_are_clipped_with_a_warning(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.uniform(0, 100, (40, 40, 20)).round()
    clean = load_scan(_save(tmp_path, data, np.eye(4), name="clean.nii.gz", dtype=np.int16))
    assert clean.warnings == () and clean.data.max() == 100
    spiky = data.copy()
    spiky[tuple(rng.integers(0, 20, (3, 5)))] = 32767
    loaded = load_scan(_save(tmp_path, spiky, np.eye(4), name="spiky.nii.gz", dtype=np.int16))
    assert loaded.data.max() == 100  # the 99.9th percentile of these voxels: the anatomy's own maximum
    np.testing.assert_array_equal(loaded.data[spiky < 32767], data[spiky < 32767])
    (warning,) = loaded.warnings
    assert warning.startswith("5 extreme voxels (up to 32767; 99.9 % of the voxels above the minimum are at most "
                              "100) were clipped")
    assert load_scan(_save(tmp_path, spiky, np.eye(4), name="ct.nii.gz", dtype=np.int16),
                     clip_outliers=False).data.max() == 32767  # CT: the Hounsfield window comes later
    # a small object in a large empty field of view: its own brightest voxels are not outliers
    small = np.zeros((100, 100, 40))
    small[40:49, 40:49, 10:19] = rng.uniform(5, 10, (9, 9, 9)).round()  # 729 voxels, 0.18 % of the grid
    small[44, 44, 12:17] = 120  # a bright 0.7 % of the object: anatomy, not outliers
    kept_small = load_scan(_save(tmp_path, small, np.eye(4), name="small.nii.gz", dtype=np.int16))
    assert kept_small.warnings == () and kept_small.data.max() == 120
    # bright tissue covering more than 0.1 % of the volume (fat, vessels) is anatomy: kept
    bright = data.copy()
    bright[:4, :4, :4] = 5000  # 64 voxels = 0.2 %
    kept = load_scan(_save(tmp_path, bright, np.eye(4), name="bright.nii.gz", dtype=np.int16))
    assert kept.warnings == () and kept.data.max() == 5000
    # more than 99.9 % of the voxels at one value: clipping would leave nothing, so nothing is clipped
    sparse = np.zeros((40, 40, 20))
    sparse[20, 20, 10:13] = 1
    assert load_scan(_save(tmp_path, sparse, np.eye(4), name="sparse.nii.gz")).data.sum() == 3


def test_qform_sform_disagreement_reports_sform(tmp_path):
    img = nib.Nifti1Image(np.random.rand(10, 10, 10).astype(np.float32), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    img.set_sform(np.eye(4), code=1)
    img.set_qform(shifted, code=1)
    path = tmp_path / "q.nii.gz"
    nib.save(img, str(path))
    loaded = load_scan(path)
    np.testing.assert_allclose(loaded.affine, np.eye(4))
    assert loaded.affine_source == "sform"
    assert any("sform is used" in w for w in loaded.warnings)


def test_unusable_sform_falls_back_to_a_valid_qform(tmp_path):
    qform = nib.affines.from_matvec(np.diag([1.0, 1.0, 4.0]), [-20, -30, 10])
    for broken in (np.zeros((4, 4)), np.full((4, 4), np.nan)):
        header = nib.Nifti1Header()
        header.set_qform(qform, code=1)
        header["sform_code"] = 1
        for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
            header[name] = broken[row]
        # affine None: nibabel keeps the header's forms as they are
        img = nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), None, header=header)
        path = tmp_path / "img.nii.gz"
        nib.save(img, str(path))
        loaded = load_scan(path)
        np.testing.assert_allclose(loaded.affine, qform)
        assert loaded.affine_source == "qform"
        assert loaded.warnings == ("the sform is set but unusable (zero or non-finite); the qform is used instead",)


def test_qform_only(tmp_path):
    affine = axis_affine((2, 2, 2), "LPS")
    img = nib.Nifti1Image(np.random.rand(10, 10, 10).astype(np.float32), affine)
    img.set_sform(None, code=0)
    img.set_qform(affine, code=1)
    path = tmp_path / "q.nii"
    nib.save(img, str(path))
    loaded = load_scan(path)
    assert loaded.affine_source == "qform"
    np.testing.assert_allclose(loaded.affine, affine, atol=1e-5)


def test_save_atomic_roundtrip_and_no_leftovers(tmp_path):
    data = np.random.rand(5, 6, 7)
    affine = axis_affine((1, 1, 1), "LIA")
    out = tmp_path / "sub" / "x.nii.gz"
    save_nifti_atomic(data, affine, out)
    back = nib.load(str(out))
    np.testing.assert_allclose(back.get_fdata(), data.astype(np.float32))
    np.testing.assert_allclose(back.affine, affine)
    assert back.get_data_dtype() == np.float32
    assert int(back.header["sform_code"]) == 1 and int(back.header["qform_code"]) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.nii.gz"]


def test_saved_sheared_affine_keeps_an_approximate_qform_that_itk_can_read(tmp_path):
    """ITK (ANTs) refuses a NIfTI file whose only transform is sheared: the qform approximation stays."""
    sheared = np.array([[1.0, 0.2, 0.0, -10], [0.0, 1.0, 0.0, 5], [0.0, 0.0, 2.0, 3], [0, 0, 0, 1]])
    save_nifti_atomic(np.random.rand(8, 8, 8), sheared, tmp_path / "sheared.nii.gz")
    header = nib.load(str(tmp_path / "sheared.nii.gz")).header
    assert int(header["sform_code"]) == int(header["qform_code"]) == 1
    assert np.allclose(header.get_sform(), sheared, atol=1e-5)
    ants = pytest.importorskip("ants")
    assert ants.image_read(str(tmp_path / "sheared.nii.gz")).shape == (8, 8, 8)


def test_copy_file_atomic_replaces_the_destination_and_leaves_no_temporary(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(bytes(range(256)) * 10)
    destination = tmp_path / "out" / "b.bin"
    copy_file_atomic(source, destination)
    destination.write_bytes(b"old")
    copy_file_atomic(source, destination)
    assert destination.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in destination.parent.iterdir()) == ["b.bin"]
    with pytest.raises(FileNotFoundError):
        copy_file_atomic(tmp_path / "missing.bin", destination)
    assert sorted(p.name for p in destination.parent.iterdir()) == ["b.bin"]


@pytest.mark.parametrize(("shape", "zooms", "what"), [
    ((1100, 1100, 300), (0.2, 0.2, 0.5), "million voxels"),  # 363 million voxels
    ((400, 400, 400), (1.75, 1.75, 1.75), "field of view of 700 x 700 x 700 mm"),  # 64 million; 343 at 1 mm
])
def test_too_large_images_are_refused_from_the_header_alone(tmp_path, shape, zooms, what):
    """Only the header is written: the check must come before any voxel is read."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms(zooms)
    header.set_qform(np.diag([*zooms, 1.0]), code=1)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as handle:
        header.write_to(handle)
        handle.write(b"\0" * 4 + b"\1\0" * 1000)  # a truncated body
    with pytest.raises(BadInputError, match=rf"huge\.nii.*{what}"):
        load_scan(path)


def test_sweep_removes_only_old_temporaries(tmp_path):
    """A killed job's temporaries go; a concurrent job's fresh one and real files stay."""
    old = tmp_path / ".tmp-0123456789ab-dataset_description.json"
    fresh = tmp_path / ".tmp-ba9876543210-descriptions.tsv"
    real = tmp_path / "descriptions.tsv"
    for path in (old, fresh, real):
        path.write_text("x")
    long_ago = time.time() - 7200
    os.utime(old, (long_ago, long_ago))
    os.utime(real, (long_ago, long_ago))
    assert sweep_stale_temporaries(tmp_path) == [old]
    assert not old.exists() and fresh.exists() and real.exists()
    assert sweep_stale_temporaries(tmp_path / "absent") == []


def test_nan_pixdim_with_a_valid_sform_still_loads(tmp_path):
    """The size check reads the affine the pipeline uses, not the raw pixdim."""
    img = nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    img.header["pixdim"][1:4] = np.nan
    img.set_sform(np.diag([1.0, 1.0, 2.0, 1.0]), code=1)
    path = tmp_path / "nan_pixdim.nii"
    nib.save(img, str(path))
    loaded = load_scan(path)
    assert loaded.shape == (8, 9, 10) and np.allclose(loaded.zooms, (1.0, 1.0, 2.0))
