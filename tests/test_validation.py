"""Input validation with the real ``bids-validator-deno``: the check is restricted to the
selected participants, un-fetched git-annex (DataLad) content is named with its fix, and a
validator that runs out of time ends the run cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bids_builder import add_scan, build_clean_dataset, scan
from models_builder import random_unet, write_model
from synthsr_bids.cli.run import main
from synthsr_bids.validation import (
    ENV_TIMEOUT,
    ValidatorTimeoutError,
    ValidatorUnavailableError,
    find_unfetched_annex_files,
    validate_dataset,
)

#: One scan per participant keeps every validator call and the one full run small.
LAYOUT = {
    "sub-01/anat/sub-01_T2w.nii.gz": ("T2w", (1, 1, 2), "RAS"),
    "sub-02/anat/sub-02_FLAIR.nii.gz": ("FLAIR", (1, 1, 2), "RAS"),
}
SUB01 = "sub-01/anat/sub-01_T2w.nii.gz"
SUB02 = "sub-02/anat/sub-02_FLAIR.nii.gz"
KEY = "MD5E-s123456--0123456789abcdef0123456789abcdef.nii.gz"


def annex_symlink(root: Path, relpath: str) -> Path:
    """Replace ``relpath`` by what ``datalad clone`` leaves for a locked file whose
    content was not fetched: a symlink into ``.git/annex/objects`` that dangles."""
    path = root / relpath
    path.unlink()
    (root / ".git" / "annex" / "objects").mkdir(parents=True, exist_ok=True)
    depth = len(Path(relpath).parts) - 1
    os.symlink("../" * depth + f".git/annex/objects/Xx/Yy/{KEY}/{KEY}", path)
    assert path.is_symlink() and not path.exists()
    return path


def annex_pointer(root: Path, relpath: str) -> Path:
    """Replace ``relpath`` by the pointer file git-annex leaves for an unlocked file."""
    path = root / relpath
    path.write_text(f"/annex/objects/{KEY}\n")
    return path


@pytest.fixture
def dataset(tmp_path):
    return build_clean_dataset(tmp_path / "ds", layout=LAYOUT)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model(random_unet(), tmp_path_factory.mktemp("models") / "random.safetensors")


def run_cli(bids: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``synthsr-bids`` exit code and its run log."""
    code = main([str(bids), str(out), "participant", "--nthreads", "1", "-w", str(out.parent / "work"), *extra])
    logs = sorted((out / "logs").glob("run-*.log"))
    return code, logs[-1].read_text() if logs else ""


def locations(issues) -> set[str]:
    return {issue.location for issue in issues}


# -- the validator, restricted to the selected participants ------------------------------


def test_other_participants_errors_are_ignored(dataset):
    annex_symlink(dataset, SUB01)
    whole = validate_dataset(dataset)
    assert ("NIFTI_HEADER_UNREADABLE", f"/{SUB01}") in {(i.code, i.location) for i in whole.errors}

    only_02 = validate_dataset(dataset, participant_labels=["02"])
    assert only_02.errors == ()
    assert only_02.participants == ("02",)
    # the issues are still reported, reclassified by the validator's --config
    ignored = [i for i in only_02.issues if i.location.startswith("/sub-01/")]
    assert ignored and {i.severity for i in ignored} == {"ignore"}
    assert any(i.location.startswith("/sub-02/") for i in only_02.warnings)

    only_01 = validate_dataset(dataset, participant_labels=["01"])
    assert f"/{SUB01}" in locations(only_01.errors)
    assert "sub-01 and dataset-level files" in only_01.summary()


def test_errors_of_the_selected_participant_and_dataset_level_files_still_count(dataset):
    (dataset / SUB02).write_bytes(b"")
    (dataset / "dataset_description.json").write_text("{not json")
    report = validate_dataset(dataset, participant_labels=["02"])
    assert f"/{SUB02}" in locations(report.errors)
    assert "/dataset_description.json" in locations(report.errors)
    assert not any(loc.startswith("/sub-01/") for loc in locations(report.errors))


def test_ignoring_a_participant_does_not_ignore_one_with_a_longer_label(dataset):
    (dataset / SUB01).write_bytes(b"")
    add_scan(dataset, "sub-010/anat/sub-010_T2w.nii.gz", scan("T2w", zooms=(1, 1, 2)))
    (dataset / "sub-010/anat/sub-010_T2w.nii.gz").write_bytes(b"")
    # folders that are not valid BIDS names must be ignored literally, not as glob patterns
    for odd in ("sub-0[1]", "sub-a*b", "sub-!x"):
        (dataset / odd / "anat").mkdir(parents=True)
        (dataset / odd / "anat" / "notes.txt").write_text("x")
    errors = locations(validate_dataset(dataset, participant_labels=["010"]).errors)
    assert "/sub-010/anat/sub-010_T2w.nii.gz" in errors
    assert not any(loc.startswith(("/sub-01/", "/sub-0[1]/", "/sub-a*b/", "/sub-!x/")) for loc in errors)


# -- un-fetched git-annex content -----------------------------------------------------------


