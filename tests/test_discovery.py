import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from bids_builder import add_broken_scans, add_scan, build_clean_dataset, scan
from synthsr_bids import discovery
from synthsr_bids.cli.parser import parse_args
from synthsr_bids.discovery import build_layout, find_scans, parse_entities
from synthsr_bids.errors import ExitCode, InputDataError, NoInputError, UsageError


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


# --- --bids-database-dir: shared between jobs, keyed by dataset, atomic, outside the input ---

SUB01 = [
    "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz",
    "sub-01/ses-1/anat/sub-01_ses-1_run-01_T2w.nii",
    "sub-01/ses-1/anat/sub-01_ses-1_run-02_T2w.nii.gz",
    "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
]
SUB02 = ["sub-02/ses-1/anat/sub-02_ses-1_FLAIR.nii.gz"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return build_clean_dataset(tmp_path_factory.mktemp("clean") / "ds")


def _relpaths(scans):
    return [s.relpath for s in scans]


def _snapshot(folder):
    """relpath -> (sha256, mtime) of every file under ``folder``."""
    return {
        path.relative_to(folder).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
        )
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def _entries(database):
    return sorted(p.name for p in database.iterdir())


def test_database_shared_between_participant_selections(clean, tmp_path):
    """A SLURM array: one participant per task, one shared database folder."""
    database = tmp_path / "db"
    first = find_scans(_config(clean, tmp_path, "--participant-label", "01", "--bids-database-dir", str(database)))
    assert _relpaths(first) == SUB01
    (folder,) = _entries(database)
    assert folder.startswith("layout-")
    saved = _snapshot(database)
    assert f"{folder}/layout_index.sqlite" in saved

    second = find_scans(_config(clean, tmp_path, "--participant-label", "02", "--bids-database-dir", str(database)))
    assert _relpaths(second) == SUB02
    every = find_scans(_config(clean, tmp_path, "--bids-database-dir", str(database)))
    assert _relpaths(every) == sorted(SUB01 + SUB02)
    with pytest.raises(NoInputError, match="sub-99.*found: 01, 02"):
        find_scans(_config(clean, tmp_path, "--participant-label", "99", "--bids-database-dir", str(database)))
    # the saved index was only read
    assert _snapshot(database) == saved


def test_saved_index_covers_every_participant_in_memory_one_only_the_selection(clean, tmp_path):
    selected = _config(clean, tmp_path, "--participant-label", "02")
    assert build_layout(selected).get_subjects() == ["02"]
    saved = _config(clean, tmp_path, "--participant-label", "02", "--bids-database-dir", str(tmp_path / "db"))
    assert sorted(build_layout(saved).get_subjects()) == ["01", "02"]


def test_database_is_not_reused_for_another_dataset(clean, tmp_path):
    other = build_clean_dataset(
        tmp_path / "other",
        {"sub-05/anat/sub-05_T2w.nii.gz": ("T2w", (1, 1, 3), "RAS")},
    )
    database = tmp_path / "db"
    assert _relpaths(find_scans(_config(clean, tmp_path, "--bids-database-dir", str(database)))) == sorted(SUB01 + SUB02)
    scans = find_scans(_config(other, tmp_path, "--bids-database-dir", str(database)))
    assert _relpaths(scans) == ["sub-05/anat/sub-05_T2w.nii.gz"]
    assert scans[0].path == other / "sub-05/anat/sub-05_T2w.nii.gz"
    assert len(_entries(database)) == 2
    # and each dataset keeps finding its own scans
    again = find_scans(_config(clean, tmp_path, "--participant-label", "02", "--bids-database-dir", str(database)))
    assert _relpaths(again) == SUB02
    assert len(_entries(database)) == 2


def test_database_key_depends_on_settings_and_pybids_version(clean):
    settings = discovery._index_settings(clean, discovery._base_ignore(), index_metadata=True)
    folder = discovery.database_folder(clean.parent / "db", settings)
    for change in ({"pybids": "0.0.1"}, {"index_metadata": False}, {"bids_dir": "/elsewhere"},
                   {"ignore": settings["ignore"][:-1]}):
        assert discovery.database_folder(clean.parent / "db", {**settings, **change}) != folder


@pytest.mark.parametrize("where", [".", "code/db", "sub-01/db", "via-symlink"])
def test_database_inside_the_input_dataset_is_refused(clean, tmp_path, where, capsys):
    if where == "via-symlink":
        (tmp_path / "link").symlink_to(clean)
        database = tmp_path / "link" / "db"
    else:
        database = clean / where
    before = sorted(p.relative_to(clean).as_posix() for p in clean.rglob("*"))
    # the command line refuses it before anything runs
    with pytest.raises(SystemExit) as exited:
        _config(clean, tmp_path, "--bids-database-dir", str(database))
    assert exited.value.code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "--bids-database-dir" in err and "inside the input dataset" in err
    # and so does discovery for configurations built without the parser
    config = dataclasses.replace(_config(clean, tmp_path), bids_database_dir=database)
    with pytest.raises(UsageError, match="inside the input dataset") as refused:
        find_scans(config)
    assert refused.value.exit_code == ExitCode.USAGE == 64
    assert str(database.resolve()) in str(refused.value) and "Fix:" in str(refused.value)
    assert sorted(p.relative_to(clean).as_posix() for p in clean.rglob("*")) == before


@pytest.mark.parametrize("where", ["sibling", "derivatives"])
def test_database_next_to_the_dataset_or_in_its_derivatives_is_accepted(clean, tmp_path, where):
    """A sibling whose name starts like the dataset's is outside it; derivatives/ is where outputs
    may go too (it is never indexed)."""
    database = clean.parent / (clean.name + "_db") if where == "sibling" else clean / "derivatives" / "pybids_db"
    try:
        scans = find_scans(_config(clean, tmp_path, "--participant-label", "02", "--bids-database-dir", str(database)))
        assert _relpaths(scans) == SUB02
    finally:
        import shutil

        shutil.rmtree(database, ignore_errors=True)


def test_concurrent_builds_with_threads(clean, tmp_path):
    database = tmp_path / "db"
    labels = ["01", "02", "01", "02"]
    start = threading.Barrier(len(labels))
    results: dict[int, list[str]] = {}
    errors: list[BaseException] = []

    def job(index, label):
        config = _config(clean, tmp_path, "--participant-label", label, "--bids-database-dir", str(database))
        start.wait()
        try:
            results[index] = _relpaths(find_scans(config))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(i, lbl)) for i, lbl in enumerate(labels)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == {0: SUB01, 1: SUB02, 2: SUB01, 3: SUB02}
    (folder,) = _entries(database)  # one database, no temporary leftovers
    assert folder.startswith("layout-")


