"""Resumable, verified downloads of registered model files (standard library ``urllib`` only).

``fetch_model`` downloads to ``<cache>/<filename>.part``, resumes an existing ``.part`` with an
HTTP ``Range`` request (restarting when the server answers ``200`` instead of ``206``), checks
the size and SHA-256, and only then moves the file into place with an atomic ``os.replace``.
A file lock in ``<cache>/.locks/`` keeps two jobs fetching the same model from clashing: the
second one waits, then finds the verified file.

URL precedence: the ``url`` argument, then ``$SYNTHSR_BIDS_MODELS_URL`` (a mirror base URL;
the file name is appended), then the registered URL followed by its mirrors.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from synthsr_bids import __version__
from synthsr_bids.models.registry import (
    USER_LICENSE,
    WEIGHT_SUFFIXES,
    ModelError,
    ModelIntegrityError,
    ModelNotAvailableError,
    ModelSpec,
    ResolvedModel,
    bundled_path,
    file_sha256,
    find_spec_by_digest,
    get_registry,
    hash_file,
    is_valid_model_name,
    models_cache_dir,
    user_models_dir,
    write_hash_record,
)

__all__ = [
    "ENV_MODELS_URL",
    "ModelDownloadError",
    "candidate_urls",
    "fetch_model",
    "import_model",
    "lock_path",
    "partial_path",
]

LOGGER = logging.getLogger(__name__)

ENV_MODELS_URL = "SYNTHSR_BIDS_MODELS_URL"
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


class ModelDownloadError(ModelError):
    """A download failed (network, HTTP status, or a server sending the wrong file)."""


class _Resumable(ModelDownloadError):
    """The transfer stopped early; the ``.part`` file is kept and a retry resumes it."""


def partial_path(spec: ModelSpec, cache_dir: Path) -> Path:
    return cache_dir / f"{spec.filename}.part"


def lock_path(spec: ModelSpec, cache_dir: Path) -> Path:
    """The lock file guarding downloads of ``spec`` into ``cache_dir``."""
    return cache_dir / ".locks" / f"{spec.filename}.lock"


def candidate_urls(spec: ModelSpec, *, url: str | None = None) -> tuple[str, ...]:
    """The URLs ``fetch_model`` tries, in order."""
    if url:
        return (url,)
    base = os.environ.get(ENV_MODELS_URL)
    if base:
        return (f"{base.rstrip('/')}/{urllib.parse.quote(spec.filename)}",)
    return spec.urls


def _no_download_message(spec: ModelSpec) -> str:
    return (f"Model {spec.name!r} has no public download URL. Copy {spec.filename} from a FreeSurfer 7.4+ "
            f"install ($FREESURFER_HOME/models/{spec.filename}) and run `synthsr-models import PATH`, "
            f"or pass --url / set ${ENV_MODELS_URL} to a mirror that hosts it.")


def _check_content_range(header: str | None, *, url: str, offset: int, size: int) -> None:
    match = _CONTENT_RANGE.match((header or "").strip())
    if match is None:
        raise ModelDownloadError(f"{url}: partial response without a valid Content-Range header ({header!r})")
    start, total = int(match.group(1)), match.group(3)
    if start != offset or (total != "*" and int(total) != size):
        raise ModelDownloadError(f"{url}: server resumed at byte {start} of {total}, but the download needs "
                                 f"byte {offset} of {size}; the server is sending a different file")


def _download_once(url: str, part: Path, spec: ModelSpec, *, progress: bool, timeout: float) -> None:
    """Bring ``part`` to ``spec.size`` bytes from ``url``, resuming when possible."""
    assert spec.size is not None
    offset = part.stat().st_size if part.exists() else 0
    if offset > spec.size:
        LOGGER.warning("%s is larger than %s (%d > %d bytes); discarding it", part, spec.name, offset, spec.size)
        part.unlink()
        offset = 0
    if offset == spec.size:
        return
    headers = {"User-Agent": f"synthsr-bids/{__version__} (+urllib)"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        # http(s) or file URLs from the registry, $SYNTHSR_BIDS_MODELS_URL or --url.
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            part.unlink()
            raise _Resumable(f"{url}: server refused to resume at byte {offset} (HTTP 416); restarting") from exc
        raise ModelDownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Resumable(f"{url}: cannot connect ({reason})") from exc

    with response:
        status = response.status or 200  # file:// URLs have no status
        if offset and status == 206:
            _check_content_range(response.headers.get("Content-Range"), url=url, offset=offset, size=spec.size)
            mode = "ab"
            LOGGER.info("Resuming %s at byte %d of %d", spec.filename, offset, spec.size)
        elif status in (200, 206):
            if offset:
                LOGGER.info("%s ignored the Range request (HTTP %d); restarting %s from the beginning",
                            url, status, spec.filename)
            offset, mode = 0, "wb"
        else:
            raise ModelDownloadError(f"{url}: unexpected HTTP status {status}")
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) != spec.size - offset:
            raise ModelDownloadError(
                f"{url}: server announces {offset + int(announced)} bytes but {spec.name} has {spec.size} bytes; "
                f"this is not the registered file (wrong URL or mirror?)")
        free = shutil.disk_usage(part.parent).free
        if free < spec.size - offset:
            raise ModelDownloadError(f"Not enough disk space in {part.parent} for {spec.filename}: "
                                     f"{spec.size - offset} bytes needed, {free} free. Choose another cache "
                                     f"with --cache-dir or $SYNTHSR_BIDS_MODELS.")
        written = 0
        show = progress and sys.stderr.isatty()
        with part.open(mode) as out, tqdm(total=spec.size, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=spec.filename, file=sys.stderr,
                                          disable=not show) as bar:
            try:
                while chunk := response.read(_CHUNK):
                    if offset + written + len(chunk) > spec.size:
                        out.close()
                        part.unlink()
                        raise ModelDownloadError(f"{url}: server sent more than the {spec.size} bytes of "
                                                 f"{spec.name}; this is not the registered file")
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _Resumable(f"{url}: connection lost after {offset + written} of {spec.size} bytes "
                                 f"({exc})") from exc
            finally:
                if not out.closed:
                    out.flush()
                    os.fsync(out.fileno())
    if offset + written < spec.size:
        raise _Resumable(f"{url}: connection closed after {offset + written} of {spec.size} bytes")


def _download_with_retries(source: str, part: Path, spec: ModelSpec, *, progress: bool, retries: int,
                           timeout: float, failures: list[str]) -> bool:
    """True once ``part`` is complete; a transfer that stops early is resumed up to ``retries`` times."""
    for attempt in range(max(retries, 0) + 1):
        try:
            LOGGER.info("Fetching %s from %s%s", spec.name, source, f" (retry {attempt})" if attempt else "")
            _download_once(source, part, spec, progress=progress, timeout=timeout)
            return True
        except _Resumable as exc:
            LOGGER.warning("%s", exc)
            failures.append(str(exc))
        except ModelDownloadError as exc:
            LOGGER.warning("%s", exc)
            failures.append(str(exc))
            return False
    return False


def _fetch_bundled(spec: ModelSpec, cache_dir: Path) -> Path:
    path = bundled_path(spec)
    if spec.sha256 is None or not path.is_file():
        raise ModelNotAvailableError(f"{spec.name!r} is bundled inside the synthsr-bids package, not downloaded, "
                                     f"and this version does not ship it yet ({path}). Fetch an official model "
                                     f"instead, e.g. `synthsr-models fetch synthsr-v1`.")
    digest = file_sha256(path, cache_dir=cache_dir)
    if digest != spec.sha256:
        raise ModelIntegrityError(f"Bundled model {path} is corrupt: sha256 {digest}, expected {spec.sha256}. "
                                  f"Reinstall synthsr-bids.")
    return path


def fetch_model(spec: ModelSpec, *, cache_dir: Path | None = None, url: str | None = None, progress: bool = True,
                retries: int = 2, timeout: float = 60.0, lock_timeout: float | None = None) -> Path:
    """Download ``spec`` into the cache (resuming a previous attempt) and return the verified path.

    Does nothing when the cached file is already intact. Each URL is tried ``retries + 1``
    times; every retry resumes where the previous attempt stopped.

    Raises:
        ModelNotAvailableError: the model has no download (bundled, or FreeSurfer-only).
        ModelIntegrityError: the downloaded bytes have the wrong SHA-256 (nothing is kept).
        ModelDownloadError: every URL failed; a partial ``.part`` file is kept for resuming.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    if spec.bundled:
        return _fetch_bundled(spec, cache_dir)
    if spec.size is None or spec.sha256 is None:
        raise ValueError(f"Registry entry {spec.name!r} has no size/sha256; refusing to install an unverifiable file")
    urls = candidate_urls(spec, url=url)
    if not urls:
        raise ModelNotAvailableError(_no_download_message(spec))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock_file = lock_path(spec, cache_dir)
        lock_file.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise ModelDownloadError(f"Cannot create the model cache {cache_dir} ({exc.strerror}); choose another "
                                 f"directory with --cache-dir or $SYNTHSR_BIDS_MODELS.") from exc

    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        LOGGER.info("Another process is fetching %s (lock %s); waiting for it to finish", spec.name, lock_file)
        try:
            lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout)
        except Timeout as exc:
            raise ModelDownloadError(f"Timed out after {lock_timeout} s waiting for {lock_file}; another process "
                                     f"is still fetching {spec.name}") from exc
    try:
        return _fetch_locked(spec, cache_dir=cache_dir, urls=urls, progress=progress, retries=retries,
                             timeout=timeout)
    finally:
        lock.release()


