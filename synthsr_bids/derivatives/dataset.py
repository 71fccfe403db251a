"""Top-level files of the derivatives dataset, safe under concurrent jobs.

Hundreds of participant-level jobs may share one output folder (SLURM arrays,
BABS). The shared files (``dataset_description.json``, ``descriptions.tsv``,
``.bidsignore``) are therefore

* created exclusively: written to a temporary sibling, then ``os.link``-ed to the
  final name, which fails if another job won the race (never a half-written file);
* merged, not overwritten: rows/lines are added under a file lock
  (``.synthsr-bids.lock``) and the result is renamed into place, then re-read to
  confirm, so even where the lock is ineffective (some network filesystems) a
  reader never sees a torn file and a lost update is retried.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import platform
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from filelock import FileLock

from synthsr_bids import CODE_URL, __version__
from synthsr_bids.errors import OutputError
from synthsr_bids.io import _temporary_sibling, write_text_atomic

LOGGER = logging.getLogger(__name__)

BIDS_VERSION = "1.10.0"
LOCK_NAME = ".synthsr-bids.lock"
GROUP_LOCK_NAME = ".synthsr-bids-group.lock"
#: Non-BIDS outputs hidden from the validator (bids-validator-deno does not match the
#: trailing-slash folder forms, so folders are listed without it).
BIDSIGNORE_LINES: tuple[str, ...] = (
    "logs",
    "sub-*/log",
    "figures",
    "sub-*/figures",
    "*.html",
    "*_volumes.tsv",
    "*_xfm.h5",
    "*_xfm.json",
    "group_*",
)
DESCRIPTIONS_HEADER: tuple[str, str] = ("desc_id", "description")


@contextmanager
def output_lock(output_dir: Path, timeout: float = 300.0) -> Iterator[None]:
    """Exclusive lock over the shared files of ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output_dir / LOCK_NAME), timeout=timeout):
        yield


