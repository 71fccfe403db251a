"""End to end: participant then group level through the real CLI on a tiny dataset of four
participants (one with a lesion mask, one whose only scan is broken), with a tiny template in
a temporary TEMPLATEFLOW_HOME, real ANTsPy registrations and the real BIDS validator.
Every output is re-read and checked."""

from __future__ import annotations

import json
import logging
import math
import shutil

import nibabel as nib
import numpy as np
import pytest

from bids_builder import add_scan, scan, write_dataset_description
from downstream_builder import phantom_lesion_mask, write_segmenter, write_templateflow_template
from models_builder import identity_unet, random_unet, write_model
from synthsr_bids.cli.run import main
from synthsr_bids.group.tables import as_float, read_table
from synthsr_bids.morphometry.labels import read_dseg_tsv
from synthsr_bids.validation import validate_dataset
from test_reports import parse_report

TEMPLATE = "MNI152NLin2009cAsym"
IMAGES = {
    "01": "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_desc-synthsrFLAIR_T1w.nii.gz",
    "02": "sub-02/anat/sub-02_run-01_desc-synthsrT2w_T1w.nii.gz",
    "03": "sub-03/anat/sub-03_desc-synthsrT1w_T1w.nii.gz",
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    bids = root / "ds"
    write_dataset_description(bids)
    add_scan(bids, "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz", scan("FLAIR", zooms=(1, 1, 4), seed=1))
    add_scan(bids, "sub-02/anat/sub-02_run-01_T2w.nii.gz", scan("T2w", zooms=(1, 3, 1), axcodes="LAS", seed=2))
    add_scan(bids, "sub-03/anat/sub-03_T1w.nii.gz", scan("T1w", zooms=(2, 2, 2), axcodes="PSR", seed=3))
    blank = nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4))
    add_scan(bids, "sub-04/anat/sub-04_T1w.nii.gz", blank)  # valid BIDS, but constant: synthesis fails
    nib.save(phantom_lesion_mask((1, 1, 4)), str(bids / "sub-01/ses-1/anat/sub-01_ses-1_label-lesion_roi.nii.gz"))
    (bids / ".bidsignore").write_text("*_roi.nii.gz\n")  # BIDS has no raw lesion-mask file yet
    lesions = root / "lesions"  # a derivatives-style folder given with --lesion-masks
    (lesions / "sub-03/anat").mkdir(parents=True)
    nib.save(phantom_lesion_mask((2, 2, 2)), str(lesions / "sub-03/anat/sub-03_desc-lesion_mask.nii.gz"))
    home = root / "templateflow"
    write_templateflow_template(home, TEMPLATE)
    out = root / "derivatives" / "synthsr"
    common = ["--nthreads", "1", "-w", str(root / "work")]
    participant = main([str(bids), str(out), "participant", "--model",
                        str(write_model(identity_unet(), root / "identity.safetensors")), "--segmentation-model",
                        str(write_segmenter(root / "seg.safetensors")), "--lesion-masks", str(lesions), *common])
    mp = pytest.MonkeyPatch()
    mp.setenv("TEMPLATEFLOW_HOME", str(home))
    try:
        group = main([str(bids), str(out), "group", *common])
    finally:
        mp.undo()
    return {"root": root, "bids": bids, "out": out, "home": home, "participant": participant, "group": group,
            "common": common, "qc_tsv": (out / "group_desc-qc.tsv").read_bytes(),
            "volumes_tsv": (out / "group_desc-volumes.tsv").read_bytes()}


def _copy_study(study, tmp_path):
    """A copy of the study's derivatives, for tests that change them."""
    out = tmp_path / "out"
    shutil.copytree(study["out"], out)
    return out


def test_exit_codes(study):
    assert study["participant"] == 1  # sub-04's only scan is blank
    assert study["group"] == 0        # a partial set is fine


