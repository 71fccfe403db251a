"""Run the official BIDS validator (PyPI ``bids-validator-deno``).

Used on the raw input (unless ``--skip-bids-validation``) and by the tests on
everything we write.

Restricting validation to some participants: the validator always reads the whole
dataset, but its ``--config`` JSON file reclassifies issues. Each entry of its
``ignore``/``warning``/``error`` lists is a partial issue (``code``, ``location``, ...);
a ``location`` that does not start with ``/`` is a gitignore-style pattern matched
against the issue's path (``sub-01/**`` matches every file below ``sub-01/``), one
that starts with ``/`` must equal the path. Matching issues get the severity
``ignore``, so they neither count as errors nor change the validator's exit status
(bids-validator ``src/validators/bids.ts`` and ``src/issues/datasetIssues.ts``).
Like fMRIPrep, we ignore every issue located in a participant that was not selected;
dataset-level files are still checked.

The check for un-fetched git-annex (DataLad) content is ours: the validator only
reports such files as unreadable, without saying why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

LOGGER = logging.getLogger(__name__)

VALIDATOR = "bids-validator-deno"

#: Environment variable with the validator's time limit in seconds.
ENV_TIMEOUT = "SYNTHSR_BIDS_VALIDATOR_TIMEOUT"
DEFAULT_TIMEOUT = 600.0

#: What git-annex writes where content is not present: the target of a symlink
#: (locked files) or the first line of a pointer file (unlocked files).
ANNEX_OBJECTS = "/annex/objects/"
#: Unlocked pointer files hold one line (``/annex/objects/<key>``); larger files are data.
_POINTER_MAX_BYTES = 1024


@dataclass(frozen=True)
class ValidationIssue:
    severity: str
    code: str
    location: str
    message: str = ""


@dataclass(frozen=True)
class ValidationReport:
    dataset: Path
    issues: tuple[ValidationIssue, ...]
    participants: tuple[str, ...] = ()
    """Labels (without ``sub-``) validation was restricted to; empty: the whole dataset."""

    @property
    def errors(self) -> tuple[ValidationIssue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")

    @property
    def warnings(self) -> tuple[ValidationIssue, ...]:
        return tuple(i for i in self.issues if i.severity == "warning")

    def summary(self, limit: int = 10) -> str:
        scope = str(self.dataset)
        if self.participants:
            scope += " (participant(s) " + ", ".join(f"sub-{p}" for p in self.participants)
            scope += " and dataset-level files)"
        lines = [f"{len(self.errors)} error(s), {len(self.warnings)} warning(s) in {scope}"]
        for issue in self.errors[:limit]:
            lines.append(f"  {issue.code} {issue.location} {issue.message}".rstrip())
        if len(self.errors) > limit:
            lines.append(f"  ... and {len(self.errors) - limit} more errors")
        return "\n".join(lines)


class ValidatorUnavailableError(RuntimeError):
    """The validator could not give a verdict (not installed, crashed, timed out)."""


class ValidatorTimeoutError(ValidatorUnavailableError):
    """The validator did not finish within its time limit."""

    def __init__(self, message: str, timeout: float) -> None:
        super().__init__(message)
        self.timeout = timeout


def find_validator() -> str:
    """Path of the validator executable (next to this Python first)."""
    candidate = Path(sys.executable).parent / VALIDATOR
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(VALIDATOR)
    if found is None:
        raise ValidatorUnavailableError(
            f"{VALIDATOR} is not installed: `pip install bids-validator-deno`, or run "
            "with --skip-bids-validation"
        )
    return found


def resolve_timeout(timeout: float | None = None) -> float:
    """``timeout`` if given, else ``$SYNTHSR_BIDS_VALIDATOR_TIMEOUT``, else 600 s."""
    if timeout is None:
        raw = os.environ.get(ENV_TIMEOUT, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT
        try:
            timeout = float(raw)
        except ValueError:
            timeout = float("nan")
        source = f"{ENV_TIMEOUT}={raw!r}"
    else:
        source = f"timeout={timeout!r}"
    if not timeout > 0 or timeout == float("inf"):
        raise ValidatorUnavailableError(
            f"invalid validator time limit {source}: give a positive number of seconds"
        )
    return float(timeout)


def _gitignore_escape(name: str) -> str:
    """``name`` as a literal gitignore path component."""
    return re.sub(r"([\\*?\[\]!#])", r"\\\1", name)


def subject_dirs(dataset: Path) -> list[str]:
    """Names of the ``sub-*`` folders at the top of ``dataset``, sorted."""
    try:
        entries = list(os.scandir(dataset))
    except OSError:
        return []
    return sorted(e.name for e in entries if e.name.startswith("sub-") and e.is_dir())


def participant_config(dataset: Path, participant_labels: Sequence[str]) -> dict:
    """Validator configuration ignoring every issue located in an unselected participant."""
    selected = {f"sub-{label}" for label in participant_labels}
    ignore = []
    for name in subject_dirs(dataset):
        if name in selected:
            continue
        ignore.append({"location": f"{_gitignore_escape(name)}/**"})
        ignore.append({"location": f"/{name}"})
        ignore.append({"location": f"/{name}/"})
    return {"ignore": ignore}


def _run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` in its own process group; on timeout kill the whole group."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.communicate()
        raise
    except BaseException:
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def validate_dataset(
    dataset: Path,
    *,
    timeout: float | None = None,
    participant_labels: Iterable[str] = (),
) -> ValidationReport:
    """Validate ``dataset`` and return every issue the validator reported.

    ``participant_labels`` (without ``sub-``) restricts the verdict to those
    participants and the dataset-level files: issues located in other ``sub-*``
    folders are reclassified as ``ignore`` through the validator's ``--config``.
    ``timeout`` (seconds) defaults to ``$SYNTHSR_BIDS_VALIDATOR_TIMEOUT``, else 600;
    :class:`ValidatorTimeoutError` is raised when the validator takes longer.
    """
    dataset = Path(dataset)
    labels = tuple(dict.fromkeys(participant_labels))
    limit = resolve_timeout(timeout)
    command = [find_validator(), str(dataset), "--format", "json"]
    with tempfile.TemporaryDirectory(prefix="synthsr-bids-validator-") as scratch:
        if labels:
            config_file = Path(scratch) / "validator-config.json"
            config_file.write_text(json.dumps(participant_config(dataset, labels), indent=1))
            command += ["--config", str(config_file)]
        LOGGER.debug("running %s (time limit %g s)", " ".join(command), limit)
        try:
            completed = _run(command, limit)
        except subprocess.TimeoutExpired:
            raise ValidatorTimeoutError(
                f"{VALIDATOR} timed out after {limit:g} s on {dataset}. Check that the "
                "dataset is readable (e.g. a hung network file system, or git-annex "
                "files that are not fetched), allow more time with "
                f"{ENV_TIMEOUT}=<seconds>, or run with --skip-bids-validation.",
                timeout=limit,
            ) from None
    try:
        payload = json.loads(completed.stdout)
    except json.JSONDecodeError:
        raise ValidatorUnavailableError(
            f"{VALIDATOR} failed (exit {completed.returncode}): "
            f"{(completed.stderr or completed.stdout).strip()[:2000]}"
        ) from None
    messages = payload.get("issues", {}).get("codeMessages", {})
    issues = tuple(
        ValidationIssue(
            severity=str(item.get("severity", "")),
            code=str(item.get("code", "")),
            location=str(item.get("location", "")),
            message=str(item.get("issueMessage") or messages.get(item.get("code"), "")).strip(),
        )
        for item in payload.get("issues", {}).get("issues", [])
    )
    return ValidationReport(dataset=dataset, issues=issues, participants=labels)


def is_unfetched_annex_file(path: Path) -> bool:
    """A git-annex placeholder: a dangling symlink into ``annex/objects`` (locked
    file) or a small pointer file starting with ``/annex/objects/`` (unlocked file)."""
    try:
        if path.is_symlink():
            if path.exists():
                return False
            return ANNEX_OBJECTS in os.readlink(path).replace(os.sep, "/")
        if not path.is_file() or path.stat().st_size > _POINTER_MAX_BYTES:
            return False
        with path.open("rb") as handle:
            return handle.read(len(ANNEX_OBJECTS)) == ANNEX_OBJECTS.encode()
    except OSError:
        return False


def _files_below(folder: Path) -> Iterator[Path]:
    for parent, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield Path(parent) / name


def find_unfetched_annex_files(dataset: Path, participant_labels: Iterable[str] = ()) -> list[Path]:
    """Paths (relative to ``dataset``) of git-annex files whose content is not present.

    Looks at the top-level files of ``dataset`` and at every file of the selected
    participants (all ``sub-*`` folders when ``participant_labels`` is empty).
    """
    dataset = Path(dataset)
    labels = tuple(participant_labels)
    names = [f"sub-{label}" for label in labels] if labels else subject_dirs(dataset)
    candidates: list[Path] = []
    try:
        candidates += sorted(
            Path(e.path) for e in os.scandir(dataset) if not e.name.startswith(".") and not e.is_dir()
        )
    except OSError:
        pass
    for name in names:
        if (dataset / name).is_dir():
            candidates += _files_below(dataset / name)
    return [path.relative_to(dataset) for path in candidates if is_unfetched_annex_file(path)]


def unfetched_annex_message(dataset: Path, missing: Sequence[Path], *, limit: int = 20) -> str:
    """What to tell a user about :func:`find_unfetched_annex_files`'s ``missing`` files: up to
    ``limit`` of them, and the ``datalad get`` (or ``git annex get``) command that fetches them
    (their participants' folders when there are more)."""
    import shlex

    shown = [Path(p).as_posix() for p in missing]
    listing = "\n".join(f"  {p}" for p in shown[:limit])
    if len(shown) > limit:
        listing += f"\n  ... and {len(shown) - limit} more"
    targets = shown if len(shown) <= limit else sorted({Path(p).parts[0] for p in missing})
    paths = " ".join(shlex.quote(t) for t in targets)
    folder = shlex.quote(str(dataset))
    return (
        f"{len(shown)} file(s) of {dataset} are git-annex (DataLad) placeholders whose content has not been "
        f"fetched:\n{listing}\nFetch the content first: cd {folder} && datalad get {paths}\n"
        f"(or, without DataLad: cd {folder} && git annex get {paths}), then run again."
    )


class UnfetchedContentError(RuntimeError):
    """Files of the dataset are git-annex placeholders; the message names them and the fix."""


def check_input(dataset: Path, participant_labels: Sequence[str] = ()) -> ValidationReport:
    """The input checks of a run: un-fetched git-annex content of the selected participants
    (:class:`UnfetchedContentError`), then the official validator on them
    (:class:`ValidatorUnavailableError` when it gives no verdict). Returns the validator's report."""
    missing = find_unfetched_annex_files(dataset, participant_labels)
    if missing:
        raise UnfetchedContentError(unfetched_annex_message(dataset, missing))
    return validate_dataset(dataset, participant_labels=participant_labels)
