"""Find the anatomical scans to process with pybids.

The raw dataset is indexed once with :class:`bids.layout.BIDSLayout` (derivatives,
``code/``, ``sourcedata/`` excluded; unrequested subjects too unless the index is
saved with ``--bids-database-dir``), then queried per contrast with the
participant/session selection and the user's filters. Every
BIDS entity of a source file is kept so that output names can carry them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from synthsr_bids.config import RunConfig
from synthsr_bids.errors import (
    InputDataError,
    NoInputError,
    OutputError,
    SynthSRBidsError,
    UsageError,
)

LOGGER = logging.getLogger(__name__)

#: Anatomical suffixes of quantitative (parametric) maps in the BIDS specification, plus the
#: MP2RAGE uniform image: accepted with --contrasts, with a warning.
PARAMETRIC_SUFFIXES = frozenset({
    "T1map", "R1map", "T2map", "R2map", "T2starmap", "R2starmap", "PDmap", "MTRmap", "MTsat", "UNIT1",
    "T1rho", "MWFmap", "MTVmap", "Chimap", "S0map", "M0map", "TB1map", "RB1map",
})

#: Order of entities in BIDS file names (specification, "Entity table").
ENTITY_ORDER: tuple[str, ...] = (
    "subject",
    "session",
    "task",
    "acquisition",
    "ceagent",
    "reconstruction",
    "direction",
    "run",
    "echo",
    "flip",
    "inversion",
    "mtransfer",
    "part",
    "chunk",
)
#: Short keys used in BIDS file names.
ENTITY_KEYS: Mapping[str, str] = {
    "subject": "sub",
    "session": "ses",
    "task": "task",
    "acquisition": "acq",
    "ceagent": "ce",
    "reconstruction": "rec",
    "direction": "dir",
    "run": "run",
    "echo": "echo",
    "flip": "flip",
    "inversion": "inv",
    "mtransfer": "mt",
    "part": "part",
    "chunk": "chunk",
}


@dataclass(frozen=True)
class ScanInput:
    """One anatomical image selected for synthesis."""

    path: Path
    """Absolute path in the raw dataset."""
    relpath: str
    """Path relative to the dataset root (POSIX separators)."""
    suffix: str
    entities: Mapping[str, str] = field(default_factory=dict)
    """Filename entities (long pybids names -> label as written in the name)."""

    @property
    def subject(self) -> str:
        return self.entities["subject"]

    @property
    def session(self) -> str | None:
        return self.entities.get("session")

    @property
    def label(self) -> str:
        """Short human-readable name used in logs."""
        return Path(self.relpath).name


def parse_entities(filename: str) -> dict[str, str]:
    """Entities of a BIDS file name, as written (keeps zero padding: ``run-01``).

    >>> parse_entities("sub-01_ses-a_acq-ax_run-02_FLAIR.nii.gz")
    {'subject': '01', 'session': 'a', 'acquisition': 'ax', 'run': '02'}
    """
    stem = filename.split(".", 1)[0]
    keys_to_names = {v: k for k, v in ENTITY_KEYS.items()}
    entities: dict[str, str] = {}
    for part in stem.split("_")[:-1]:
        key, sep, value = part.partition("-")
        if sep and key in keys_to_names:
            entities[keys_to_names[key]] = value
    return entities


def _filters_for(suffix: str, bids_filters: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Merge the ``anat`` filters with the suffix-specific ones (suffix wins)."""
    from bids.layout import Query

    merged: dict[str, Any] = {}
    for key in ("anat", suffix.lower()):
        for entity, value in (bids_filters.get(key) or {}).items():
            if value is None:
                value = Query.NONE
            elif value == "*":
                value = Query.ANY
            merged[entity] = value
    return merged


def sidecar_filter_keys(bids_filters: Mapping[str, Mapping[str, Any]], contrasts: Sequence[str]) -> list[str]:
    """Keys of the filters that apply (``anat`` and the selected contrasts, as :func:`_filters_for`)
    that are not BIDS entities, i.e. JSON sidecar fields (e.g. ``MagneticFieldStrength``): pybids can
    only query those from an index of every sidecar. A reused fMRIPrep file's ``bold`` section does not count."""
    from bids.layout.models import Config

    entities = set(Config.load("bids").entities)
    sections = ("anat", *(c.lower() for c in contrasts))
    return sorted({key for section in sections for key in (bids_filters.get(section) or {}) if key not in entities})


#: Bump when the way the index is built changes, so older saved indexes are not reused.
_INDEX_FORMAT = 1
#: Name of pybids' SQLite file inside a database folder.
_PYBIDS_DB_FILE = "layout_index.sqlite"
#: Human-readable description of a saved index, written next to pybids' file.
_INDEX_INFO_FILE = "synthsr_bids_index.json"