def test_qc_table_values(study):
    out = study["out"]
    rows = read_table(out / "group_desc-qc.tsv")
    assert [r["image"] for r in rows] == [IMAGES["01"], IMAGES["02"], IMAGES["03"]]
    assert [r["participant_id"] for r in rows] == ["sub-01", "sub-02", "sub-03"]
    assert [r["session_id"] for r in rows] == ["ses-1", "n/a", "n/a"]
    assert [r["source_contrast"] for r in rows] == ["FLAIR", "T2w", "T1w"]
    assert [r["source_voxel_size"] for r in rows] == ["1 1 4", "1 3 1", "2 2 2"]
    assert [as_float(r["source_anisotropy"]) for r in rows] == [4.0, 3.0, 1.0]
    for row in rows:
        sidecar = json.loads((out / row["image"].replace(".nii.gz", ".json")).read_text())["SynthSR"]
        assert as_float(row["runtime_s"]) == pytest.approx(sidecar["RuntimeSeconds"], rel=1e-5)
        assert row["model"] == "identity" and row["model_sha256"] == sidecar["Model"]["SHA256"][:12]
        data = nib.load(str(out / row["image"])).get_fdata()
        p99 = np.percentile(data[data > 0], 99)
        assert as_float(row["fg_fraction"]) == pytest.approx((data > 0.1 * p99).mean(), rel=1e-5)
        dseg = out / row["image"].replace("desc-synthsr", "desc-synthseg").replace("_T1w.nii.gz", "_dseg.nii.gz")
        labels = np.asanyarray(nib.load(str(dseg)).dataobj)
        assert as_float(row["segmented_volume_mm3"]) == float((labels > 0).sum())
        assert as_float(row["wm_median"]) == pytest.approx(np.median(data[np.isin(labels, (2, 41))]), rel=1e-5)
        xfm = json.loads((out / row["image"].replace("_T1w.nii.gz", f"_from-T1w_to-{TEMPLATE}_mode-image_xfm.json"))
                         .read_text())
        assert as_float(row["template_corr"]) == pytest.approx(xfm["TemplateCorrelation"], abs=1e-4)
    lesion = np.asanyarray(nib.load(str(out / IMAGES["01"].replace("_desc-synthsrFLAIR_T1w", "_label-lesion_desc-synthsrFLAIR_mask"))).dataobj)
    assert as_float(rows[0]["lesion_volume_mm3"]) == float(lesion.sum()) > 0
    lesion3 = np.asanyarray(nib.load(str(out / "sub-03/anat/sub-03_label-lesion_desc-synthsrT1w_mask.nii.gz")).dataobj)
    assert as_float(rows[2]["lesion_volume_mm3"]) == float(lesion3.sum()) > 0
    assert rows[1]["lesion_volume_mm3"] == "n/a"
    source = json.loads((out / "sub-03/anat/sub-03_label-lesion_desc-synthsrT1w_mask.json").read_text())
    assert source["Sources"] == [(study["root"] / "lesions/sub-03/anat/sub-03_desc-lesion_mask.nii.gz").as_uri()]
    assert source["Type"] == "Lesion"
    # the phantom lesion (a ball of 1 mm voxels) keeps its volume on the synthetic grids (+-25%)
    assert source["SynthSR"]["LesionVolumeMM3"] == pytest.approx(source["SynthSR"]["SourceLesionVolumeMM3"], rel=0.25)
    assert json.loads((out / "group_desc-qc.json").read_text())["cjv"]["Description"].startswith("Coefficient")


def test_volumes_table_matches_segmentations(study):
    out = study["out"]
    rows = read_table(out / "group_desc-volumes.tsv")
    assert [r["participant_id"] for r in rows] == ["sub-01", "sub-02", "sub-03"]
    columns = list(rows[0])
    assert "asym_Cerebral-Cortex" in columns and "asym_Cerebral-White-Matter" in columns
    for row in rows:
        dseg_path = out / row["segmentation"]
        labels = np.asanyarray(nib.load(str(dseg_path)).dataobj)
        table = read_dseg_tsv(dseg_path.with_name(dseg_path.name.replace(".nii.gz", ".tsv")))
        for label in table.foreground:
            assert as_float(row[table.name(label)]) == float((labels == label).sum())
        left, right = as_float(row["Left-Cerebral-Cortex"]), as_float(row["Right-Cerebral-Cortex"])
        expected = 2 * (left - right) / (left + right) if left + right else math.nan
        asym = as_float(row["asym_Cerebral-Cortex"])
        assert (math.isnan(asym) and math.isnan(expected)) or asym == pytest.approx(expected)
        assert set(np.unique(labels)) <= {0, 24, 3, 42, 2, 41}
    assert json.loads((out / "group_desc-volumes.json").read_text())["CSF"]["Units"] == "mm^3"


