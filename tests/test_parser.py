import json
from pathlib import Path

import pytest

from synthsr_bids.cli.parser import build_parser, parse_args
from synthsr_bids.config import DEFAULT_CONTRASTS


def _parse(tmp_path: Path, *extra: str, out: Path | None = None):
    bids = tmp_path / "ds"
    bids.mkdir(exist_ok=True)
    return parse_args([str(bids), str(out or tmp_path / "out"), "participant", *extra])


def test_defaults(tmp_path):
    config = _parse(tmp_path)
    assert config.analysis_level == "participant"
    assert config.participant_labels == ()
    assert config.contrasts == DEFAULT_CONTRASTS
    assert config.inference.flip and not config.inference.ct
    assert config.inference.sharpen is None  # as the model's weight file asks
    assert config.inference.device == "auto"
    assert not config.overwrite and not config.native_grid
    assert config.command_line[0] == "synthsr-bids"
    assert config.output_dir == (tmp_path / "out").resolve()


def test_default_work_dir_is_per_user(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("LOGNAME", "ada lovelace")  # getpass reads LOGNAME first
    assert _parse(tmp_path).work_dir == Path(tempfile.gettempdir()) / "synthsr_work_ada_lovelace"


@pytest.mark.parametrize("flag", ["--nthreads", "--n-cpus", "--nprocs", "--omp-nthreads"])
def test_thread_limits_of_fmriprep_are_accepted(tmp_path, flag):
    assert _parse(tmp_path, flag, "3").inference.nthreads == 3


@pytest.mark.parametrize("flag", ["--participant-label", "--participant_label"])
def test_participant_labels_strip_prefix(tmp_path, flag):
    config = _parse(tmp_path, flag, "sub-01", "02", "sub-01")
    assert config.participant_labels == ("01", "02")


def test_session_and_options(tmp_path):
    config = _parse(
        tmp_path,
        "--session-label", "ses-pre", "post",
        "--contrasts", "FLAIR", "T2w",
        "--disable-flipping", "--disable-sharpening", "--ct", "--native-grid",
        "--device", "cuda:1", "--nthreads", "3", "--overwrite", "-vv",
        "--model", "synthsr-v1",
    )
    assert config.session_labels == ("pre", "post")
    assert config.contrasts == ("FLAIR", "T2w")
    assert (config.inference.flip, config.inference.sharpen, config.inference.ct) == (False, False, True)
    assert config.native_grid and config.overwrite and config.verbosity == 2
    assert config.inference.device == "cuda:1" and config.inference.nthreads == 3
    assert config.inference.model == "synthsr-v1"


def test_bids_filter_file(tmp_path):
    filters = tmp_path / "filters.json"
    filters.write_text(json.dumps({"anat": {"acquisition": "ax"}, "flair": {"run": None}}))
    config = _parse(tmp_path, "--bids-filter-file", str(filters))
    assert config.bids_filters == {"anat": {"acquisition": "ax"}, "flair": {"run": None}}
    assert json.loads(config.dumps())["bids_filters"]["anat"] == {"acquisition": "ax"}


@pytest.mark.parametrize(
    "args",
    [
        ["--participant-label", "sub-0_1"],
        ["--device", "gpu"],
        ["--nthreads", "0"],
        ["--bids-filter-file", "/does/not/exist.json"],
        ["--no-such-option"],
    ],
)
def test_usage_errors_exit_64(tmp_path, args, capsys):
    with pytest.raises(SystemExit) as excinfo:
        _parse(tmp_path, *args)
    assert excinfo.value.code == 64
    assert "error" in capsys.readouterr().err


def test_bad_filter_json_exit_64(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as excinfo:
        _parse(tmp_path, "--bids-filter-file", str(bad))
    assert excinfo.value.code == 64
    assert "not valid JSON" in capsys.readouterr().err


def test_output_equal_to_input_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        _parse(tmp_path, out=tmp_path / "ds")
    assert excinfo.value.code == 64
    assert "derivatives" in capsys.readouterr().err


def test_output_inside_raw_tree_refused_unless_derivatives(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        _parse(tmp_path, out=tmp_path / "ds" / "sub-01" / "out")
    assert excinfo.value.code == 64
    config = _parse(tmp_path, out=tmp_path / "ds" / "derivatives" / "synthsr")
    assert config.output_dir.parts[-2:] == ("derivatives", "synthsr")


@pytest.mark.parametrize(("flags", "expected"), [
    ((), None),
    (("--disable-sharpening",), False),
    (("--disable_sharpening",), False),
    (("--enable-sharpening",), True),
    (("--enable_sharpening",), True),
])
def test_sharpening_flags(tmp_path, flags, expected):
    assert _parse(tmp_path, *flags).inference.sharpen is expected


def test_sharpening_flags_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(tmp_path, "--enable-sharpening", "--disable-sharpening")
    assert exc.value.code == 64
    assert "not allowed with argument" in capsys.readouterr().err


def test_group_level_accepted(tmp_path):
    bids = tmp_path / "ds"
    bids.mkdir()
    config = parse_args([str(bids), str(tmp_path / "out"), "group"])
    assert config.analysis_level == "group"


def test_help_mentions_every_option():
    text = build_parser().format_help()
    for option in ("--participant-label", "--session-label", "--bids-filter-file", "--contrasts",
                   "--skip-bids-validation", "--bids-database-dir", "--work-dir", "--model", "--device",
                   "--nthreads", "--disable-flipping", "--disable-sharpening", "--enable-sharpening", "--ct",
                   "--native-grid",
                   "--overwrite", "--version", "Exit codes"):
        assert option in text