def test_find_unfetched_annex_files(dataset):
    annex_symlink(dataset, SUB01)
    annex_symlink(dataset, SUB02)
    annex_pointer(dataset, "sub-02/anat/sub-02_FLAIR.json")
    # not placeholders: a fetched annex file, a dangling non-annex link, small JSON
    objects = dataset / ".git" / "annex" / "objects" / "Aa" / "Bb" / "KEY2"
    objects.mkdir(parents=True)
    (objects / "KEY2").write_bytes(b"content")
    os.symlink("../../.git/annex/objects/Aa/Bb/KEY2/KEY2", dataset / "sub-02" / "anat" / "sub-02_T1w.nii.gz")
    os.symlink("nowhere.nii.gz", dataset / "sub-02" / "anat" / "sub-02_PDw.nii.gz")

    assert find_unfetched_annex_files(dataset, ["02"]) == [
        Path("sub-02/anat/sub-02_FLAIR.json"),
        Path(SUB02),
    ]
    assert find_unfetched_annex_files(dataset, ["01"]) == [Path(SUB01)]
    assert set(find_unfetched_annex_files(dataset)) == {
        Path(SUB01), Path(SUB02), Path("sub-02/anat/sub-02_FLAIR.json")}
    annex_pointer(dataset, "participants.tsv")  # dataset-level files are always looked at
    assert Path("participants.tsv") in find_unfetched_annex_files(dataset, ["01"])


def test_unfetched_file_of_another_participant_does_not_fail_the_run(dataset, model, tmp_path):
    """The reviewer's case: ``datalad get sub-02`` only, then a job for sub-02."""
    annex_symlink(dataset, SUB01)
    code, log = run_cli(dataset, tmp_path / "out", "--participant-label", "02", "--model", str(model))
    assert code == 0, log
    assert "BIDS validation passed" in log
    assert (tmp_path / "out" / "sub-02").is_dir() and not (tmp_path / "out" / "sub-01").exists()


@pytest.mark.parametrize("labels", [["--participant-label", "01"], []])
def test_unfetched_file_of_a_selected_participant_exits_65_with_the_fix(dataset, model, tmp_path, labels):
    annex_symlink(dataset, SUB01)
    code, log = run_cli(dataset, tmp_path / "out", *labels, "--model", str(model))
    assert code == 65
    assert SUB01 in log
    assert "not been fetched" in log
    assert f"cd {dataset} && datalad get {SUB01}" in log
    assert f"git annex get {SUB01}" in log
    assert "NIFTI_HEADER_UNREADABLE" not in log  # caught before the validator


def test_unlocked_pointer_file_exits_65(dataset, model, tmp_path):
    annex_pointer(dataset, SUB02)
    code, log = run_cli(dataset, tmp_path / "out", "--participant-label", "02", "--model", str(model))
    assert code == 65
    assert f"datalad get {SUB02}" in log


def test_skip_bids_validation_skips_the_annex_check_too(dataset, model, tmp_path):
    annex_symlink(dataset, SUB01)
    # validation (and the annex check) skipped: the run gets as far as scan selection
    code, log = run_cli(dataset, tmp_path / "out", "--skip-bids-validation", "--contrasts", "angio",
                        "--model", str(model))
    assert code == 66, log


def test_invalid_selected_participant_exits_16_and_others_do_not(dataset, model, tmp_path):
    (dataset / SUB02).write_bytes(b"")
    code, log = run_cli(dataset, tmp_path / "out2", "--participant-label", "02", "--model", str(model))
    assert code == 16
    assert SUB02 in log and "sub-02 and dataset-level files" in log
    # validation of sub-01 passes; --contrasts angio then stops the run at scan selection
    code, log = run_cli(dataset, tmp_path / "out1", "--participant-label", "01", "--contrasts", "angio",
                        "--model", str(model))
    assert code == 66, log
    assert "BIDS validation passed" in log


# -- time limit -----------------------------------------------------------------------------


def test_timeout_parameter_raises_a_clear_error(dataset):
    with pytest.raises(ValidatorTimeoutError) as caught:
        validate_dataset(dataset, timeout=0.001)
    assert isinstance(caught.value, ValidatorUnavailableError)
    assert caught.value.timeout == 0.001
    message = str(caught.value)
    assert "timed out after 0.001 s" in message
    assert "--skip-bids-validation" in message and ENV_TIMEOUT in message


def test_timeout_from_the_environment_exits_64(dataset, model, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_TIMEOUT, "0.001")
    code, log = run_cli(dataset, tmp_path / "out", "--participant-label", "02", "--model", str(model))
    assert code == 64
    assert "timed out after 0.001 s" in log
    assert "--skip-bids-validation" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_invalid_timeout_setting_exits_64(dataset, model, tmp_path, monkeypatch, value):
    monkeypatch.setenv(ENV_TIMEOUT, value)
    code, log = run_cli(dataset, tmp_path / "out", "--model", str(model))
    assert code == 64
    assert ENV_TIMEOUT in log and "positive number of seconds" in log