def test_transforms_and_template_space_images(study):
    import ants

    out = study["out"]
    template_t1w = study["home"] / f"tpl-{TEMPLATE}" / f"tpl-{TEMPLATE}_res-01_T1w.nii.gz"
    template = nib.load(str(template_t1w))
    for relpath in IMAGES.values():
        xfm = out / relpath.replace("_T1w.nii.gz", f"_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5")
        warped_path = out / relpath.replace("_desc-", f"_space-{TEMPLATE}_res-1_desc-")
        warped = nib.load(str(warped_path))
        assert warped.shape == template.shape and np.allclose(warped.affine, template.affine)
        again = ants.apply_transforms(fixed=ants.image_read(str(template_t1w)),
                                      moving=ants.image_read(str(out / relpath)), transformlist=[str(xfm)])
        np.testing.assert_allclose(again.numpy(), warped.get_fdata(), rtol=1e-4, atol=1e-2)
        sidecar = json.loads(warped_path.with_name(warped_path.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["SkullStripped"] is False and sidecar["Sources"][0] == f"bids::{relpath}"
        assert sidecar["Resolution"] == f"TemplateFlow resolution index 1 of {TEMPLATE} (tpl-{TEMPLATE}_res-01)"


def test_median_template_and_lesion_map(study):
    out = study["out"]
    median = nib.load(str(out / f"space-{TEMPLATE}_res-1_desc-median_T1w.nii.gz"))
    sidecar = json.loads((out / f"space-{TEMPLATE}_res-1_desc-median_T1w.json").read_text())
    assert sidecar["SynthSR"]["Participants"] == ["sub-01", "sub-02", "sub-03"] and sidecar["SynthSR"]["N"] == 3
    stack = [nib.load(str(out / s[len("bids::"):])).get_fdata() for s in sidecar["Sources"]]
    np.testing.assert_allclose(median.get_fdata(), np.median(stack, axis=0), rtol=1e-5, atol=1e-4)
    frequency = nib.load(str(out / f"space-{TEMPLATE}_res-1_desc-lesion_probseg.nii.gz")).get_fdata()
    lesion_sidecar = json.loads((out / f"space-{TEMPLATE}_res-1_desc-lesion_probseg.json").read_text())
    assert lesion_sidecar["SynthSR"]["Participants"] == ["sub-01", "sub-03"] and lesion_sidecar["SynthSR"]["N"] == 2
    warped = [nib.load(str(out / IMAGES[s].replace(f"_desc-synthsr{c}_T1w", f"_space-{TEMPLATE}_res-1_label-lesion_desc-synthsr{c}_mask")))
              .get_fdata() for s, c in (("01", "FLAIR"), ("03", "T1w"))]
    np.testing.assert_allclose(frequency, (warped[0] + warped[1]) / 2)  # fraction of the two participants
    assert set(np.unique(frequency)) == {0.0, 0.5, 1.0}  # the same phantom lesion overlaps in template space
    descriptions = (out / "descriptions.tsv").read_text()
    assert "desc-median\t" in descriptions and "desc-lesion\t" in descriptions and "desc-synthsegFLAIR\t" in descriptions


def test_group_report_lists_missing_and_shows_figures(study):
    out = study["out"]
    links = parse_report(out / "group.html")
    assert links.external == []
    assert len(links.images) == 6  # QC, volumes, asymmetry, registration, median, lesion map
    for target in links.images + links.links:
        assert (out / target.split("#")[0]).is_file(), target
    text = " ".join(links.text)
    assert "sub-04" in text and "sub-04/anat/sub-04_T1w.nii.gz" in text
    assert {"sub-01.html", "sub-02.html", "sub-03.html"} <= set(links.links)


def test_derivatives_pass_the_validator(study):
    report = validate_dataset(study["out"])
    assert report.errors == (), report.summary()


def test_group_rerun_reuses_registrations(study, monkeypatch, caplog):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(study["home"]))
    out = study["out"]
    xfm = out / IMAGES["02"].replace("_T1w.nii.gz", f"_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5")
    stamp = xfm.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        assert main([str(study["bids"]), str(out), "group", *study["common"]]) == 0
    assert xfm.stat().st_mtime_ns == stamp
    assert caplog.text.count("registration up to date, skipped") == 3
    assert "participants without any synthetic image (failed or not run): sub-04" in caplog.text
    assert "although the participant runs selected scans as this run does" in caplog.text
    assert "rewrote" not in caplog.text and "removed" not in caplog.text
    # the correlation read back from the transforms' sidecars is the one computed: identical tables
    assert (out / "group_desc-qc.tsv").read_bytes() == study["qc_tsv"]
    assert (out / "group_desc-volumes.tsv").read_bytes() == study["volumes_tsv"]


def test_group_without_template_offline_explains(study, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "empty-templateflow"))
    (tmp_path / "empty-templateflow").mkdir()
    out = tmp_path / "out"
    shutil.copytree(study["out"], out)
    with caplog.at_level(logging.ERROR, logger="synthsr_bids"):
        code = main([str(study["bids"]), str(out), "group", "--template", "MNI152NLin6Asym", *study["common"]])
    assert code == 66
    assert "TemplateFlow template MNI152NLin6Asym (res-01 T1w) is not available" in caplog.text
    assert "api.get('MNI152NLin6Asym'" in caplog.text and "--skip-registration" in caplog.text
    # without registration the tables and report are still written
    assert main([str(study["bids"]), str(out), "group", "--skip-registration", *study["common"]]) == 0
    rows = read_table(out / "group_desc-qc.tsv")
    assert len(rows) == 3 and all(r["template_corr"] == "n/a" for r in rows)