def _fetch_locked(spec: ModelSpec, *, cache_dir: Path, urls: tuple[str, ...], progress: bool, retries: int,
                  timeout: float) -> Path:
    final = cache_dir / spec.filename
    if final.is_file():
        if final.stat().st_size == spec.size and file_sha256(final, cache_dir=cache_dir) == spec.sha256:
            LOGGER.info("%s is already in the cache and verified: %s", spec.name, final)
            return final
        LOGGER.warning("Cached %s does not match the registered size/sha256; downloading it again", final)
    part = partial_path(spec, cache_dir)
    failures: list[str] = []
    integrity: ModelIntegrityError | None = None
    for source in urls:
        if not _download_with_retries(source, part, spec, progress=progress, retries=retries, timeout=timeout,
                                      failures=failures):
            continue
        digest = hash_file(part)
        if digest != spec.sha256:
            part.unlink()
            integrity = ModelIntegrityError(
                f"Download of {spec.name} from {source} failed verification: expected sha256 {spec.sha256}, "
                f"got {digest}. The file was deleted; check the URL/mirror and try again.")
            LOGGER.warning("%s", integrity)
            failures.append(str(integrity))
            continue
        os.replace(part, final)
        write_hash_record(final, digest, cache_dir=cache_dir)
        LOGGER.info("Fetched %s (%d bytes, sha256 %s) to %s", spec.name, spec.size, digest, final)
        return final
    if integrity is not None and len(urls) == 1:
        raise integrity
    if integrity is not None:
        raise ModelIntegrityError(f"Could not fetch a verified copy of {spec.name}:\n  " + "\n  ".join(failures))
    kept = (f" The partial download ({part.stat().st_size} of {spec.size} bytes) is kept at {part}; run the same "
            f"command again to resume." if part.exists() else "")
    raise ModelDownloadError(f"Could not fetch {spec.name}:\n  " + "\n  ".join(failures) + kept)