@contextmanager
def group_lock(output_dir: Path) -> Iterator[None]:
    """Exclusive hold of the group-level outputs of ``output_dir`` for one group run at a time.

    Two group runs would each write a whole QC table, median template and report: every file
    whole, but the set mixed from two runs. The second run does not wait (a group run can take
    hours): it stops with :class:`OutputError`. The lock is released when its process ends, so a
    killed run leaves no stale lock.
    """
    from filelock import Timeout

    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(output_dir / GROUP_LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise OutputError(
            f"another group-level run is writing in {output_dir}; wait for it to finish, then run again "
            f"(the lock {output_dir / GROUP_LOCK_NAME} is released when that run ends)"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def container_info(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``GeneratedBy.Container`` when running in Docker or Singularity/Apptainer."""
    env = os.environ if environ is None else environ
    if env.get("SYNTHSR_BIDS_CONTAINER_TYPE"):
        info = {"Type": env["SYNTHSR_BIDS_CONTAINER_TYPE"]}
        if env.get("SYNTHSR_BIDS_CONTAINER_TAG"):
            info["Tag"] = env["SYNTHSR_BIDS_CONTAINER_TAG"]
        for key in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
            if env.get(key):  # a Docker image run by Singularity/Apptainer
                info = {"Type": "singularity", "URI": env[key], **({"Tag": info["Tag"]} if "Tag" in info else {})}
        return info
    for key in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        if env.get(key):
            return {"Type": "singularity", "URI": env[key]}
    return None


def dataset_description(bids_dir: Path, raw_description: Mapping[str, Any]) -> dict[str, Any]:
    """Content of the derivatives' ``dataset_description.json``."""
    generated_by: dict[str, Any] = {
        "Name": "synthsr-bids",
        "Version": __version__,
        "CodeURL": CODE_URL,
        "Description": "SynthSR (Iglesias et al., NeuroImage 2021; Science Advances 2023) as a BIDS App",
    }
    container = container_info()
    if container:
        generated_by["Container"] = container
    source: dict[str, Any] = {"URL": bids_dir.as_uri()}
    if raw_description.get("DatasetDOI"):
        source["DOI"] = raw_description["DatasetDOI"]
    if raw_description.get("Version") or raw_description.get("DatasetVersion"):
        source["Version"] = raw_description.get("Version") or raw_description.get("DatasetVersion")
    description: dict[str, Any] = {
        "Name": f"synthsr-bids derivatives of {raw_description.get('Name', bids_dir.name)}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": bids_dir.as_uri()},
    }
    if raw_description.get("License"):
        description["License"] = raw_description["License"]
    return description


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` unless it exists; never exposes a partial file."""
    tmp = _temporary_sibling(path)
    tmp.write_text(text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this filesystem: fall back to lock + rename
        with output_lock(path.parent):
            if path.exists():
                return False
            os.replace(tmp, path)
            return True
    finally:
        tmp.unlink(missing_ok=True)


def ensure_dataset_description(output_dir: Path, bids_dir: Path) -> Path:
    """Write ``dataset_description.json`` once; later jobs keep the first one."""
    path = output_dir / "dataset_description.json"
    raw_path = bids_dir / "dataset_description.json"
    try:
        raw = json.loads(raw_path.read_text())
    except (OSError, json.JSONDecodeError):
        raw = {}
    text = json.dumps(dataset_description(bids_dir, raw), indent=2) + "\n"
    output_dir.mkdir(parents=True, exist_ok=True)
    if not _create_exclusive(path, text):
        try:
            existing = json.loads(path.read_text())
        except json.JSONDecodeError:
            LOGGER.warning("%s was corrupt and is rewritten", path)
            write_text_atomic(path, text)
        else:
            if existing.get("DatasetType") != "derivative":
                LOGGER.warning("%s exists but is not a derivative description; rewritten", path)
                write_text_atomic(path, text)
    return path


def _read_descriptions(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    rows = list(csv.reader(io.StringIO(path.read_text()), delimiter="\t"))
    return {row[0]: row[1] for row in rows[1:] if len(row) >= 2}


def _merge_until_present(path: Path, render, present, attempts: int = 5) -> None:
    for _ in range(attempts):
        with output_lock(path.parent):
            write_text_atomic(path, render())
        if present():
            return
    raise RuntimeError(f"could not update {path} after {attempts} attempts")


def add_descriptions(output_dir: Path, descriptions: Mapping[str, str]) -> Path:
    """Add ``desc`` rows to ``descriptions.tsv`` (keeps rows written by other jobs).

    Keys are ``desc`` labels; the ``desc_id`` column holds ``desc-<label>`` as the
    specification (and the validator) requires.
    """
    path = output_dir / "descriptions.tsv"
    descriptions = {
        (key if key.startswith("desc-") else f"desc-{key}"): value for key, value in descriptions.items()
    }

    def render() -> str:
        rows = _read_descriptions(path)
        for key, value in descriptions.items():
            rows.setdefault(key, value)
        buffer = io.StringIO()
        writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
        writer.writerow(DESCRIPTIONS_HEADER)
        for key in sorted(rows):
            writer.writerow((key, rows[key]))
        return buffer.getvalue()

    if set(descriptions) <= set(_read_descriptions(path)):
        return path
    _merge_until_present(path, render, lambda: set(descriptions) <= set(_read_descriptions(path)))
    return path


def ensure_bidsignore(output_dir: Path, lines: Iterable[str] = BIDSIGNORE_LINES) -> Path:
    """Make sure ``.bidsignore`` lists ``lines`` (keeps lines added by others)."""
    path = output_dir / ".bidsignore"
    wanted = list(lines)

    def current() -> list[str]:
        return path.read_text().splitlines() if path.is_file() else []

    def render() -> str:
        existing = current()
        return "\n".join(existing + [l for l in wanted if l not in existing]) + "\n"

    if set(wanted) <= set(current()):
        return path
    _merge_until_present(path, render, lambda: set(wanted) <= set(current()))
    return path


def software_versions() -> dict[str, str]:
    """Versions recorded in every sidecar."""
    import nibabel
    import numpy
    import scipy

    versions = {
        "synthsr-bids": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "nibabel": nibabel.__version__,
    }
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return versions