def test_stale_segmentation_and_lesion_mask_are_ignored(study, tmp_path, monkeypatch, caplog):
    """sub-03's synthetic image is replaced (another model) without segmenting it again and without its
    lesion mask: the old dseg, volumes and lesion mask describe the old image and must not be used."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(study["home"]))
    out = _copy_study(study, tmp_path)
    other = write_model(random_unet(), tmp_path / "other.safetensors")
    assert main([str(study["bids"]), str(out), "participant", "--participant-label", "03", "--overwrite",
                 "--skip-segmentation", "--model", str(other), "--skip-reports", *study["common"]]) == 0
    dseg = out / "sub-03/anat/sub-03_desc-synthsegT1w_dseg.nii.gz"
    mask = out / "sub-03/anat/sub-03_label-lesion_desc-synthsrT1w_mask.nii.gz"
    assert dseg.is_file() and mask.is_file()  # left by the first run
    with caplog.at_level(logging.WARNING, logger="synthsr_bids"):
        assert main([str(study["bids"]), str(out), "group", *study["common"]]) == 0
    assert ("sub-03/anat/sub-03_desc-synthsegT1w_dseg.nii.gz was made from an earlier version of "
            "sub-03_desc-synthsrT1w_T1w.nii.gz") in caplog.text
    assert "rerun the participant level for sub-03 without --skip-segmentation" in caplog.text
    assert "sub-03/anat/sub-03_label-lesion_desc-synthsrT1w_mask.nii.gz was made from an earlier version" in caplog.text
    rows = {r["participant_id"]: r for r in read_table(out / "group_desc-qc.tsv")}
    assert rows["sub-03"]["model"] == "other"
    for column in ("segmented_volume_mm3", "wm_median", "cjv", "lesion_volume_mm3"):
        assert rows["sub-03"][column] == "n/a", column
    assert rows["sub-03"]["stale_outputs"] == "segmentation,lesion_mask"
    assert rows["sub-01"]["stale_outputs"] == rows["sub-02"]["stale_outputs"] == "n/a"
    assert "<th>stale_outputs</th>" in (out / "group.html").read_text()
    assert "<td>segmentation, lesion_mask</td>" in (out / "group.html").read_text()
    assert as_float(rows["sub-01"]["segmented_volume_mm3"]) > 0
    assert [r["participant_id"] for r in read_table(out / "group_desc-volumes.tsv")] == ["sub-01", "sub-02"]
    # the old mask is not moved to the template nor counted in the lesion map
    lesion_map = json.loads((out / f"space-{TEMPLATE}_res-1_desc-lesion_probseg.json").read_text())["SynthSR"]
    assert lesion_map["Participants"] == ["sub-01"] and lesion_map["N"] == 1
    xfm = json.loads((out / IMAGES["03"].replace("_T1w.nii.gz", f"_from-T1w_to-{TEMPLATE}_mode-image_xfm.json"))
                     .read_text())
    assert xfm["Provenance"]["LesionSHA256"] is None


def test_group_outputs_describe_only_this_run(study, tmp_path, monkeypatch, caplog):
    from synthsr_bids.group.run import REPORT, group_outputs_on_disk
    from synthsr_bids.reports.group import REPORT_NAME

    assert REPORT == REPORT_NAME
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(study["home"]))
    out = _copy_study(study, tmp_path)
    lesion_map = out / f"space-{TEMPLATE}_res-1_desc-lesion_probseg.nii.gz"
    lesion_figure = out / f"figures/group_space-{TEMPLATE}_desc-lesion_plot.png"
    assert lesion_map.is_file() and lesion_figure.is_file()
    # (a) one participant, without a lesion mask: every group output is about sub-02 alone
    with caplog.at_level(logging.WARNING, logger="synthsr_bids"):
        assert main([str(study["bids"]), str(out), "group", "--participant-label", "02", *study["common"]]) == 0
    assert "group level run on a selection (--participant-label 02)" in caplog.text
    assert f"removed space-{TEMPLATE}_res-1_desc-lesion_probseg.nii.gz" in caplog.text
    assert [r["participant_id"] for r in read_table(out / "group_desc-qc.tsv")] == ["sub-02"]
    assert [r["participant_id"] for r in read_table(out / "group_desc-volumes.tsv")] == ["sub-02"]
    median = json.loads((out / f"space-{TEMPLATE}_res-1_desc-median_T1w.json").read_text())
    assert median["SynthSR"]["Participants"] == ["sub-02"]
    assert not lesion_map.exists() and not lesion_map.with_name(lesion_map.name.replace(".nii.gz", ".json")).exists()
    assert not lesion_figure.exists()
    assert "No lesion masks" in (out / "group.html").read_text()
    # (b) no valid segmentation, no registration, no report: only the QC table remains
    for path in (out / "sub-02/anat").glob("*desc-synthseg*"):
        path.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synthsr_bids"):
        assert main([str(study["bids"]), str(out), "group", "--participant-label", "02", "--skip-registration",
                     "--skip-reports", *study["common"]]) == 0
    assert "removed group_desc-volumes.tsv" in caplog.text and "removed group.html" in caplog.text
    assert group_outputs_on_disk(out) == [out / "group_desc-qc.json", out / "group_desc-qc.tsv"]
    assert (out / IMAGES["02"].replace("_desc-", f"_space-{TEMPLATE}_res-1_desc-")).is_file()  # per-image: kept


def test_group_rerun_rewrites_outdated_template_sidecars(study, tmp_path, monkeypatch, caplog):
    """A template-space sidecar written by an older version (no Resolution, which BIDS requires with
    res-<N>) is rewritten although the registration itself is up to date."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(study["home"]))
    out = _copy_study(study, tmp_path)
    sidecar = out / IMAGES["02"].replace("_desc-", f"_space-{TEMPLATE}_res-1_desc-").replace(".nii.gz", ".json")
    old = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({k: v for k, v in old.items() if k != "Resolution"}))
    xfm = out / IMAGES["02"].replace("_T1w.nii.gz", f"_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5")
    stamp = xfm.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        assert main([str(study["bids"]), str(out), "group", *study["common"]]) == 0
    assert json.loads(sidecar.read_text()) == old
    assert xfm.stat().st_mtime_ns == stamp
    assert f"registration up to date, skipped; rewrote {sidecar.name}" in caplog.text
    assert caplog.text.count("rewrote") == 1
    report = validate_dataset(out)
    assert report.errors == (), report.summary()