def _base_ignore() -> list[Any]:
    """Paths never indexed: non-raw folders, hidden files, non-anatomical data."""
    return [
        "code",
        "sourcedata",
        "derivatives",
        "stimuli",
        "models",
        re.compile(r"/\."),
        re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?(?!anat)[a-z]+/"),
    ]


def check_database_dir(database_dir: Path, bids_dir: Path) -> Path:
    """The resolved ``--bids-database-dir``; refuse one inside the input dataset (never written to),
    except under its ``derivatives/`` (where outputs may go too, and which is never indexed)."""
    database = Path(database_dir).expanduser().resolve()
    bids = Path(bids_dir).expanduser().resolve()
    if database.is_relative_to(bids) and not database.is_relative_to(bids / "derivatives"):
        raise UsageError(
            f"--bids-database-dir {database} is inside the input dataset {bids}; "
            "synthsr-bids never writes into the input dataset. Fix: choose a folder "
            f"outside it, e.g. {bids.parent / (bids.name + '_pybids_db')}, one under "
            "the work directory, or one under its derivatives/."
        )
    return database


def _index_settings(bids_dir: Path, ignore: list[Any], index_metadata: bool) -> dict[str, Any]:
    """Everything the content of a saved index depends on (participants excluded:
    a saved index always covers every participant)."""
    import bids

    return {
        "format": _INDEX_FORMAT,
        "bids_dir": str(bids_dir),
        "ignore": [
            f"re:{item.pattern}" if isinstance(item, re.Pattern) else f"path:{item}"
            for item in ignore
        ],
        "validate": False,
        "index_metadata": index_metadata,
        "derivatives": False,
        "pybids": bids.__version__,
    }


def database_folder(database_dir: Path, settings: Mapping[str, Any]) -> Path:
    """Subfolder of ``database_dir`` holding the index for ``settings``.

    Named by a short hash so that one ``--bids-database-dir`` can hold indexes of
    several datasets (or pybids versions) without ever mixing them up."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return database_dir / f"layout-{digest}"


def _close(layout) -> None:
    """Release pybids' SQLite connections (before the folder is renamed or removed)."""
    manager = getattr(layout, "connection_manager", None)
    if manager is None:
        return
    session = getattr(manager, "_session", None)
    if session is not None:
        session.close()
    manager.engine.dispose()


#: an index build untouched for this long was killed. pybids commits its SQLite file only after the
#: whole walk of the dataset (and again after the sidecars), which can take hours on a very large
#: dataset, so a live build may look untouched for that long: a day is far beyond any build.
STALE_BUILD_SECONDS = 24 * 3600.0


def sweep_stale_index_builds(database_dir: Path, *, older_than_s: float = STALE_BUILD_SECONDS) -> list[Path]:
    """Delete the temporary index folders (``.layout-*.tmp-*``) of killed builds in ``database_dir``.

    Only those in which nothing changed for ``older_than_s`` (the newest modification time of the
    folder and its files): a concurrent job may still be building the others. Returns what went."""
    removed: list[Path] = []
    now = time.time()
    for leftover in database_dir.glob(".layout-*.tmp-*"):
        try:
            if not leftover.is_dir() or leftover.is_symlink():
                continue
            newest = max([leftover.stat().st_mtime] + [p.stat().st_mtime for p in leftover.rglob("*")])
        except OSError:  # removed meanwhile by the job that owns it
            continue
        if now - newest > older_than_s:
            shutil.rmtree(leftover, ignore_errors=True)
            if not leftover.exists():
                removed.append(leftover)
    return removed


