"""Group-level building blocks: QC numbers, outliers, tables, population maps, TemplateFlow
templates and a real (small) ANTsPy registration."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest

from downstream_builder import template_image, write_templateflow_template
from synthsr_bids.group.atlas import lesion_frequency, median_image
from synthsr_bids.group.qc import image_metrics, outlier_flags, robust_z
from synthsr_bids.group.tables import as_float, read_table, tsv_text, write_table
from synthsr_bids.group.templates import TemplateNotAvailableError, get_template
from synthsr_bids.errors import ExitCode
from synthsr_bids.preprocessing.resample import resample_to_grid


# ---------------------------------------------------------------------------- QC numbers
def test_image_metrics_on_a_known_image():
    image = np.zeros((10, 10, 10))
    image[:5] = 100.0            # 500 head voxels at 100
    image[0, 0, :] = 128.0       # 10 of them saturated
    dseg = np.zeros(image.shape, dtype=np.int16)
    dseg[1:3] = 2                # white matter: value 100 (+ none saturated)
    dseg[3:5] = 3                # grey matter: value 100 too -> CJV undefined
    metrics = image_metrics(image, dseg, voxel_mm3=2.0)
    assert metrics["fg_fraction"] == pytest.approx(0.5)
    assert metrics["saturated_fraction"] == pytest.approx(10 / 500)
    assert metrics["wm_median"] == 100.0 and math.isnan(metrics["cjv"])
    assert metrics["segmented_volume_mm3"] == 400 * 2.0
    # grey matter darker and noisy: CJV = (sd_wm + sd_gm) / |mean_wm - mean_gm|
    image[3:5] = np.where(np.arange(10)[None, :, None] % 2 == 0, 50.0, 70.0)
    metrics = image_metrics(image, dseg)
    assert metrics["cjv"] == pytest.approx((0.0 + 10.0) / 40.0)
    assert math.isnan(image_metrics(image)["wm_median"])


def test_outlier_flags_need_a_group_and_use_robust_z():
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 5.0]
    z = robust_z(values)
    assert z[-1] > 3.5 and np.all(np.abs(z[:-1]) < 3.5)
    assert np.isnan(robust_z([1.0, 2.0, 50.0])).all()  # fewer than 5 values: no z
    # a very homogeneous group: the scale is at least 2% of the median, not the (zero) MAD
    homogeneous = robust_z([1.0, 1.0, 1.0, 1.0, 1.01, 1.2])
    assert homogeneous[4] == pytest.approx(0.5) and homogeneous[5] == pytest.approx(10.0)
    assert np.isnan(robust_z([0.0] * 6)).all()
    rows = [{"intensity_p99": v, "template_corr": 0.9} for v in values]
    rows[0]["template_corr"] = 0.3
    flags = outlier_flags(rows)
    assert flags[-1] == ["intensity_p99+"]
    assert flags[0] == ["template_corr-"]  # an outlier, and below 0.5: flagged once
    assert flags[1:5] == [[], [], [], []]
    low = outlier_flags([{"template_corr": 0.4 + 0.01 * i} for i in range(6)])
    assert low == [["template_corr<0.5"]] * 6  # not outliers, but all below the rule


def test_tables_write_na_and_dictionary(tmp_path):
    path = write_table(tmp_path / "group_desc-qc.tsv", ["a", "b", "c", "d"],
                       [{"a": "sub-01", "b": float("nan"), "c": 0.123456789, "d": ["x+", "y-"]},
                        {"a": "sub-02", "b": None, "c": 3, "d": []}],
                       {"a": {"Description": "A"}, "c": {"Description": "C", "Units": "mm"}})
    assert path.read_text().splitlines() == ["a\tb\tc\td", "sub-01\tn/a\t0.123457\tx+,y-", "sub-02\tn/a\t3\tn/a"]
    assert json.loads(path.with_suffix(".json").read_text()) == {"a": {"Description": "A"},
                                                                  "c": {"Description": "C", "Units": "mm"}}
    rows = read_table(path)
    assert math.isnan(as_float(rows[1]["b"])) and as_float(rows[0]["c"]) == pytest.approx(0.123457)
    assert tsv_text(["x"], [{}]) == "x\nn/a\n"


# ---------------------------------------------------------------------------- population maps
def test_median_image_is_voxelwise_median(tmp_path):
    rng = np.random.default_rng(0)
    stack = rng.normal(size=(5, 6, 7, 8)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = []
    for index, data in enumerate(stack):
        path = tmp_path / f"img{index}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        paths.append(path)
    median, out_affine = median_image(paths, work_dir=tmp_path / "work")
    np.testing.assert_allclose(median, np.median(stack, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(out_affine, affine)
    assert not list((tmp_path / "work").glob("*.npy"))  # the memory map is removed
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(stack[0], np.diag([2.0, 1, 1, 1])), str(other))
    with pytest.raises(ValueError, match="not on the grid"):
        median_image([paths[0], other], work_dir=tmp_path / "work")


def test_lesion_frequency_is_fraction_of_participants(tmp_path):
    def mask(name, voxels):
        data = np.zeros((4, 4, 4), np.uint8)
        for v in voxels:
            data[v] = 1
        path = tmp_path / name
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
        return path

    masks = {
        "01": [mask("a1.nii.gz", [(0, 0, 0), (1, 1, 1)]), mask("a2.nii.gz", [(0, 0, 0)])],  # union counts once
        "02": [mask("b.nii.gz", [(0, 0, 0), (2, 2, 2)])],
        "03": [],  # no mask: not in the denominator
    }
    frequency, affine, n = lesion_frequency(masks)
    assert n == 2 and frequency.dtype == np.float32
    assert frequency[0, 0, 0] == 1.0 and frequency[1, 1, 1] == 0.5 and frequency[2, 2, 2] == 0.5
    assert frequency.sum() == 2.0


# ---------------------------------------------------------------------------- TemplateFlow
def test_template_from_templateflow_home(tmp_path, monkeypatch):
    home = tmp_path / "templateflow"
    write_templateflow_template(home, "Tiny")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    template = get_template("Tiny", 1)
    assert template.t1w == home / "tpl-Tiny" / "tpl-Tiny_res-01_T1w.nii.gz"
    assert template.brain_mask == home / "tpl-Tiny" / "tpl-Tiny_res-01_desc-brain_mask.nii.gz"
    with pytest.raises(TemplateNotAvailableError) as info:
        get_template("MNI152NLin2009cAsym", 1)
    message = str(info.value)
    assert "has no tpl-MNI152NLin2009cAsym folder" in message and "Tiny" in message
    assert "api.get('MNI152NLin2009cAsym', resolution=1" in message and str(home) in message
    assert info.value.exit_code == ExitCode.NO_INPUT
    with pytest.raises(TemplateNotAvailableError, match="has no res-02 T1w image"):
        get_template("Tiny", 2)


def test_undownloaded_template_offline_says_how_to_prefetch(tmp_path, monkeypatch):
    """A TemplateFlow placeholder (0-byte file) and no network: TemplateFlow's own client really tries the
    download (through a proxy on a closed loopback port, so it fails at once, as offline); the error
    gives the command that pre-fetches it."""
    import socket

    home = tmp_path / "templateflow"
    folder = write_templateflow_template(home, "Tiny")
    (folder / "tpl-Tiny_res-01_T1w.nii.gz").write_bytes(b"")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(home))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(variable, closed)
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(TemplateNotAvailableError) as info:
        get_template("Tiny", 1)
    message = str(info.value)
    assert "tpl-Tiny_res-01_T1w.nii.gz is not downloaded and could not be fetched (no network?)" in message
    assert "ProxyError" in message or "Connection refused" in message or "Max retries" in message
    assert "TEMPLATEFLOW_HOME=/path/to/templateflow python -c" in message
    assert (folder / "tpl-Tiny_res-01_T1w.nii.gz").stat().st_size == 0  # nothing half-written


# ---------------------------------------------------------------------------- registration
@pytest.fixture(scope="module")
def registration_case(tmp_path_factory):
    """Template, a moving image = template translated by (4, -3, 2) mm and rotated 6 degrees,
    and a lesion mask in the moving image's space."""
    root = tmp_path_factory.mktemp("reg")
    home = root / "templateflow"
    write_templateflow_template(home, "Tiny")
    image, affine = template_image()
    angle = np.deg2rad(6.0)
    rotation = np.eye(4)
    rotation[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    moved = rotation.copy()
    moved[:3, 3] = [4.0, -3.0, 2.0]
    moving_affine = moved @ affine  # the same voxels, placed elsewhere in the world
    moving = root / "sub-01_desc-synthsrFLAIR_T1w.nii.gz"
    nib.save(nib.Nifti1Image(image, moving_affine), str(moving))
    lesion_voxels = np.zeros(image.shape, np.uint8)
    lesion_voxels[28:34, 26:32, 22:28] = 1
    lesion = root / "lesion.nii.gz"
    nib.save(nib.Nifti1Image(lesion_voxels, moving_affine), str(lesion))
    return {"root": root, "home": home, "moving": moving, "lesion": lesion, "lesion_voxels": lesion_voxels,
            "template": image, "affine": affine}


def _job(case, **overrides):
    from synthsr_bids.group.register import RegistrationJob

    root, tpl = case["root"], case["home"] / "tpl-Tiny"
    values = dict(
        image=case["moving"], template_name="Tiny", template_t1w=tpl / "tpl-Tiny_res-01_T1w.nii.gz",
        template_mask=tpl / "tpl-Tiny_res-01_desc-brain_mask.nii.gz",
        xfm=root / "out" / "x_from-T1w_to-Tiny_mode-image_xfm.h5", xfm_json=root / "out" / "x_xfm.json",
        warped=root / "out" / "x_space-Tiny_T1w.nii.gz", warped_json=root / "out" / "x_space-Tiny_T1w.json",
        lesion=case["lesion"], warped_lesion=root / "out" / "x_space-Tiny_label-lesion_mask.nii.gz",
        warped_lesion_json=root / "out" / "x_space-Tiny_label-lesion_mask.json",
        work_dir=root, warped_sidecar={"SkullStripped": False}, lesion_sidecar={"Type": "Lesion"},
        provenance={"SourceSHA256": "abc"},
    )
    values.update(overrides)
    return RegistrationJob(**values)


def test_registration_aligns_image_and_lesion(registration_case):
    import ants

    from synthsr_bids.group.register import register_one

    case = registration_case
    job = _job(case)
    outcome = register_one(job)
    assert outcome.status == "written", outcome.error
    warped = nib.load(str(job.warped))
    np.testing.assert_allclose(warped.affine, case["affine"])
    template = case["template"]
    brain = nib.load(str(job.template_mask)).get_fdata() > 0
    moving = nib.load(str(case["moving"]))
    unregistered = resample_to_grid(moving.get_fdata(), moving.affine, template.shape, case["affine"])
    baseline = np.corrcoef(unregistered[brain], template[brain])[0, 1]
    assert baseline < 0.7 and outcome.correlation > 0.9
    assert outcome.correlation == pytest.approx(np.corrcoef(warped.get_fdata()[brain], template[brain])[0, 1], abs=1e-4)
    # the lesion lands where the template's voxels [28:34, 26:32, 22:28] are
    lesion = np.asanyarray(nib.load(str(job.warped_lesion)).dataobj)
    expected = case["lesion_voxels"].astype(bool)
    dice = 2 * (lesion.astype(bool) & expected).sum() / (lesion.sum() + expected.sum())
    assert dice > 0.75 and lesion.dtype == np.uint8
    # the saved composite transform reproduces the warped image
    again = ants.apply_transforms(fixed=ants.image_read(str(job.template_t1w)),
                                  moving=ants.image_read(str(case["moving"])), transformlist=[str(job.xfm)])
    assert np.corrcoef(again.numpy().ravel(), warped.get_fdata().ravel())[0, 1] > 0.999
    record = json.loads(job.xfm_json.read_text())
    assert record["Provenance"] == {"SourceSHA256": "abc"} and record["TransformType"] == "SyN"
    assert record["TemplateCorrelation"] == pytest.approx(outcome.correlation, abs=1e-4)
    assert json.loads(job.warped_lesion_json.read_text()) == {"Type": "Lesion"}
    # rerun with the same inputs: skipped; different inputs: redone
    stamp = job.xfm.stat().st_mtime_ns
    skipped = register_one(job)
    assert skipped.status == "skipped" and skipped.correlation == pytest.approx(outcome.correlation, abs=1e-4)
    assert job.xfm.stat().st_mtime_ns == stamp
    redone = register_one(_job(case, provenance={"SourceSHA256": "def"}, transform_type="Affine"))
    assert redone.status == "written" and redone.correlation > 0.9
    assert json.loads(job.xfm_json.read_text())["TransformType"] == "Affine"


def test_registration_rerun_refreshes_outdated_sidecars(registration_case, tmp_path):
    """An up-to-date registration is not redone, but sidecars that differ from what this version writes
    (an older version's, without Resolution) are rewritten; the correlation is the same number both ways."""
    from synthsr_bids.group.register import CORRELATION_DIGITS, register_one

    out = tmp_path / "out"
    job = _job(registration_case, xfm=out / "x_xfm.h5", xfm_json=out / "x_xfm.json", warped=out / "x.nii.gz",
               warped_json=out / "x.json", warped_lesion=out / "x_mask.nii.gz", warped_lesion_json=out / "x_mask.json",
               warped_sidecar={"SkullStripped": False, "Resolution": "res-1"},
               lesion_sidecar={"Type": "Lesion", "Resolution": "res-1"})
    fresh = register_one(job)
    assert fresh.status == "written" and fresh.updated_sidecars == ()
    assert fresh.correlation == round(fresh.correlation, CORRELATION_DIGITS)
    assert json.loads(job.xfm_json.read_text())["TemplateCorrelation"] == fresh.correlation
    for sidecar in (job.warped_json, job.warped_lesion_json):
        sidecar.write_text(json.dumps({k: v for k, v in json.loads(sidecar.read_text()).items() if k != "Resolution"}))
    stamps = [p.stat().st_mtime_ns for p in (job.xfm, job.warped, job.warped_lesion)]
    rerun = register_one(job)
    assert rerun.status == "skipped" and rerun.correlation == fresh.correlation
    assert rerun.updated_sidecars == ("x.json", "x_mask.json")
    assert json.loads(job.warped_json.read_text()) == {"SkullStripped": False, "Resolution": "res-1"}
    assert json.loads(job.warped_lesion_json.read_text()) == {"Type": "Lesion", "Resolution": "res-1"}
    assert [p.stat().st_mtime_ns for p in (job.xfm, job.warped, job.warped_lesion)] == stamps
    assert register_one(job).updated_sidecars == ()  # up to date: nothing rewritten


def test_registration_failure_is_reported_not_raised(registration_case, tmp_path):
    from synthsr_bids.group.register import register_one

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    outcome = register_one(_job(registration_case, image=broken, xfm=tmp_path / "x.h5", xfm_json=tmp_path / "x.json"))
    assert outcome.status == "failed" and outcome.error
    assert not (tmp_path / "x.h5").exists()


def test_job_serialisation_round_trip(registration_case):
    from synthsr_bids.group.register import job_from_dict, job_to_dict

    job = _job(registration_case, template_mask=None)
    assert job_from_dict(json.loads(json.dumps(job_to_dict(job)))) == job


@pytest.mark.slow
def test_registration_in_worker_processes(registration_case, tmp_path):
    from synthsr_bids.group.register import run_jobs

    case = registration_case
    jobs = [
        _job(case, xfm=tmp_path / f"{i}_xfm.h5", xfm_json=tmp_path / f"{i}_xfm.json", warped=tmp_path / f"{i}.nii.gz",
             warped_json=tmp_path / f"{i}.json", warped_lesion=tmp_path / f"{i}_lesion.nii.gz",
             warped_lesion_json=tmp_path / f"{i}_lesion.json")
        for i in range(2)
    ]
    seen = []
    outcomes = run_jobs(jobs, workers=2, progress=lambda i, n, o: seen.append((i, n)))
    assert [o.status for o in outcomes] == ["written", "written"] and sorted(seen) == [(1, 2), (2, 2)]
    assert [o.image for o in outcomes] == [case["moving"]] * 2 and all(o.correlation > 0.9 for o in outcomes)
    # deterministic: same seed, one ITK thread per job
    a, b = (nib.load(str(j.warped)).get_fdata() for j in jobs)
    np.testing.assert_allclose(a, b, atol=1e-4)
    # rerun: skipped in the workers too, with the same correlation and the rewritten sidecar reported
    jobs[1].warped_json.write_text(json.dumps({"Outdated": True}))
    again = run_jobs(jobs, workers=2)
    assert [o.status for o in again] == ["skipped", "skipped"]
    assert [o.correlation for o in again] == [o.correlation for o in outcomes]
    assert [o.updated_sidecars for o in again] == [(), (jobs[1].warped_json.name,)]


def test_scan_selection_ignores_the_labels_that_split_work_into_jobs():
    """The tasks of a --per-session SLURM array each ran with --session-label X: not a different selection."""
    from synthsr_bids.group.collect import ScanSelection

    task = ScanSelection.from_config_dict({"contrasts": ["FLAIR"], "session_labels": ["1"],
                                           "participant_labels": ["01"], "bids_filters": {}})
    group = ScanSelection.from_config_dict({"contrasts": ["FLAIR"], "session_labels": [], "bids_filters": {}})
    assert task == group and task.describe() == "--contrasts FLAIR"
    assert ScanSelection.from_config_dict({"contrasts": ["T2w"]}) != group