def test_missing_scans_warning_explains_the_selection(tmp_path, study, caplog):
    """After participant --contrasts FLAIR, a plain group run lists the T2w as missing and says why."""
    bids = tmp_path / "ds"
    write_dataset_description(bids)
    add_scan(bids, "sub-01/anat/sub-01_FLAIR.nii.gz", scan("FLAIR", zooms=(1, 1, 3), seed=1))
    add_scan(bids, "sub-01/anat/sub-01_T2w.nii.gz", scan("T2w", zooms=(1, 1, 3), seed=2))
    out = tmp_path / "out"
    model = write_model(identity_unet(), tmp_path / "identity.safetensors")
    assert main([str(bids), str(out), "participant", "--model", str(model), "--contrasts", "FLAIR",
                 "--skip-segmentation", "--skip-reports", *study["common"]]) == 0
    group = [str(bids), str(out), "group", "--skip-registration", "--skip-reports", *study["common"]]
    with caplog.at_level(logging.WARNING, logger="synthsr_bids"):
        assert main(group) == 0
    assert "no synthetic image for raw scan sub-01/anat/sub-01_T2w.nii.gz" in caplog.text
    assert ("The group level selects raw scans with its own --contrasts/--bids-filter-file/--session-label "
            "(this run: default --contrasts)") in caplog.text
    assert "Participant runs of this folder used: --contrasts FLAIR (logs/config-*.json)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synthsr_bids"):
        assert main([*group, "--contrasts", "FLAIR"]) == 0
    assert "raw scan" not in caplog.text


