"""Model registry: which network weights exist, where they live, and whether they are intact.

The registered models are data (``synthsr_bids/data/models.json``), not code, so shipping a
new model (or filling in the checksum of the bundled one) only edits that file. Sites can add
their own entries with a JSON file of the same schema named by ``$SYNTHSR_BIDS_EXTRA_MODELS``.

:func:`resolve_model` never downloads anything: a registered model that is not in the cache
raises :class:`ModelNotAvailableError` whose message gives the exact ``synthsr-models``
command to run. Downloads live in :mod:`synthsr_bids.models.fetch`.

SHA-256 checks of large files are cached: a small JSON record keyed by the file's resolved
path stores its size, modification time and digest under ``<cache>/.sha256/``, so a 100 MB
model is hashed once, not on every run. This module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from synthsr_bids.hashing import sha256_file

__all__ = [
    "BUNDLED_MODELS_DIR",
    "DEFAULT_MODEL",
    "ENV_CACHE_DIR",
    "ENV_EXTRA_MODELS",
    "REGISTRY",
    "USER_LICENSE",
    "WEIGHT_SUFFIXES",
    "ModelError",
    "ModelIntegrityError",
    "ModelNotAvailableError",
    "ModelSpec",
    "ModelStatus",
    "ResolvedModel",
    "bundled_path",
    "cached_path",
    "file_sha256",
    "find_spec_by_digest",
    "hash_file",
    "is_valid_model_name",
    "get_registry",
    "load_registry_file",
    "model_status",
    "models_cache_dir",
    "resolve_model",
    "user_model_path",
    "user_models_dir",
    "write_hash_record",
]

LOGGER = logging.getLogger(__name__)

ENV_CACHE_DIR = "SYNTHSR_BIDS_MODELS"
ENV_EXTRA_MODELS = "SYNTHSR_BIDS_EXTRA_MODELS"
USER_LICENSE = "unknown (user-provided)"
WEIGHT_SUFFIXES = (".h5", ".safetensors")
FILE_FORMATS = {".h5": "keras-h5", ".safetensors": "safetensors"}
SCHEMA_VERSION = 1

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HASH_RECORD_DIR = ".sha256"
_USER_DIR = "user"
_CHUNK = 1 << 20

#: Where bundled weights live inside the installed package (``synthsr_bids/data/models``).
BUNDLED_MODELS_DIR = Path(str(resources.files("synthsr_bids").joinpath("data", "models")))


class ModelError(RuntimeError):
    """Base class for model registry, cache and download errors."""


class ModelNotAvailableError(ModelError):
    """The requested model cannot be used yet; the message says how to get it."""


class ModelIntegrityError(ModelError):
    """A model file does not have the registered size or SHA-256."""


@dataclass(frozen=True)
class ModelSpec:
    """One registered set of network weights.

    ``size`` and ``sha256`` may be ``None`` only for a bundled model that is not shipped yet.
    ``url`` is ``None`` when there is no public download (the file must be imported).
    """

    name: str
    version: str
    description: str
    filename: str
    url: str | None
    size: int | None
    sha256: str | None
    license: str
    file_format: str
    citation: str
    bundled: bool
    in_channels: int = 1
    mirrors: tuple[str, ...] = ()

    @property
    def urls(self) -> tuple[str, ...]:
        """The primary URL followed by the mirrors (empty when there is no public download)."""
        return ((self.url,) if self.url else ()) + self.mirrors


@dataclass(frozen=True)
class ResolvedModel:
    """A model file on disk whose SHA-256 has been checked (or computed, for user files)."""

    name: str
    path: Path
    sha256: str
    license: str
    spec: ModelSpec | None


# --------------------------------------------------------------------------- registry data


def _parse_spec(entry: object, *, source: str, allow_bundled: bool) -> ModelSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{source}: every item of 'models' must be a JSON object, got {entry!r}")
    where = f"{source}: model {entry.get('name', '?')!r}"
    required = ("name", "version", "description", "filename", "license", "file_format", "citation")
    missing = [key for key in required if not isinstance(entry.get(key), str) or not entry.get(key)]
    if missing:
        raise ValueError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
    known = set(required) | {"url", "mirrors", "size", "sha256", "bundled", "in_channels"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    name = entry["name"]
    if not _NAME_RE.match(name):
        raise ValueError(f"{where}: names may only use letters, digits, '.', '_' and '-'")
    filename = entry["filename"]
    if Path(filename).name != filename or Path(filename).suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{where}: filename must be a bare file name ending in {' or '.join(WEIGHT_SUFFIXES)}")
    if entry["file_format"] != FILE_FORMATS[Path(filename).suffix]:
        raise ValueError(f"{where}: file_format {entry['file_format']!r} does not match the file name {filename!r}")
    bundled = entry.get("bundled", False)
    if not isinstance(bundled, bool):
        raise ValueError(f"{where}: 'bundled' must be true or false")
    if bundled and not allow_bundled:
        raise ValueError(f"{where}: only the packaged registry may declare bundled models")
    sha256 = entry.get("sha256")
    size = entry.get("size")
    if sha256 is None or size is None:
        if not bundled:
            raise ValueError(f"{where}: 'size' and 'sha256' are required (null is allowed only for a bundled model)")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256_RE.match(sha256)):
        raise ValueError(f"{where}: sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"{where}: size must be a positive integer number of bytes, got {size!r}")
    url = entry.get("url")
    mirrors = entry.get("mirrors", [])
    if url is not None and not isinstance(url, str):
        raise ValueError(f"{where}: url must be a string or null")
    if not isinstance(mirrors, list) or not all(isinstance(m, str) and m for m in mirrors):
        raise ValueError(f"{where}: mirrors must be a list of URLs")
    in_channels = entry.get("in_channels", 1)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"{where}: in_channels must be a positive integer")
    return ModelSpec(
        name=name,
        version=entry["version"],
        description=entry["description"],
        filename=filename,
        url=url or None,
        size=size,
        sha256=sha256,
        license=entry["license"],
        file_format=entry["file_format"],
        citation=entry["citation"],
        bundled=bundled,
        in_channels=in_channels,
        mirrors=tuple(mirrors),
    )


def _parse_registry(text: str, *, source: str, allow_bundled: bool) -> tuple[dict[str, ModelSpec], str | None]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc}); fix the file or remove it") from exc
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise ValueError(f"{source}: expected a JSON object with a 'models' list")
    if document.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ValueError(f"{source}: schema_version {document.get('schema_version')!r} is not supported "
                         f"(this synthsr-bids reads version {SCHEMA_VERSION})")
    specs: dict[str, ModelSpec] = {}
    for entry in document["models"]:
        spec = _parse_spec(entry, source=source, allow_bundled=allow_bundled)
        if spec.name in specs:
            raise ValueError(f"{source}: model {spec.name!r} is declared twice")
        specs[spec.name] = spec
    default = document.get("default")
    if default is not None and default not in specs:
        raise ValueError(f"{source}: default model {default!r} is not one of {sorted(specs)}")
    return specs, default


def load_registry_file(path: Path) -> dict[str, ModelSpec]:
    """Read a site registry (same schema as the packaged ``models.json``; no bundled models)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read model registry ({exc.strerror}); "
                         f"fix the path or unset ${ENV_EXTRA_MODELS}") from exc
    specs, _ = _parse_registry(text, source=str(path), allow_bundled=False)
    return specs