def _find_in_process(root, tmp, database, label):
    config = parse_args([root, os.path.join(tmp, "out"), "participant", "--participant-label", label,
                         "--bids-database-dir", database])
    return [s.relpath for s in find_scans(config)]


def test_concurrent_builds_with_processes(clean, tmp_path):
    database = tmp_path / "db"
    labels = ["01", "02"]
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=len(labels), mp_context=context) as pool:
        futures = [pool.submit(_find_in_process, str(clean), str(tmp_path), str(database), lbl) for lbl in labels]
        results = [f.result(timeout=300) for f in futures]
    assert results == [SUB01, SUB02]
    (folder,) = _entries(database)
    assert folder.startswith("layout-")


def test_job_that_loses_the_race_uses_the_winners_database(clean, tmp_path, monkeypatch):
    """Deterministic version of the race: another job renames its index into place
    while this one is still building; ours is discarded, theirs is read, not written."""
    database = tmp_path / "db"
    real_rename = os.rename
    winner: dict[str, object] = {}
    dst_seen: list = []

    def rename_after_the_other_job(src, dst):
        dst_seen.append(dst)
        if not winner:
            winner["started"] = True
            winner["scans"] = _relpaths(find_scans(
                _config(clean, tmp_path, "--participant-label", "02", "--bids-database-dir", str(database))))
            winner["snapshot"] = _snapshot(Path(dst))  # the other job's complete index
        return real_rename(src, dst)

    monkeypatch.setattr(discovery.os, "rename", rename_after_the_other_job)
    loser = find_scans(_config(clean, tmp_path, "--participant-label", "01", "--bids-database-dir", str(database)))
    assert winner["scans"] == SUB02
    assert _relpaths(loser) == SUB01
    (folder,) = _entries(database)  # our temporary copy is gone
    assert database / folder == Path(dst_seen[0])
    assert _snapshot(database / folder) == winner["snapshot"]  # read, not rewritten


def test_index_builds_of_killed_jobs_are_swept_once_stale(clean, tmp_path, caplog):
    """A job killed while indexing leaves its temporary folder; the next build removes it once
    nothing in it changed for a day, and leaves a build another job may still be writing."""
    import time

    database = tmp_path / "db"
    day_ago = time.time() - 24 * 3600 - 100
    killed = database / ".layout-0123456789abcdef.tmp-4242-deadbeef"
    (killed / "sub").mkdir(parents=True)
    for path in (killed / "layout_index.sqlite", killed / "sub" / "x"):
        path.write_bytes(b"partial")
        os.utime(path, (day_ago, day_ago))
    for folder in (killed / "sub", killed):
        os.utime(folder, (day_ago, day_ago))
    busy = database / ".layout-0123456789abcdef.tmp-4343-cafecafe"  # old folder, file written just now
    busy.mkdir()
    os.utime(busy, (day_ago, day_ago))
    (busy / "layout_index.sqlite").write_bytes(b"growing")
    walking = database / ".layout-0123456789abcdef.tmp-4444-beefbeef"  # pybids writes nothing while it walks
    walking.mkdir()
    hours_ago = time.time() - 5 * 3600
    os.utime(walking, (hours_ago, hours_ago))
    with caplog.at_level(logging.INFO, logger="synthsr_bids"):
        found = find_scans(_config(clean, tmp_path, "--bids-database-dir", str(database)))
    assert _relpaths(found) == SUB01 + SUB02
    assert not killed.exists() and busy.is_dir() and walking.is_dir()
    assert f"removed {killed}" in caplog.text
    layouts = [name for name in _entries(database) if name.startswith("layout-")]
    assert len(layouts) == 1 and (database / layouts[0] / "layout_index.sqlite").is_file()