def test_group_needs_participant_outputs(tmp_path, study):
    assert main([str(study["bids"]), str(tmp_path / "nothing"), "group", *study["common"]]) == 66


def test_unusable_segmentation_model_is_a_usage_error(tmp_path, study, caplog):
    bids = tmp_path / "ds"
    write_dataset_description(bids)
    add_scan(bids, "sub-01/anat/sub-01_T2w.nii.gz", scan("T2w", zooms=(1, 1, 2)))
    regression = write_model(random_unet(), tmp_path / "regression.safetensors")
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="synthsr_bids"):
        code = main([str(bids), str(out), "participant", "--model", str(regression), "--segmentation-model",
                     str(regression), "--skip-bids-validation", *study["common"]])
    assert code == 64
    assert "is not a segmentation network" in caplog.text
    assert (out / "sub-01/anat/sub-01_desc-synthsrT2w_T1w.nii.gz").is_file()  # synthesis is kept
    assert "is not a segmentation network" in (out / "sub-01.html").read_text()


def test_downstream_options(tmp_path):
    from synthsr_bids.cli.parser import parse_args
    from synthsr_bids.config import DEFAULT_TEMPLATE

    bids = tmp_path / "ds"
    bids.mkdir()
    defaults = parse_args([str(bids), str(tmp_path / "out"), "group"]).downstream
    assert (defaults.template, defaults.template_resolution, defaults.registration_type) == (DEFAULT_TEMPLATE, 1, "SyN")
    assert defaults.reports and defaults.segmentation and defaults.registration
    assert defaults.segmentation_model is None and defaults.lesion_masks is None
    (tmp_path / "lesions").mkdir()
    config = parse_args([str(bids), str(tmp_path / "out"), "group", "--template", "tpl-MNI152NLin6Asym",
                         "--template-resolution", "2", "--registration", "Affine", "--skip-registration",
                         "--skip-reports", "--skip-segmentation", "--segmentation-model", "seg.safetensors",
                         "--lesion-masks", str(tmp_path / "lesions")])
    d = config.downstream
    assert (d.template, d.template_resolution, d.registration_type) == ("MNI152NLin6Asym", 2, "Affine")
    assert not (d.registration or d.reports or d.segmentation)
    assert d.segmentation_model == "seg.safetensors" and d.lesion_masks == (tmp_path / "lesions").resolve()
    assert json.loads(config.dumps())["downstream"]["lesion_masks"] == str((tmp_path / "lesions").resolve())


@pytest.mark.parametrize("args", [["--lesion-masks", "/does/not/exist"], ["--template", "MNI 152"],
                                  ["--template-resolution", "0"], ["--registration", "BSplineSyN"]])
def test_bad_downstream_options_exit_64(tmp_path, args):
    from synthsr_bids.cli.parser import parse_args

    (tmp_path / "ds").mkdir()
    with pytest.raises(SystemExit) as info:
        parse_args([str(tmp_path / "ds"), str(tmp_path / "out"), "group", *args])
    assert info.value.code == 64