def _load_packaged() -> tuple[Mapping[str, ModelSpec], str]:
    resource = resources.files("synthsr_bids").joinpath("data", "models.json")
    specs, default = _parse_registry(resource.read_text(encoding="utf-8"), source=str(resource), allow_bundled=True)
    if default is None:
        raise ValueError(f"{resource}: the packaged registry must name a 'default' model")
    return MappingProxyType(specs), default


REGISTRY, DEFAULT_MODEL = _load_packaged()


def get_registry() -> Mapping[str, ModelSpec]:
    """The packaged registry plus the entries of ``$SYNTHSR_BIDS_EXTRA_MODELS`` (read at each call)."""
    extra_path = os.environ.get(ENV_EXTRA_MODELS)
    if not extra_path:
        return REGISTRY
    extra = load_registry_file(Path(extra_path))
    clash = sorted(set(extra) & set(REGISTRY))
    if clash:
        raise ValueError(f"{extra_path}: model name(s) {', '.join(clash)} are already registered by synthsr-bids; "
                         f"rename them in ${ENV_EXTRA_MODELS}")
    return MappingProxyType({**REGISTRY, **extra})


# --------------------------------------------------------------------------- locations


def models_cache_dir() -> Path:
    """``$SYNTHSR_BIDS_MODELS``, else ``$XDG_CACHE_HOME/synthsr-bids/models``, else ``~/.cache/synthsr-bids/models``."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "synthsr-bids" / "models"
    return Path.home() / ".cache" / "synthsr-bids" / "models"


def cached_path(spec: ModelSpec, cache_dir: Path | None = None) -> Path:
    """Where ``spec`` lives: inside the package for bundled models, else in the cache."""
    if spec.bundled:
        return bundled_path(spec)
    return (cache_dir if cache_dir is not None else models_cache_dir()) / spec.filename


def bundled_path(spec: ModelSpec) -> Path:
    return BUNDLED_MODELS_DIR / spec.filename


def user_models_dir(cache_dir: Path | None = None) -> Path:
    """Where ``synthsr-models import`` puts files that match no registered model."""
    return (cache_dir if cache_dir is not None else models_cache_dir()) / _USER_DIR


def is_valid_model_name(name: str) -> bool:
    """Model names use letters, digits, '.', '_' and '-' (they become file names)."""
    return bool(_NAME_RE.match(name))


def user_model_path(name: str, cache_dir: Path | None = None) -> Path | None:
    """The imported user model called ``name``, if there is one."""
    if not _NAME_RE.match(name):
        return None
    for suffix in WEIGHT_SUFFIXES:
        candidate = user_models_dir(cache_dir) / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


# --------------------------------------------------------------------------- hashing


def hash_file(path: Path) -> str:
    """SHA-256 hex digest of a file (no record)."""
    return sha256_file(path)


def _record_path(path: Path, cache_dir: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:32]
    return cache_dir / _HASH_RECORD_DIR / f"{key}.json"


def file_sha256(path: Path, *, cache_dir: Path | None = None, force: bool = False) -> str:
    """SHA-256 of ``path``, reusing a record in ``<cache>/.sha256/`` while size and mtime are unchanged.

    ``force=True`` re-reads the file and refreshes the record. An unwritable cache only
    disables the record (read-only containers still work).
    """
    path = Path(path)
    cache_dir = cache_dir if cache_dir is not None else models_cache_dir()
    stat = path.stat()
    record_file = _record_path(path, cache_dir)
    resolved = str(path.resolve())
    if not force:
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
            if (record.get("path") == resolved and record.get("size") == stat.st_size
                    and record.get("mtime_ns") == stat.st_mtime_ns and _SHA256_RE.match(record.get("sha256", ""))):
                return record["sha256"]
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    digest = hash_file(path)
    write_hash_record(path, digest, cache_dir=cache_dir)
    return digest


def write_hash_record(path: Path, sha256: str, *, cache_dir: Path | None = None) -> None:
    """Remember that ``path`` (at its current size and mtime) has digest ``sha256``."""
    cache_dir = cache_dir if cache_dir is not None else models_cache_dir()
    stat = Path(path).stat()
    record_file = _record_path(Path(path), cache_dir)
    record = {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:
        record_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = record_file.with_name(f"{record_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, record_file)
    except OSError as exc:
        LOGGER.debug("Cannot record the SHA-256 of %s in %s (%s); it will be recomputed next time",
                     path, cache_dir, exc)


def find_spec_by_digest(size: int, sha256: str, registry: Mapping[str, ModelSpec] | None = None) -> ModelSpec | None:
    """The registered model whose size and SHA-256 are exactly these, if any."""
    for spec in (registry if registry is not None else get_registry()).values():
        if spec.sha256 == sha256 and spec.size == size:
            return spec
    return None


# --------------------------------------------------------------------------- resolution


def _official_alternative(registry: Mapping[str, ModelSpec]) -> str:
    for spec in registry.values():
        if not spec.bundled and spec.url:
            return spec.name
    return "synthsr-v1"


def _fetch_hint(spec: ModelSpec) -> str:
    freesurfer_copy = ""
    home = os.environ.get("FREESURFER_HOME")
    if home:
        candidate = Path(home) / "models" / spec.filename
        if candidate.is_file():
            freesurfer_copy = f" Your FreeSurfer install has a copy: run `synthsr-models import {candidate}`."
    if spec.urls:
        return f"Run `synthsr-models fetch {spec.name}` to download it.{freesurfer_copy}"
    return (f"There is no public download for it: copy {spec.filename} from a FreeSurfer 7.4+ install "
            f"($FREESURFER_HOME/models/{spec.filename}) and run `synthsr-models import PATH`.{freesurfer_copy}")


def _looks_like_path(text: str) -> bool:
    return (os.sep in text or (os.altsep is not None and os.altsep in text) or text.startswith(("~", "."))
            or text.endswith(WEIGHT_SUFFIXES))


def _resolve_path(text: str, *, cache_dir: Path, registry: Mapping[str, ModelSpec]) -> ResolvedModel:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ModelNotAvailableError(f"Model file {path} does not exist (or is not a file); "
                                     f"check the path, or use a registered model name: {', '.join(registry)}.")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelNotAvailableError(f"Model file {path} has suffix {path.suffix!r}; synthsr-bids reads Keras "
                                     f".h5 files and .safetensors files only. Convert the weights or pass the "
                                     f"right file.")
    path = path.resolve()
    sha256 = file_sha256(path, cache_dir=cache_dir)
    spec = find_spec_by_digest(path.stat().st_size, sha256, registry)
    if spec is not None:
        LOGGER.info("%s is a copy of the registered model %s (%s)", path, spec.name, spec.license)
    return ResolvedModel(name=path.stem, path=path, sha256=sha256,
                         license=spec.license if spec is not None else USER_LICENSE, spec=spec)


def _resolve_spec(spec: ModelSpec, *, cache_dir: Path, registry: Mapping[str, ModelSpec]) -> ResolvedModel:
    path = cached_path(spec, cache_dir)
    if spec.bundled and (spec.sha256 is None or not path.is_file()):
        other = _official_alternative(registry)
        raise ModelNotAvailableError(
            f"The bundled model {spec.name!r} is not yet shipped with this version of synthsr-bids "
            f"(expected {path}). Use an official SynthSR model instead: run `synthsr-models fetch {other}` "
            f"and select it with `--model {other}` (or pass the path to your own .h5/.safetensors file).")
    if not path.is_file():
        partial = path.with_name(path.name + ".part")
        detail = " A partial download exists; fetching again resumes it." if partial.exists() else ""
        raise ModelNotAvailableError(f"Model {spec.name!r} is not in the model cache ({path}).{detail} "
                                     f"{_fetch_hint(spec)}")
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        raise ModelNotAvailableError(
            f"Model file {path} has {size} bytes but {spec.name} has {spec.size}; the file is incomplete or "
            f"corrupt. {_fetch_hint(spec) if not spec.bundled else 'Reinstall synthsr-bids.'}")
    sha256 = file_sha256(path, cache_dir=cache_dir)
    if sha256 != spec.sha256:
        raise ModelNotAvailableError(
            f"Model file {path} is corrupt: sha256 {sha256} but {spec.name} must have {spec.sha256}. "
            f"{_fetch_hint(spec) if not spec.bundled else 'Reinstall synthsr-bids.'}")
    return ResolvedModel(name=spec.name, path=path, sha256=sha256, license=spec.license, spec=spec)


def resolve_model(name_or_path: str | os.PathLike[str] | None, *, cache_dir: Path | None = None,
                  registry: Mapping[str, ModelSpec] | None = None) -> ResolvedModel:
    """Find a usable, checksum-verified model file. Never downloads.

    ``None`` means :data:`DEFAULT_MODEL`. A registered name resolves to the cached (or bundled)
    file; a name given to ``synthsr-models import`` resolves to the imported file; anything
    else is treated as a path to a ``.h5`` or ``.safetensors`` file.

    Raises:
        ModelNotAvailableError: the model is missing or corrupt; the message says which
            ``synthsr-models`` command fixes it.
    """
    registry = registry if registry is not None else get_registry()
    cache_dir = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    if isinstance(name_or_path, os.PathLike):
        return _resolve_path(os.fspath(name_or_path), cache_dir=cache_dir, registry=registry)
    text = str(name_or_path).strip()
    if not text:
        raise ModelNotAvailableError(f"Empty model name; use one of {', '.join(registry)} or a file path.")
    if text in registry:
        return _resolve_spec(registry[text], cache_dir=cache_dir, registry=registry)
    user_file = user_model_path(text, cache_dir)
    if user_file is not None:
        sha256 = file_sha256(user_file, cache_dir=cache_dir)
        return ResolvedModel(name=text, path=user_file, sha256=sha256, license=USER_LICENSE, spec=None)
    if _looks_like_path(text) or Path(text).expanduser().exists():
        return _resolve_path(text, cache_dir=cache_dir, registry=registry)
    raise ModelNotAvailableError(f"Unknown model {text!r}. Registered models: {', '.join(registry)} "
                                 f"(see `synthsr-models list`); or pass the path to a .h5/.safetensors file.")


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ModelStatus:
    """Where a registered model stands in this installation.

    ``status`` is one of ``bundled``, ``not shipped`` (bundled model absent from this version),
    ``cached``, ``partial`` (an interrupted download exists), ``missing``, or ``corrupt``.
    ``sha256`` is the digest read from disk, when it was computed.
    """

    spec: ModelSpec
    path: Path
    status: str
    sha256: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("bundled", "cached")


def model_status(spec: ModelSpec, *, cache_dir: Path | None = None, verify: bool = False) -> ModelStatus:
    """Check whether ``spec`` is usable; ``verify=True`` re-reads the whole file to check its SHA-256."""
    cache_dir = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    path = cached_path(spec, cache_dir)
    present = "bundled" if spec.bundled else "cached"
    if not path.is_file() or (spec.bundled and spec.sha256 is None):
        if spec.bundled:
            return ModelStatus(spec, path, "not shipped", detail="this version of synthsr-bids does not ship it")
        partial = path.with_name(path.name + ".part")
        if partial.is_file():
            return ModelStatus(spec, path, "partial", detail=f"{partial.stat().st_size} of {spec.size} bytes; "
                                                             f"`synthsr-models fetch {spec.name}` resumes it")
        return ModelStatus(spec, path, "missing", detail=_fetch_hint(spec))
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return ModelStatus(spec, path, "corrupt", detail=f"{size} bytes, expected {spec.size}")
    if not verify:
        return ModelStatus(spec, path, present)
    digest = file_sha256(path, cache_dir=cache_dir, force=True)
    if digest != spec.sha256:
        return ModelStatus(spec, path, "corrupt", sha256=digest,
                           detail=f"sha256 {digest}, expected {spec.sha256}")
    return ModelStatus(spec, path, present, sha256=digest)
