"""``synthsr-bids`` entry point: parse -> config -> participant | group."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from synthsr_bids import __version__
from synthsr_bids.config import RunConfig
from synthsr_bids.errors import ExitCode, OutputError, SynthSRBidsError, UsageError, ValidationFailedError

#: Below this, the work folder is too small for the group level's registrations (warned, not refused).
MIN_WORK_FREE_BYTES = 2**30

LOGGER = logging.getLogger("synthsr_bids")
LOG_FORMAT = "%(asctime)s [%(levelname)s] %(message)s"


def setup_logging(verbosity: int, log_file: Path | None = None) -> None:
    """Console logging (INFO, -v DEBUG, -vv DEBUG for libraries too) and a run log file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_synthsr_bids", False):
            root.removeHandler(handler)
    package_level = logging.DEBUG if verbosity >= 1 else logging.INFO
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    LOGGER.setLevel(package_level)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    console._synthsr_bids = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._synthsr_bids = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def _prepare_output(config: RunConfig) -> Path:
    """Create the output and work folders (and sweep the stale temporaries of killed jobs from the
    shared ones); return the run's log file."""
    from synthsr_bids.io import sweep_stale_temporaries

    try:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        config.work_dir.mkdir(parents=True, exist_ok=True)
        logs = config.output_dir / "logs"
        logs.mkdir(exist_ok=True)
        for folder in (logs, config.work_dir):
            probe = folder / f".write-test-{config.run_id}"
            probe.touch()
            probe.unlink()
        for folder in (config.output_dir, config.output_dir / "figures", logs):
            for leftover in sweep_stale_temporaries(folder):
                LOGGER.info("removed %s, left by a job killed while writing", leftover)
        free = shutil.disk_usage(config.work_dir).free
        if free < MIN_WORK_FREE_BYTES:
            LOGGER.warning("the work folder %s has only %.0f MB free (e.g. a container's /tmp); registrations and "
                           "large scans need more: bind scratch space and pass -w/--work-dir", config.work_dir,
                           free / 2**20)
    except OSError as exc:
        raise OutputError(
            f"cannot write to {exc.filename or config.output_dir}: {exc.strerror or exc}. "
            "Choose a writable output_dir (and -w/--work-dir), or fix its permissions "
            "(in a container, mount it read-write)."
        ) from exc
    return logs / f"run-{config.run_id}.log"


def _validate_input(config: RunConfig) -> None:
    """Check the input: un-fetched git-annex content (exit 65), then the official BIDS
    validator, restricted to the selected participants and the dataset-level files (16).

    The validator's time limit is ``$SYNTHSR_BIDS_VALIDATOR_TIMEOUT`` (default 600 s); a
    validator that is missing, crashes or times out gives no verdict: usage error (64).
    """
    from synthsr_bids.errors import InputDataError
    from synthsr_bids.validation import UnfetchedContentError, ValidatorUnavailableError, check_input

    if config.skip_bids_validation:
        LOGGER.info("BIDS validation skipped (--skip-bids-validation)")
        return
    started = time.perf_counter()
    labels = config.participant_labels
    try:
        report = check_input(config.bids_dir, labels)
    except UnfetchedContentError as exc:
        raise InputDataError(str(exc)) from exc
    except ValidatorUnavailableError as exc:
        raise UsageError(str(exc)) from exc
    if report.errors:
        raise ValidationFailedError(
            "the input dataset is not valid BIDS:\n"
            + report.summary()
            + "\nFix the dataset, or run with --skip-bids-validation at your own risk."
        )
    LOGGER.info(
        "BIDS validation passed (%d warnings%s) in %.1f s",
        len(report.warnings),
        "; issues in unselected participants ignored" if labels else "",
        time.perf_counter() - started,
    )


def run_participant(config: RunConfig) -> ExitCode:
    from synthsr_bids import pipeline
    from synthsr_bids.discovery import find_scans
    from synthsr_bids.io import write_text_atomic
    from synthsr_bids.inference.device import DeviceError, resolve_device
    from synthsr_bids.models.registry import ModelError
    from synthsr_bids.models.weights import WeightFileError

    _validate_input(config)
    scans = find_scans(config)
    subjects = sorted({s.subject for s in scans})
    LOGGER.info(
        "%d scan(s) of %d participant(s) selected: %s",
        len(scans),
        len(subjects),
        ", ".join(f"sub-{s}" for s in subjects),
    )
    pipeline.prepare_output_dataset(config, scans)
    write_text_atomic(config.output_dir / "logs" / f"config-{config.run_id}.json", config.dumps() + "\n")

    if config.inference.nthreads:
        import torch

        torch.set_num_threads(config.inference.nthreads)
    try:
        device = resolve_device(config.inference.device)
        network = pipeline.load_network(config)
    except (ModelError, WeightFileError, DeviceError) as exc:
        raise UsageError(str(exc)) from exc
    LOGGER.info(
        "model %s (sha256 %s..., %s) on %s",
        network.info.name,
        network.info.sha256[:12],
        network.info.license,
        device,
    )
    summary = pipeline.run_scans(scans, config=config, network=network, device=device)
    LOGGER.info("participant level finished: %s; outputs in %s", pipeline.summarise(summary), config.output_dir)

    from synthsr_bids.morphometry.participant import run_downstream

    downstream = run_downstream(config, summary, device=device)
    if summary.failed:
        LOGGER.error(
            "%d scan(s) failed: %s",
            len(summary.failed),
            "; ".join(r.scan.relpath for r in summary.failed),
        )
        return ExitCode.SCAN_FAILED
    if downstream.model_error:
        return ExitCode.USAGE
    if downstream.failed:
        LOGGER.error("some lesion-mask, segmentation or report steps failed (see above and the reports)")
        return ExitCode.SCAN_FAILED
    return ExitCode.OK


def _check_group_input(config: RunConfig) -> None:
    from synthsr_bids.errors import NoInputError

    if not (config.output_dir / "dataset_description.json").is_file():
        raise NoInputError(
            f"{config.output_dir} holds no synthsr-bids derivatives (no dataset_description.json): run the "
            "participant level first, or check the output_dir path"
        )


def run_group(config: RunConfig) -> ExitCode:
    """Group level: QC and volume tables, template registration, median template, lesion
    frequency map and the group report, from what participant level wrote
    (see :mod:`synthsr_bids.group.run`)."""
    from synthsr_bids.group.run import run_group_level
    from synthsr_bids.io import write_text_atomic

    write_text_atomic(config.output_dir / "logs" / f"config-{config.run_id}.json", config.dumps() + "\n")
    return run_group_level(config)


def main(argv: Sequence[str] | None = None) -> int:
    from synthsr_bids.cli.parser import parse_args

    config = parse_args(argv)
    setup_logging(config.verbosity)
    try:
        if not config.bids_dir.is_dir():
            from synthsr_bids.errors import NoInputError

            raise NoInputError(f"the BIDS directory {config.bids_dir} does not exist")
        if config.analysis_level == "group":
            _check_group_input(config)  # before anything is created: a mistyped folder stays uncreated
        log_file = _prepare_output(config)
        setup_logging(config.verbosity, log_file)
        LOGGER.info("synthsr-bids %s, run %s", __version__, config.run_id)
        if config.analysis_level == "participant":
            code = run_participant(config)
        else:
            code = run_group(config)
    except SynthSRBidsError as exc:
        LOGGER.error("%s", exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        LOGGER.error("interrupted")
        return 130
    return int(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
