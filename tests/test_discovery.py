import json

import pytest

from bids_builder import add_broken_scans, add_scan, build_clean_dataset, scan
from synthsr_bids.cli.parser import parse_args
from synthsr_bids.discovery import find_scans, parse_entities
from synthsr_bids.errors import InputDataError, NoInputError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = build_clean_dataset(tmp_path_factory.mktemp("discovery") / "ds")
    add_broken_scans(root)
    # things that must not be picked up
    (root / "derivatives" / "other" / "sub-01" / "anat").mkdir(parents=True)
    (root / "derivatives" / "other" / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz").write_bytes(b"x")
    (root / "sub-01" / "ses-1" / "func").mkdir(parents=True)
    (root / "sub-01" / "ses-1" / "func" / "sub-01_ses-1_task-rest_bold.nii.gz").write_bytes(b"x")
    return root


def _config(root, tmp_path, *extra):
    return parse_args([str(root), str(tmp_path / "out"), "participant", *extra])


def test_parse_entities_keeps_labels_as_written():
    assert parse_entities("sub-01_ses-pre_acq-ax_ce-gad_rec-norm_run-02_echo-1_part-mag_T2w.nii.gz") == {
        "subject": "01", "session": "pre", "acquisition": "ax", "ceagent": "gad",
        "reconstruction": "norm", "run": "02", "echo": "1", "part": "mag",
    }


def test_finds_every_anatomical_scan(dataset, tmp_path):
    scans = find_scans(_config(dataset, tmp_path))
    relpaths = [s.relpath for s in scans]
    assert relpaths == sorted(relpaths)
    assert "sub-01/ses-1/anat/sub-01_ses-1_run-01_T2w.nii" in relpaths  # uncompressed
    assert "sub-01/ses-1/anat/sub-01_ses-1_run-02_T2w.nii.gz" in relpaths
    assert "sub-03/ses-1/anat/sub-03_ses-1_T2w.nii.gz" in relpaths  # zero-byte: reported later, per file
    assert not any("derivatives" in r or "func" in r for r in relpaths)
    assert len(relpaths) == 8
    flair = next(s for s in scans if s.relpath.endswith("acq-ax_FLAIR.nii.gz"))
    assert flair.suffix == "FLAIR" and flair.subject == "01" and flair.session == "1"
    assert flair.entities == {"subject": "01", "session": "1", "acquisition": "ax"}
    assert flair.metadata["MagneticFieldStrength"] == 3


def test_selection_by_participant_session_contrast(dataset, tmp_path):
    scans = find_scans(_config(dataset, tmp_path, "--participant-label", "sub-01", "--session-label", "1",
                               "--contrasts", "T2w"))
    assert [s.entities.get("run") for s in scans] == ["01", "02"]
    assert {s.subject for s in scans} == {"01"}


def test_filter_file(dataset, tmp_path):
    filters = tmp_path / "f.json"
    filters.write_text(json.dumps({"anat": {"session": "1"}, "t2w": {"run": 2}}))
    scans = find_scans(_config(dataset, tmp_path, "--bids-filter-file", str(filters)))
    names = {s.path.name for s in scans}
    assert "sub-01_ses-1_run-02_T2w.nii.gz" in names
    assert "sub-01_ses-1_run-01_T2w.nii" not in names
    assert "sub-01_ses-2_T1w.nii.gz" not in names
    assert "sub-02_ses-1_FLAIR.nii.gz" in names


def test_missing_participant_is_no_input(dataset, tmp_path):
    with pytest.raises(NoInputError, match="sub-99"):
        find_scans(_config(dataset, tmp_path, "--participant-label", "99"))


def test_nothing_selected_is_no_input(dataset, tmp_path):
    with pytest.raises(NoInputError, match="angio"):
        find_scans(_config(dataset, tmp_path, "--contrasts", "angio"))


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="dataset_description.json"):
        find_scans(_config(tmp_path / "empty", tmp_path))


def test_database_dir_is_reused(tmp_path):
    """As in fMRIPrep: the saved index is read back, not rebuilt (so a scan added later is not seen)."""
    root = build_clean_dataset(tmp_path / "ds")
    database = tmp_path / "db"
    first = find_scans(_config(root, tmp_path, "--bids-database-dir", str(database)))
    assert any(database.iterdir())
    late = add_scan(root, "sub-01/ses-1/anat/sub-01_ses-1_acq-late_T2w.nii.gz", scan("T2w"))
    second = find_scans(_config(root, tmp_path, "--bids-database-dir", str(database)))
    assert [s.relpath for s in second] == [s.relpath for s in first]
    # without the saved index the new scan is found: the database, not chance, hid it
    fresh = find_scans(_config(root, tmp_path))
    assert late.name in {s.path.name for s in fresh} - {s.path.name for s in first}