def test_a_malformed_sidecar_stops_no_job_unless_a_filter_reads_sidecars(tmp_path):
    """Sidecars are indexed only for filters on their fields: one broken JSON file (here in a participant
    the job does not even process) must not stop every job of a saved-index SLURM array."""
    root = build_clean_dataset(tmp_path / "ds", layout={})
    add_scan(root, "sub-01/anat/sub-01_FLAIR.nii.gz", scan("FLAIR"), {"MagneticFieldStrength": 3})
    add_scan(root, "sub-02/anat/sub-02_FLAIR.nii.gz", scan("FLAIR"), {"MagneticFieldStrength": 1.5})
    add_scan(root, "sub-03/anat/sub-03_FLAIR.nii.gz", scan("FLAIR"))
    broken = root / "sub-03" / "anat" / "sub-03_FLAIR.json"
    broken.write_text('{"MagneticFieldStrength": 3,')
    for extra in ((), ("--bids-database-dir", str(tmp_path / "db"))):
        found = find_scans(_config(root, tmp_path, "--participant-label", "01", *extra))
        assert _relpaths(found) == ["sub-01/anat/sub-01_FLAIR.nii.gz"]
    assert len(find_scans(_config(root, tmp_path))) == 3

    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"flair": {"MagneticFieldStrength": 3}}))
    assert discovery.sidecar_filter_keys({"flair": {"MagneticFieldStrength": 3, "acquisition": "ax"},
                                          "bold": {"RepetitionTime": 2}}, ["FLAIR", "T2w"]) == ["MagneticFieldStrength"]
    assert discovery.sidecar_filter_keys({"bold": {"RepetitionTime": 2}}, ["FLAIR"]) == []
    with pytest.raises(InputDataError) as error:
        find_scans(_config(root, tmp_path, "--bids-filter-file", str(filters)))
    assert "sub-03_FLAIR.json" in str(error.value)
    assert "selects on JSON sidecar fields (MagneticFieldStrength)" in str(error.value)
    broken.write_text('{"MagneticFieldStrength": 3}')
    chosen = find_scans(_config(root, tmp_path, "--bids-filter-file", str(filters)))
    assert _relpaths(chosen) == ["sub-01/anat/sub-01_FLAIR.nii.gz", "sub-03/anat/sub-03_FLAIR.nii.gz"]


def test_only_magnitude_parts_by_default_and_a_filter_can_ask_for_others(tmp_path):
    """niworkflows' default: part-mag or no part entity; phase images are not anatomy."""
    root = build_clean_dataset(tmp_path / "ds", layout={})
    for part in ("mag", "phase"):
        add_scan(root, f"sub-01/anat/sub-01_part-{part}_T2starw.nii.gz", scan("T2w"))
    add_scan(root, "sub-01/anat/sub-01_T2w.nii.gz", scan("T2w"))
    found = find_scans(_config(root, tmp_path))
    assert sorted(s.relpath for s in found) == ["sub-01/anat/sub-01_T2w.nii.gz",
                                               "sub-01/anat/sub-01_part-mag_T2starw.nii.gz"]
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"t2starw": {"part": "phase"}}))
    chosen = find_scans(_config(root, tmp_path, "--bids-filter-file", str(filters)))
    assert sorted(s.relpath for s in chosen) == ["sub-01/anat/sub-01_T2w.nii.gz",
                                                "sub-01/anat/sub-01_part-phase_T2starw.nii.gz"]
    filters.write_text(json.dumps({"anat": {"part": ["mag", "phase", None]}}))  # the README's example
    every = find_scans(_config(root, tmp_path, "--bids-filter-file", str(filters)))
    assert sorted(s.relpath for s in every) == ["sub-01/anat/sub-01_T2w.nii.gz",
                                               "sub-01/anat/sub-01_part-mag_T2starw.nii.gz",
                                               "sub-01/anat/sub-01_part-phase_T2starw.nii.gz"]


def test_parametric_maps_are_taken_when_asked_with_a_warning(tmp_path, caplog):
    root = build_clean_dataset(tmp_path / "ds", layout={})
    add_scan(root, "sub-01/anat/sub-01_T1map.nii.gz", scan("T1w"))
    with caplog.at_level(logging.WARNING, logger="synthsr_bids"):
        found = find_scans(_config(root, tmp_path, "--contrasts", "T1map"))
    assert [s.relpath for s in found] == ["sub-01/anat/sub-01_T1map.nii.gz"]
    assert "--contrasts T1map: parametric maps" in caplog.text