# --------------------------------------------------------------------------- import


def _copy_verified(source: Path, dest: Path, expected_sha256: str) -> None:
    """Copy ``source`` to ``dest`` atomically, checking the copied bytes against ``expected_sha256``."""
    digest = hashlib.sha256()
    tmp = dest.with_name(f"{dest.name}.import-{os.getpid()}.tmp")
    try:
        with source.open("rb") as src, tmp.open("wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected_sha256:
            raise ModelIntegrityError(f"{source} changed while it was being copied (sha256 {digest.hexdigest()}, "
                                      f"expected {expected_sha256}); nothing was imported")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def import_model(path: Path, *, name: str | None = None, cache_dir: Path | None = None,
                 registry: Mapping[str, ModelSpec] | None = None) -> ResolvedModel:
    """Copy a model file the user already has (e.g. from ``$FREESURFER_HOME/models``) into the cache.

    A file whose size and SHA-256 match a registered model is installed as that model. With
    ``name`` set to a registered model, the file must match it exactly. Any other file is
    stored as a user model (``<cache>/user/<name>.<ext>``, name defaulting to the file stem),
    after which ``resolve_model(name)`` finds it. A file that has the name or size of a
    registered model but a different hash is refused: it is most likely a damaged copy.

    Raises:
        ModelIntegrityError: the file does not match the registered model it claims to be.
        ModelNotAvailableError: the file is missing or not a .h5/.safetensors file.
        ValueError: ``name`` is not a valid model name.
    """
    registry = registry if registry is not None else get_registry()
    cache_dir = Path(cache_dir) if cache_dir is not None else models_cache_dir()
    source = Path(path).expanduser()
    if not source.is_file():
        raise ModelNotAvailableError(f"{source} does not exist or is not a file; nothing to import")
    if source.suffix not in WEIGHT_SUFFIXES:
        raise ModelNotAvailableError(f"{source} is not a model file: expected a {' or '.join(WEIGHT_SUFFIXES)} file")
    source = source.resolve()
    size = source.stat().st_size
    sha256 = hash_file(source)
    match = find_spec_by_digest(size, sha256, registry)

    if name is not None and name in registry:
        wanted = registry[name]
        if wanted.bundled:
            raise ModelNotAvailableError(f"{name!r} is bundled inside the package and cannot be imported; "
                                         f"import your file under another --name")
        if match is not wanted:
            raise ModelIntegrityError(
                f"{source} is not {name}: it has {size} bytes and sha256 {sha256}, but {name} has {wanted.size} "
                f"bytes and sha256 {wanted.sha256}. The copy is damaged or a different release.")
    elif name is not None and match is not None:
        LOGGER.warning("%s is the registered model %s; importing it under that name instead of %r",
                       source, match.name, name)
    elif match is None:
        lookalikes = [s.name for s in registry.values()
                      if not s.bundled and (s.filename.lower() == source.name.lower() or s.size == size)]
        if name is None and lookalikes:
            spec = registry[lookalikes[0]]
            raise ModelIntegrityError(
                f"{source} looks like {spec.name} (same file name or size) but its sha256 is {sha256}, not "
                f"{spec.sha256}. The copy is damaged or a different release; to use it anyway as your own "
                f"model, import it with --name MYNAME.")

    if match is not None:
        dest = cache_dir / match.filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock_file = lock_path(match, cache_dir)
        lock_file.parent.mkdir(exist_ok=True)
        with FileLock(str(lock_file)):
            if dest.resolve() != source:
                _copy_verified(source, dest, sha256)
            write_hash_record(dest, sha256, cache_dir=cache_dir)
        LOGGER.info("Imported %s as %s (%s): %s", source, match.name, match.license, dest)
        return ResolvedModel(name=match.name, path=dest, sha256=sha256, license=match.license, spec=match)

    user_name = name if name is not None else source.stem
    if not is_valid_model_name(user_name):
        raise ValueError(f"{user_name!r} is not a valid model name (letters, digits, '.', '_', '-'); "
                         f"choose one with --name")
    if user_name in registry:
        raise ValueError(f"{user_name!r} is a registered model name; choose another --name for {source}")
    directory = user_models_dir(cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / f"{user_name}{source.suffix}"
    _copy_verified(source, dest, sha256)
    for suffix in WEIGHT_SUFFIXES:
        if suffix != source.suffix:
            (directory / f"{user_name}{suffix}").unlink(missing_ok=True)
    write_hash_record(dest, sha256, cache_dir=cache_dir)
    LOGGER.info("Imported %s as user model %s: %s", source, user_name, dest)
    return ResolvedModel(name=user_name, path=dest, sha256=sha256, license=USER_LICENSE, spec=None)
