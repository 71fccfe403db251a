"""Segmentation labels, volumes, lesion masks and the segmentation U-Net on small images."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_builder import axis_affine
from downstream_builder import BAND_LABELS, band_segmenter, write_segmenter
from models_builder import identity_unet, write_model
from synthsr_bids.morphometry.images import find_synthetic_images, parse_synthetic
from synthsr_bids.morphometry.labels import LabelTable, hemisphere_of, read_dseg_tsv, structure_of
from synthsr_bids.morphometry.lesions import (
    LesionMask,
    find_lesion_masks,
    is_lesion_mask,
    match_lesion_mask,
    resample_mask,
)
from synthsr_bids.morphometry.segment import (
    SegmentationModelError,
    Segmenter,
    resolve_segmenter,
    segment,
    segmenter_from_network,
)
from synthsr_bids.morphometry.volumes import (
    asymmetry_index,
    asymmetries,
    label_volumes,
    read_volumes_tsv,
    volumes_to_tsv,
)


# ---------------------------------------------------------------------------- labels
def test_label_table_names_colours_and_pairs():
    table = LabelTable.from_ids([0, 2, 3, 24, 41, 42, 17, 53, 999], names={999: "Tumour"})
    assert table.name(2) == "Left-Cerebral-White-Matter" and table.name(53) == "Right-Hippocampus"
    assert table.name(999) == "Tumour" and table.colour(3) == (205, 62, 78)
    assert table.foreground == (2, 3, 24, 41, 42, 17, 53, 999)
    assert sorted(table.lateral_pairs()) == [
        ("Cerebral-Cortex", 3, 42), ("Cerebral-White-Matter", 2, 41), ("Hippocampus", 17, 53)
    ]
    swap = table.channel_swap()
    # channel order 0,2,3,24,41,42,17,53,999 -> left and right channels exchanged
    assert swap == [0, 4, 5, 3, 1, 2, 7, 6, 8]
    assert hemisphere_of("ctx-rh-insula") == "right" and structure_of("ctx-lh-insula") == "ctx-insula"


def test_unpaired_lateral_label_disables_the_flip_swap():
    assert LabelTable.from_ids([0, 2, 3, 41]).channel_swap() is None
    with pytest.raises(ValueError, match="unique"):
        LabelTable.from_ids([0, 2, 2])


def test_dseg_tsv_round_trip(tmp_path):
    table = LabelTable.from_ids([0, 17, 53, 24])
    path = tmp_path / "x_dseg.tsv"
    path.write_text(table.to_tsv())
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tname\tcolor"
    assert lines[1:] == ["0\tUnknown\t#000000", "17\tLeft-Hippocampus\t#dcd814", "24\tCSF\t#3c3c3c",
                         "53\tRight-Hippocampus\t#dcd814"]
    again = read_dseg_tsv(path)
    assert set(again.ids) == {0, 17, 24, 53} and again.colour(17) == (220, 216, 20)


# ---------------------------------------------------------------------------- volumes
def test_volumes_count_voxels_times_voxel_volume():
    dseg = np.zeros((10, 10, 10), dtype=np.int16)
    dseg[:3] = 17          # 300 voxels left hippocampus
    dseg[5:6] = 53         # 100 voxels right hippocampus
    dseg[9, 9, 9] = 24
    affine = axis_affine((1.0, 1.0, 2.0), "LAS")  # 2 mm^3 voxels
    table = LabelTable.from_ids([0, 17, 53, 24, 2, 41])
    volumes = {v.name: v.volume_mm3 for v in label_volumes(dseg, affine, table)}
    assert volumes == {"Left-Hippocampus": 600.0, "Right-Hippocampus": 200.0, "CSF": 2.0,
                       "Left-Cerebral-White-Matter": 0.0, "Right-Cerebral-White-Matter": 0.0}
    asym = asymmetries(volumes, table)
    assert asym["Hippocampus"] == pytest.approx(2 * (600 - 200) / 800)
    assert math.isnan(asym["Cerebral-White-Matter"])


def test_asymmetry_index_and_tsv_round_trip(tmp_path):
    assert asymmetry_index(110, 90) == pytest.approx(0.2)
    assert asymmetry_index(90, 110) == pytest.approx(-0.2)
    assert math.isnan(asymmetry_index(0, 0))
    rows = label_volumes(np.array([[[17, 53, 53]]]), np.eye(4), LabelTable.from_ids([0, 17, 53]))
    path = tmp_path / "v.tsv"
    path.write_text(volumes_to_tsv(rows))
    assert path.read_text().splitlines() == [
        "index\tname\tstructure\themisphere\tvolume_mm3",
        "17\tLeft-Hippocampus\tHippocampus\tleft\t1.0",
        "53\tRight-Hippocampus\tHippocampus\tright\t2.0",
    ]
    assert read_volumes_tsv(path) == rows


# ---------------------------------------------------------------------------- lesion masks
@pytest.mark.parametrize("name, expected", [
    ("sub-01_ses-1_label-lesion_roi.nii.gz", True),
    ("sub-01_acq-ax_desc-lesion_mask.nii", True),
    ("sub-r001s001_ses-1_space-orig_label-L_desc-T1lesion_mask.nii.gz", True),
    ("sub-01_space-MNI152NLin2009cAsym_label-lesion_mask.nii.gz", False),
    ("sub-01_label-brain_mask.nii.gz", False),
    ("sub-01_label-lesion_roi.json", False),
    ("sub-01_FLAIR.nii.gz", False),
])
def test_lesion_mask_names(name, expected):
    assert is_lesion_mask(name) is expected


def _touch_nii(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4)), str(path))
    return path


def test_find_and_match_lesion_masks(tmp_path):
    raw, extra = tmp_path / "raw", tmp_path / "lesions"
    a = _touch_nii(raw / "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_label-lesion_roi.nii.gz")
    b = _touch_nii(raw / "sub-01/ses-1/anat/sub-01_ses-1_acq-cor_label-lesion_roi.nii.gz")
    c = _touch_nii(extra / "sub-01/ses-2/anat/sub-01_ses-2_desc-lesion_mask.nii.gz")
    _touch_nii(raw / "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz")
    _touch_nii(raw / "sub-02/anat/sub-02_label-lesion_roi.nii.gz")
    masks = find_lesion_masks(raw, "01", extra_dir=extra)
    assert [m.path for m in masks] == [a, b, c]
    assert masks[0].uri == "bids:raw:sub-01/ses-1/anat/sub-01_ses-1_acq-ax_label-lesion_roi.nii.gz"
    assert masks[2].uri == c.resolve().as_uri()
    assert match_lesion_mask(masks, {"subject": "01", "session": "1", "acquisition": "cor", "run": "01"}).path == b
    assert match_lesion_mask(masks, {"subject": "01", "session": "1", "acquisition": "ax"}).path == a
    assert match_lesion_mask(masks, {"subject": "01", "session": "2", "acquisition": "ax"}).path == c
    assert match_lesion_mask(masks, {"subject": "01", "session": "3"}) is None
    assert match_lesion_mask([], {"subject": "01"}) is None


def test_resample_mask_keeps_world_position_and_volume():
    """A 4 mm-slice mask stored LPS, put on a 1 mm RAS grid: same world centroid, same volume."""
    ras_1mm = axis_affine((1, 1, 1), "RAS", origin=(-20, -20, -20))
    grid = np.indices((40, 40, 40)).reshape(3, -1).T
    world = nib.affines.apply_affine(ras_1mm, grid)
    ball = (np.linalg.norm(world - [5.0, -3.0, 4.5], axis=1) < 8).reshape(40, 40, 40)
    # the same ball on a 1x1x4 mm grid stored L-P-S
    thick = axis_affine((1, 1, 4), "LPS", origin=(19, 19, -20))
    thick_grid = np.indices((40, 40, 10)).reshape(3, -1).T
    thick_world = nib.affines.apply_affine(thick, thick_grid)
    thick_ball = (np.linalg.norm(thick_world - [5.0, -3.0, 4.5], axis=1) < 8).reshape(40, 40, 10)
    on_grid = resample_mask(thick_ball, thick, (40, 40, 40), ras_1mm)
    assert on_grid.dtype == np.uint8 and set(np.unique(on_grid)) == {0, 1}
    centroid = nib.affines.apply_affine(ras_1mm, np.argwhere(on_grid).mean(axis=0))
    np.testing.assert_allclose(centroid, [5.0, -3.0, 4.5], atol=1.0)
    assert on_grid.sum() == pytest.approx(ball.sum(), rel=0.15)
    assert (on_grid & ball).sum() / ball.sum() > 0.8


# ---------------------------------------------------------------------------- segmentation
def _segmenter(labels=BAND_LABELS, **kwargs) -> Segmenter:
    net = band_segmenter(labels=labels, **kwargs)
    return segmenter_from_network(net, {"labels": json.dumps(list(labels))}, name="band", sha256="0" * 64)


def _banded_volume(shape=(32, 40, 24)) -> np.ndarray:
    """Intensity bands along RAS x: background | CSF-like | cortex-like | WM-like (max 100)."""
    volume = np.zeros(shape)
    volume[8:14] = 30.0
    volume[14:20] = 60.0
    volume[20:28] = 100.0
    return volume


def test_segment_labels_intensity_bands_in_any_storage_order():
    seg = _segmenter()
    volume = _banded_volume()
    expected = np.zeros(volume.shape, dtype=np.int16)
    expected[8:14], expected[14:20], expected[20:28] = 24, 3, 2
    ras = axis_affine((1, 1, 1), "RAS")
    result = segment(volume, ras, seg)
    np.testing.assert_array_equal(result.labels, expected)
    assert result.flipped  # every lateral label has its partner
    # the same image stored L-I-A: labels follow the voxels
    img = nib.Nifti1Image(volume, ras).as_reoriented(
        nib.orientations.ornt_transform(nib.io_orientation(ras), nib.orientations.axcodes2ornt("LIA")))
    stored = segment(np.asanyarray(img.dataobj), img.affine, seg)
    back = nib.Nifti1Image(stored.labels, img.affine).as_reoriented(
        nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("RAS")))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), expected)


def test_segment_without_flip_and_on_a_2mm_grid():
    seg = _segmenter()
    volume = _banded_volume((32, 40, 24))[::2, ::2, ::2]
    affine = axis_affine((2, 2, 2), "RAS")
    result = segment(volume, affine, seg, flip=False)
    assert result.labels.shape == volume.shape and not result.flipped
    assert set(np.unique(result.labels)) <= {0, 24, 3, 2}
    assert (result.labels[11:13] == 2).all() and (result.labels[:3] == 0).all()


def test_segment_with_input_scale():
    net = band_segmenter()
    seg = segmenter_from_network(net, {"labels": json.dumps(list(BAND_LABELS)), "input_scale": str(1 / 128)},
                                 name="band", sha256="0" * 64)
    volume = _banded_volume() * 1.28 * 0.5  # max 64 -> 0.5 after scaling: no white-matter band
    labels = segment(volume, np.eye(4), seg).labels
    assert 2 not in np.unique(labels) and seg.input_scale == pytest.approx(1 / 128)


def test_segmentation_model_contract(tmp_path):
    labels = json.dumps(list(BAND_LABELS))
    net = band_segmenter()
    with pytest.raises(SegmentationModelError, match="not a segmentation network"):
        segmenter_from_network(identity_unet(), {"labels": "[0]"}, name="x", sha256="")
    with pytest.raises(SegmentationModelError, match="no 'labels' metadata"):
        segmenter_from_network(net, {}, name="x", sha256="")
    with pytest.raises(SegmentationModelError, match="lists 3 labels but the network has 6"):
        segmenter_from_network(net, {"labels": "[0, 2, 41]"}, name="x", sha256="")
    with pytest.raises(SegmentationModelError, match="JSON list of integers"):
        segmenter_from_network(net, {"labels": '["a"]'}, name="x", sha256="")
    legacy = segmenter_from_network(net, {"synthsr_bids.segmentation_labels": labels}, name="x", sha256="")
    assert legacy.table.ids == BAND_LABELS
    named = segmenter_from_network(net, {"labels": labels, "label_names": json.dumps({"24": "Fluid"})},
                                   name="x", sha256="")
    assert named.table.name(24) == "Fluid" and named.table.name(2) == "Left-Cerebral-White-Matter"
    # from files, through the model registry's path resolution
    path = write_segmenter(tmp_path / "seg.safetensors")
    loaded = resolve_segmenter(str(path))
    assert loaded is not None and loaded.table.ids == BAND_LABELS and len(loaded.sha256) == 64
    with pytest.raises(SegmentationModelError):
        resolve_segmenter(str(write_model(identity_unet(), tmp_path / "regression.safetensors")))
    with pytest.raises(SegmentationModelError):
        resolve_segmenter(str(tmp_path / "missing.safetensors"))


def test_default_segmentation_model_is_the_bundled_one_and_skipped_when_unregistered(monkeypatch, tmp_path):
    from synthsr_bids.models import registry

    monkeypatch.setenv("SYNTHSR_BIDS_MODELS", str(tmp_path / "models"))
    bundled = resolve_segmenter(None)
    assert bundled is not None and bundled.name == "synthsr-bids-seg"
    without = {k: v for k, v in registry.get_registry().items() if k != "synthsr-bids-seg"}
    monkeypatch.setattr(registry, "get_registry", lambda: without)
    assert resolve_segmenter(None) is None


# ---------------------------------------------------------------------------- names
def test_derived_names_and_discovery(tmp_path):
    anat = tmp_path / "sub-01/ses-1/anat"
    anat.mkdir(parents=True)
    names = [
        "sub-01_ses-1_acq-ax_run-02_desc-synthsrFLAIR_T1w",
        "sub-01_ses-1_res-1_desc-synthsrT2w_T1w",
        "sub-01_ses-1_res-native_desc-synthsrT2w_T1w",
        "sub-01_ses-1_acq-ax_space-MNI152NLin2009cAsym_desc-synthsrFLAIR_T1w",
    ]
    for name in names:
        (anat / f"{name}.nii.gz").write_bytes(b"")
        (anat / f"{name}.json").write_text("{}")
    (anat / "sub-01_ses-1_desc-synthsrPDw_T1w.nii.gz").write_bytes(b"")  # no sidecar: unfinished
    images = find_synthetic_images(tmp_path)
    assert [i.name for i in images] == [f"{names[0]}.nii.gz", f"{names[1]}.nii.gz"]
    flair, t2 = images
    assert flair.entities == {"subject": "01", "session": "1", "acquisition": "ax", "run": "02"}
    assert flair.contrast == "FLAIR" and flair.desc == "synthsrFLAIR" and t2.res == "1"
    assert flair.dseg.name == "sub-01_ses-1_acq-ax_run-02_desc-synthsegFLAIR_dseg.nii.gz"
    assert flair.volumes_tsv.name == "sub-01_ses-1_acq-ax_run-02_desc-synthsegFLAIR_volumes.tsv"
    assert flair.lesion_mask.name == "sub-01_ses-1_acq-ax_run-02_label-lesion_desc-synthsrFLAIR_mask.nii.gz"
    assert flair.xfm("MNI152NLin2009cAsym").name == (
        "sub-01_ses-1_acq-ax_run-02_desc-synthsrFLAIR_from-T1w_to-MNI152NLin2009cAsym_mode-image_xfm.h5")
    assert flair.in_template("X", 2).name == "sub-01_ses-1_acq-ax_run-02_space-X_res-2_desc-synthsrFLAIR_T1w.nii.gz"
    assert flair.lesion_in_template("X", 1).name == (
        "sub-01_ses-1_acq-ax_run-02_space-X_res-1_label-lesion_desc-synthsrFLAIR_mask.nii.gz")
    # the template's resolution, not the synthetic image's own res-1
    assert t2.in_template("X", 2).name == "sub-01_ses-1_space-X_res-2_desc-synthsrT2w_T1w.nii.gz"
    assert t2.xfm("X").name == "sub-01_ses-1_res-1_desc-synthsrT2w_from-T1w_to-X_mode-image_xfm.h5"
    assert t2.dseg.name == "sub-01_ses-1_res-1_desc-synthsegT2w_dseg.nii.gz"
    assert flair.figure("mosaic") == tmp_path / "sub-01/figures" / f"{names[0]}_mosaic.png"
    assert parse_synthetic(tmp_path, anat / "sub-01_ses-1_desc-synthsegFLAIR_dseg.nii.gz") is None


def test_only_the_newest_output_of_a_scan_is_found(tmp_path, caplog):
    """A rerun with --native-grid adds res-1 names next to the earlier outputs of the same scans."""
    anat = tmp_path / "sub-01/anat"
    anat.mkdir(parents=True)

    def output(name: str, source: str, mtime_ns: int) -> None:
        (anat / f"{name}.nii.gz").write_bytes(b"")
        sidecar = anat / f"{name}.json"
        sidecar.write_text(json.dumps({"Sources": [f"bids:raw:sub-01/anat/{source}"]}))
        os.utime(sidecar, ns=(mtime_ns, mtime_ns))

    output("sub-01_desc-synthsrFLAIR_T1w", "sub-01_FLAIR.nii.gz", 1_000)
    output("sub-01_res-1_desc-synthsrFLAIR_T1w", "sub-01_FLAIR.nii.gz", 2_000)  # the rerun: newer
    output("sub-01_res-1_desc-synthsrT2w_T1w", "sub-01_T2w.nii.gz", 500)  # another scan, older: kept
    output("sub-01_desc-synthsrT2w_T1w", "sub-01_T2w.nii.gz", 3_000)  # ... unless a newer one of it exists
    with caplog.at_level(logging.WARNING, logger="synthsr_bids"):
        images = find_synthetic_images(tmp_path)
    assert [i.name for i in images] == ["sub-01_desc-synthsrT2w_T1w.nii.gz", "sub-01_res-1_desc-synthsrFLAIR_T1w.nii.gz"]
    assert "sub-01/anat/sub-01_FLAIR.nii.gz has 2 synthetic T1w images" in caplog.text
    assert "ignoring sub-01_desc-synthsrFLAIR_T1w.nii.gz" in caplog.text


def test_lesion_mask_match_ignores_other_subjects():
    masks = [LesionMask(Path("a"), "u", {"subject": "02"})]
    assert match_lesion_mask(masks, {"subject": "01"}) is None


def test_participant_steps_are_skipped_until_an_input_changes(tmp_path):
    from synthsr_bids.derivatives.sidecars import file_sha256
    from synthsr_bids.morphometry.participant import write_lesion_mask, write_segmentation

    anat = tmp_path / "sub-01/anat"
    anat.mkdir(parents=True)
    synthetic = anat / "sub-01_desc-synthsrFLAIR_T1w.nii.gz"
    affine = axis_affine((1, 1, 1), "LAS")
    nib.save(nib.Nifti1Image(_banded_volume().astype(np.float32), affine), str(synthetic))
    (anat / "sub-01_desc-synthsrFLAIR_T1w.json").write_text("{}")
    image = find_synthetic_images(tmp_path)[0]
    seg = _segmenter()
    sha = file_sha256(synthetic)
    path, written = write_segmentation(image, seg, synthetic_sha256=sha)
    assert written and path == image.dseg
    table = read_dseg_tsv(image.dseg_tsv)
    assert table.ids == tuple(sorted(BAND_LABELS))
    volumes = {v.name: v.volume_mm3 for v in read_volumes_tsv(image.volumes_tsv)}
    labels = np.asanyarray(nib.load(str(image.dseg)).dataobj)
    assert volumes["CSF"] == float((labels == 24).sum()) == 6 * 40 * 24
    assert json.loads(image.dseg_json.read_text())["SynthSR"]["Provenance"]["SourceSHA256"] == sha
    assert write_segmentation(image, seg, synthetic_sha256=sha)[1] is False
    assert write_segmentation(image, seg, synthetic_sha256="changed")[1] is True
    assert write_segmentation(image, seg, synthetic_sha256="changed", overwrite=True)[1] is True
    # lesion mask: a 2 mm mask resampled onto the 1 mm synthetic grid
    mask_data = np.zeros((16, 20, 12), np.uint8)
    mask_data[10:12, 8:10, 5:7] = 1
    mask_path = tmp_path / "sub-01_label-lesion_roi.nii.gz"
    nib.save(nib.Nifti1Image(mask_data, axis_affine((2, 2, 2), "LAS")), str(mask_path))
    mask = LesionMask(mask_path, "bids:raw:sub-01/anat/sub-01_label-lesion_roi.nii.gz", {"subject": "01"})
    path, written = write_lesion_mask(image, mask, synthetic_sha256=sha)
    on_grid = np.asanyarray(nib.load(str(path)).dataobj)
    sidecar = json.loads(image.lesion_json.read_text())
    assert written and sidecar["SynthSR"]["SourceLesionVolumeMM3"] == 64.0
    assert sidecar["SynthSR"]["LesionVolumeMM3"] == float(on_grid.sum()) == pytest.approx(64, rel=0.3)
    assert sidecar["Sources"] == [mask.uri] and sidecar["SpatialReference"] == f"bids::{image.relpath}"
    assert write_lesion_mask(image, mask, synthetic_sha256=sha)[1] is False