def _load_or_build_database(target: Path, settings: Mapping[str, Any], build):
    """A layout backed by the complete saved index in ``target``.

    An existing index is only read. Otherwise the index is built by ``build(path)``
    into a temporary sibling folder that is then renamed into place, so other jobs
    never see a half-written index; if another job renamed its copy first, ours is
    discarded and theirs is used.
    """
    from bids.layout import BIDSLayout

    if (target / _PYBIDS_DB_FILE).is_file():
        LOGGER.debug("reusing the saved pybids index in %s", target)
        return BIDSLayout(database_path=str(target), validate=False)

    for leftover in sweep_stale_index_builds(target.parent) if target.parent.is_dir() else ():
        LOGGER.info("removed %s, an index build left by a killed job", leftover)
    # not tempfile.mkdtemp: its 0700 mode would keep the shared index from other users
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OutputError(
            f"cannot write the pybids index in {target.parent}: {exc.strerror or exc}. "
            "Choose a writable --bids-database-dir."
        ) from exc
    try:
        layout = build(tmp)
        _close(layout)
        (tmp / _INDEX_INFO_FILE).write_text(json.dumps(dict(settings), indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, target)
            LOGGER.info("saved the pybids index of %s in %s", settings["bids_dir"], target)
        except OSError:
            # another job finished first (the target exists and is not empty)
            if not (target / _PYBIDS_DB_FILE).is_file():
                raise
            LOGGER.debug("another job saved the pybids index in %s first; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BIDSLayout(database_path=str(target), validate=False)


def build_layout(config: RunConfig):
    """Index the raw dataset with pybids (no pybids validation: the official
    validator runs separately).

    Without ``--bids-database-dir`` only the selected participants are indexed (in
    memory). With it, every participant is indexed once and saved in a subfolder of
    that directory keyed by the dataset path, the index settings and the pybids
    version; later runs and concurrent jobs of the same dataset, whatever their
    participant selection, read it back (files added since are not seen, as in
    fMRIPrep).
    """
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    bids_dir = Path(config.bids_dir).expanduser().resolve()
    database = (
        check_database_dir(config.bids_database_dir, bids_dir)
        if config.bids_database_dir is not None
        else None
    )
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputDataError(
            f"{config.bids_dir} is not a BIDS dataset: dataset_description.json is "
            "missing. Point bids_dir at the dataset root."
        )
    ignore = _base_ignore()
    if config.participant_labels and database is None:
        # in-memory index: skip unrequested participants (the query filters anyway)
        wanted = "|".join(re.escape(lbl) for lbl in config.participant_labels)
        ignore.append(re.compile(rf"^/sub-(?!({wanted})(/|$))"))

    # The sidecars are read only when a filter asks for one of their fields: reading them costs indexing
    # time on big datasets, and one malformed JSON file anywhere would stop every job.
    sidecar_keys = sidecar_filter_keys(config.bids_filters, config.contrasts)

    def build(database_path: Path | None):
        indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=bool(sidecar_keys))
        return BIDSLayout(
            str(bids_dir),
            validate=False,
            derivatives=False,
            indexer=indexer,
            database_path=str(database_path) if database_path is not None else None,
        )

    try:
        if database is None:
            return build(None)
        settings = _index_settings(bids_dir, ignore, index_metadata=bool(sidecar_keys))
        return _load_or_build_database(database_folder(database, settings), settings, build)
    except SynthSRBidsError:
        raise
    except Exception as exc:  # pybids raises several error types for broken datasets
        fix = (f" The BIDS filter file selects on JSON sidecar fields ({', '.join(sidecar_keys)}), so every sidecar "
               "is read: repair the file named above, or filter on filename entities only." if sidecar_keys else "")
        raise InputDataError(f"{config.bids_dir}: pybids could not index the dataset: {str(exc).rstrip('.')}.{fix}") from exc


def find_scans(config: RunConfig, layout=None) -> list[ScanInput]:
    """Anatomical scans selected by ``config``, sorted by path.

    Raises :class:`NoInputError` when a requested participant does not exist or when
    nothing matches the selection.
    """
    from bids.layout import Query

    layout = layout if layout is not None else build_layout(config)
    root = Path(layout.root)  # bids_dir as indexed (resolved)
    available = set(layout.get_subjects())
    missing = [lbl for lbl in config.participant_labels if lbl not in available]
    if missing:
        raise NoInputError(
            f"participant(s) {', '.join('sub-' + m for m in missing)} not found in "
            f"{config.bids_dir} (found: {', '.join(sorted(available)) or 'none'})"
        )

    maps = [c for c in config.contrasts if c in PARAMETRIC_SUFFIXES]
    if maps:
        LOGGER.warning("--contrasts %s: parametric maps (quantitative values, not weighted images) are outside what "
                       "SynthSR is trained on; their synthetic T1w images may be meaningless", " ".join(maps))
    scans: dict[str, ScanInput] = {}
    for suffix in config.contrasts:
        query: dict[str, Any] = {
            "datatype": "anat",
            "suffix": suffix,
            "extension": [".nii", ".nii.gz"],
            "return_type": "object",
        }
        if config.participant_labels:
            query["subject"] = list(config.participant_labels)
        if config.session_labels:
            query["session"] = list(config.session_labels)
        # Magnitude images only, as niworkflows' default queries: phase/real/imaginary parts are
        # not images of anatomy. A bids filter on "part" overrides it (e.g. ["mag", "phase", null]).
        query["part"] = ["mag", Query.NONE]
        query.update(_filters_for(suffix, config.bids_filters))
        for bids_file in layout.get(**query):
            path = Path(bids_file.path)
            relpath = path.relative_to(root).as_posix()
            scans[relpath] = ScanInput(path=path, relpath=relpath, suffix=suffix, entities=parse_entities(path.name))
    if not scans:
        selection = []
        if config.participant_labels:
            selection.append("participants " + " ".join(config.participant_labels))
        if config.session_labels:
            selection.append("sessions " + " ".join(config.session_labels))
        raise NoInputError(
            f"no anatomical image with suffix {'/'.join(config.contrasts)} in "
            f"{config.bids_dir}" + (f" for {', '.join(selection)}" if selection else "")
            + (" after applying the BIDS filter file" if config.bids_filters else "")
        )
    return [scans[key] for key in sorted(scans)]
