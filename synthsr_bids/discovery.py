"""Find the anatomical scans to process with pybids.

The raw dataset is indexed once with :class:`bids.layout.BIDSLayout` (derivatives,
``code/``, ``sourcedata/`` and unrequested subjects excluded), then queried per
contrast with the participant/session selection and the user's filters. Every
BIDS entity of a source file is kept so that output names can carry them all.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from synthsr_bids.config import RunConfig
from synthsr_bids.errors import InputDataError, NoInputError

LOGGER = logging.getLogger(__name__)

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
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """The JSON sidecar, after BIDS inheritance."""

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


def build_layout(config: RunConfig):
    """Index the raw dataset with pybids (no pybids validation: the official
    validator runs separately)."""
    from bids.layout import BIDSLayout, BIDSLayoutIndexer

    if not (config.bids_dir / "dataset_description.json").is_file():
        raise InputDataError(
            f"{config.bids_dir} is not a BIDS dataset: dataset_description.json is "
            "missing. Point bids_dir at the dataset root."
        )
    ignore: list[Any] = [
        "code",
        "sourcedata",
        "derivatives",
        "stimuli",
        "models",
        re.compile(r"/\."),
        re.compile(r"^/sub-[^/]+/(ses-[^/]+/)?(?!anat)[a-z]+/"),
    ]
    if config.participant_labels:
        wanted = "|".join(re.escape(lbl) for lbl in config.participant_labels)
        ignore.append(re.compile(rf"^/sub-(?!({wanted})(/|$))"))
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore, index_metadata=True)
    database = config.bids_database_dir
    if database is not None:
        database.mkdir(parents=True, exist_ok=True)
    try:
        return BIDSLayout(
            str(config.bids_dir),
            validate=False,
            derivatives=False,
            indexer=indexer,
            database_path=str(database) if database else None,
        )
    except Exception as exc:  # pybids raises several error types for broken datasets
        raise InputDataError(f"{config.bids_dir}: pybids could not index the dataset: {exc}") from exc


def find_scans(config: RunConfig, layout=None) -> list[ScanInput]:
    """Anatomical scans selected by ``config``, sorted by path.

    Raises :class:`NoInputError` when a requested participant does not exist or when
    nothing matches the selection.
    """
    layout = layout if layout is not None else build_layout(config)
    available = set(layout.get_subjects())
    missing = [lbl for lbl in config.participant_labels if lbl not in available]
    if missing:
        raise NoInputError(
            f"participant(s) {', '.join('sub-' + m for m in missing)} not found in "
            f"{config.bids_dir} (found: {', '.join(sorted(available)) or 'none'})"
        )

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
        query.update(_filters_for(suffix, config.bids_filters))
        for bids_file in layout.get(**query):
            path = Path(bids_file.path)
            relpath = path.relative_to(config.bids_dir).as_posix()
            try:
                metadata = dict(bids_file.get_metadata())
            except Exception:  # an unreadable sidecar must not hide the image
                LOGGER.warning("%s: could not read the JSON sidecar", relpath)
                metadata = {}
            scans[relpath] = ScanInput(
                path=path,
                relpath=relpath,
                suffix=suffix,
                entities=parse_entities(path.name),
                metadata=metadata,
            )
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
