"""Reading and writing images: nibabel, with the checks a clinical archive needs.

:func:`load_scan` turns one NIfTI file into a :class:`LoadedScan` or raises
:class:`~synthsr_bids.errors.BadInputError` naming the file, the problem and the
fix. Recoverable oddities (NaNs, a 4D file, disagreeing qform/sform) become
warnings carried with the scan and recorded in its sidecar.

:func:`save_nifti_atomic` writes through a temporary file in the destination
folder and renames it into place, so an interrupted run never leaves a partial
file under the final name.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import nibabel as nib
import numpy as np

from synthsr_bids.errors import BadInputError
from synthsr_bids.preprocessing.intensity import clip_extreme_intensities
from synthsr_bids.validation import is_unfetched_annex_file

LOGGER = logging.getLogger(__name__)

#: Voxel sizes outside this range (mm) are taken as a broken header.
MIN_VOXEL_MM = 0.05
MAX_VOXEL_MM = 20.0
#: Largest image (voxels, and voxels of its 1 mm grid) taken: ~2 GB as float64; clinical and
#: research head scans are far below (a 0.5 mm 7T brain is ~100 million voxels).
MAX_INPUT_VOXELS = 2**28
#: qform and sform further apart than this (mm, at the volume corners) are reported.
QFORM_SFORM_TOLERANCE_MM = 0.1


@dataclass(frozen=True)
class LoadedScan:
    """An input image ready for the pipeline."""

    path: Path
    data: np.ndarray
    """3D float64 array (the first volume of a 4D file)."""
    affine: np.ndarray
    """4x4 voxel-to-world (RAS+ mm) matrix used for everything downstream."""
    zooms: tuple[float, float, float]
    shape: tuple[int, int, int]
    axcodes: tuple[str, str, str]
    warnings: tuple[str, ...] = ()
    affine_source: str = "sform"


def _corner_distance(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    return float(np.max(np.linalg.norm((corners @ a.T - corners @ b.T)[:, :3], axis=1)))


def _usable(affine: np.ndarray) -> bool:
    """Finite, with three independent axes."""
    return bool(np.all(np.isfinite(affine))) and abs(float(np.linalg.det(affine[:3, :3]))) > 1e-12


def _choose_affine(img: nib.Nifti1Image, path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, str, list[str]]:
    """The affine nibabel would use (sform when its code is set, else qform), with a
    warning when both are set and disagree; a coded but unusable sform (zeros, NaN) gives
    way to a usable qform, with a warning."""
    warnings: list[str] = []
    header = img.header
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if sform is not None and sform_code > 0 and not _usable(sform) and qform is not None and qform_code > 0 \
            and _usable(qform):
        warnings.append("the sform is set but unusable (zero or non-finite); the qform is used instead")
        return np.asarray(qform, dtype=np.float64), "qform", warnings
    if sform is not None and sform_code > 0:
        affine, source = sform, "sform"
        if qform is not None and qform_code > 0:
            distance = _corner_distance(sform, qform, shape)
            if distance > QFORM_SFORM_TOLERANCE_MM:
                warnings.append(
                    f"qform and sform disagree by up to {distance:.1f} mm; the sform is "
                    "used (as nibabel, FSL and ANTs do)"
                )
    elif qform is not None and qform_code > 0:
        affine, source = qform, "qform"
    else:
        affine, source = img.affine, "none"
        warnings.append(
            "neither qform nor sform is set: the image is assumed to be stored in "
            "default (scanner-less) orientation; the output will not overlay other scans"
        )
    return np.asarray(affine, dtype=np.float64), source, warnings


def _check_size(path: Path, shape: tuple[int, ...], zooms: tuple[float, ...]) -> None:
    """Refuse, from the header alone (before any voxel is read), an image too large to process
    safely: its voxels, or the 1 mm grid it is resampled onto (a whole-body or spine field of view).
    Without this, the kernel's out-of-memory killer would end the whole run, not just this scan."""
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_INPUT_VOXELS:
        raise BadInputError(
            path,
            f"is too large: {shape} = {voxels / 1e6:.0f} million voxels (at most {MAX_INPUT_VOXELS / 1e6:.0f} "
            f"million, ~{8 * voxels / 2**30:.1f} GB to load).",
            "downsample or crop it first (e.g. mri_convert, fslroi), or exclude it with --bids-filter-file.",
        )
    if not np.all(np.isfinite(zooms)):
        return  # a broken affine: refused with its own message once the header is checked
    extent_mm = [n * abs(float(z)) for n, z in zip(shape, zooms)]
    grid = int(np.prod([np.ceil(e) for e in extent_mm], dtype=np.float64))
    if grid > MAX_INPUT_VOXELS:
        raise BadInputError(
            path,
            f"covers a field of view of {' x '.join(f'{e:.0f}' for e in extent_mm)} mm: {grid / 1e6:.0f} million "
            f"voxels at 1 mm (at most {MAX_INPUT_VOXELS / 1e6:.0f} million).",
            "crop it to the head first (e.g. FSL's robustfov), or exclude it with --bids-filter-file.",
        )


def _sniff_compression(path: Path) -> tuple[bool, bool]:
    """``(gzip-compressed, a NIfTI-1/2 header inside)`` from the first bytes of ``path``."""
    with path.open("rb") as handle:
        start = handle.read(4)
    gzipped = start[:2] == b"\x1f\x8b"
    if gzipped:
        try:
            with gzip.open(path, "rb") as handle:
                start = handle.read(4)
        except (OSError, EOFError, zlib.error):
            return True, False
    sizes = {int.from_bytes(start, "little"), int.from_bytes(start, "big")} if len(start) == 4 else set()
    return gzipped, bool(sizes & {348, 540})  # sizeof_hdr of NIfTI-1 / NIfTI-2


def load_scan(path: Path | str, *, clip_outliers: bool = True) -> LoadedScan:
    """Load and check one NIfTI image (see module docstring).

    ``clip_outliers``: clip a few extreme voxels (:func:`clip_extreme_intensities`); off for CT,
    whose Hounsfield window is applied later anyway."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise BadInputError(
            path,
            "is a broken symbolic link (a git-annex/DataLad file whose content is not here).",
            "run `datalad get` on it, or exclude it with --bids-filter-file.",
        )
    if not path.exists():
        raise BadInputError(path, "does not exist.")
    size = path.stat().st_size
    if size == 0:
        raise BadInputError(
            path,
            "is an empty (0-byte) file, e.g. a placeholder left by a failed conversion.",
            "re-convert it from DICOM, or exclude it with --bids-filter-file.",
        )
    if is_unfetched_annex_file(path):
        raise BadInputError(
            path,
            "is a git-annex pointer file (an unlocked DataLad file whose content is not here).",
            "run `datalad get` on it, or exclude it with --bids-filter-file.",
        )
    gzipped, nifti = _sniff_compression(path)
    if nifti and gzipped != path.name.endswith(".gz"):
        renamed = path.name[:-3] if path.name.endswith(".gz") else path.name + ".gz"
        raise BadInputError(
            path,
            "is a gzip-compressed NIfTI file although its name does not end in .gz." if gzipped
            else "is an uncompressed NIfTI file although its name ends in .gz.",
            f"rename it to {renamed} (its JSON sidecar keeps its name).",
        )
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise BadInputError(
            path,
            f"cannot be read as NIfTI ({exc.__class__.__name__}: {exc}).",
            "check that the file is a complete NIfTI-1/2 image (re-convert it from DICOM).",
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise BadInputError(path, f"is a {type(img).__name__}, not a NIfTI image.")

    warnings: list[str] = []
    full_shape = tuple(int(n) for n in img.shape)
    stored = img.get_data_dtype()
    if stored.fields is not None:
        raise BadInputError(
            path,
            f"holds colour (RGB) voxels ({stored}), e.g. a screenshot or secondary capture, not an MR volume.",
            "exclude it with --bids-filter-file.",
        )
    if len(full_shape) < 3:
        raise BadInputError(path, f"is {len(full_shape)}D (shape {full_shape}); a 3D volume is needed.",
                            "exclude it with --bids-filter-file.")
    extra = full_shape[3:]
    if any(n > 1 for n in extra[1:]):
        raise BadInputError(path, f"has {len(full_shape)} dimensions (shape {full_shape}); only 3D or 4D images are supported.")
    # the affine the pipeline will use (header only): its voxel sizes decide the 1 mm grid's size
    affine, source, affine_warnings = _choose_affine(img, path, full_shape[:3])
    _check_size(path, full_shape[:3], tuple(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    try:
        if extra and extra[0] > 1:
            warnings.append(
                f"is 4D with {extra[0]} volumes; only the first volume is synthesised"
            )
        proxy = img.dataobj
        data = np.asarray(proxy[(slice(None),) * 3 + (0,) * len(extra)])
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as exc:
        raise BadInputError(
            path,
            f"is truncated or corrupt: the voxel data cannot be read ({exc.__class__.__name__}: {exc}).",
            "re-convert it from DICOM, or exclude it with --bids-filter-file.",
        ) from exc
    if np.iscomplexobj(data):
        warnings.append("has complex voxels: their magnitude is synthesised")
        data = np.abs(data)
    data = data.astype(np.float64, copy=False)
    shape = tuple(int(n) for n in data.shape)
    if min(shape) < 2:
        raise BadInputError(
            path,
            f"has shape {shape}: a single slice cannot be turned into a 3D volume.",
            "exclude it with --bids-filter-file.",
        )

    warnings.extend(affine_warnings)
    if not np.all(np.isfinite(affine)):
        raise BadInputError(path, "has a non-finite voxel-to-world affine.", "fix the header (e.g. with fslorient or nibabel).")
    linear = affine[:3, :3]
    zooms = tuple(float(z) for z in np.sqrt((linear**2).sum(axis=0)))
    # The sizes first: a header in metres has a tiny determinant too, and its fix is the units.
    if 0 < min(zooms) < MIN_VOXEL_MM or max(zooms) > MAX_VOXEL_MM:
        raise BadInputError(
            path,
            f"has implausible voxel sizes {tuple(round(z, 3) for z in zooms)} mm "
            f"(expected {MIN_VOXEL_MM}-{MAX_VOXEL_MM} mm).",
            "check the pixdim/affine in the header (units must be millimetres).",
        )
    if min(zooms) <= 0 or abs(np.linalg.det(linear)) < 1e-6 * float(np.prod(zooms)):
        raise BadInputError(
            path,
            "has a degenerate voxel-to-world affine (zero determinant): voxel positions are undefined.",
            "fix the qform/sform (e.g. with fslorient or nibabel).",
        )

    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int((~finite).sum())
        if n_bad == data.size:
            raise BadInputError(path, "contains no finite voxel (all NaN/Inf).")
        warnings.append(f"{n_bad} NaN/Inf voxels were set to 0")
        data = np.where(finite, data, 0.0)
    low, high = float(data.min()), float(data.max())
    first_volume = "its first volume: " if extra and extra[0] > 1 else ""
    if high == low:
        raise BadInputError(path, f"is constant ({first_volume}every voxel is {low:g}); there is no image to synthesise from.",
                            "exclude it with --bids-filter-file.")
    if not np.isfinite(high - low):
        raise BadInputError(path, f"has intensities from {low:g} to {high:g}, a range too wide to compute with.",
                            "rescale it (e.g. fslmaths -div), or re-convert it from DICOM.")
    if clip_outliers:
        data, clipped = clip_extreme_intensities(data)
        if clipped:
            warnings.append(clipped)

    axcodes = tuple(nib.orientations.aff2axcodes(affine))
    for message in warnings:
        LOGGER.warning("%s: %s", path.name, message)
    return LoadedScan(
        path=path,
        data=data,
        affine=affine,
        zooms=zooms,  # type: ignore[arg-type]
        shape=shape,  # type: ignore[arg-type]
        axcodes=axcodes,  # type: ignore[arg-type]
        warnings=tuple(warnings),
        affine_source=source,
    )


def _temporary_sibling(path: Path) -> Path:
    """A hidden temporary name in the same folder, keeping the extension (nibabel
    chooses compression from it)."""
    return path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")


def save_nifti_atomic(
    data: np.ndarray,
    affine: np.ndarray,
    path: Path,
    *,
    dtype: Any = np.float32,
    xform_code: int = 1,
    fsync: bool = False,
) -> None:
    """Write a NIfTI image atomically (temporary sibling + ``os.replace``; ``fsync``: see :func:`write_atomic`)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    # A sheared affine has no quaternion form: the qform then approximates it (ITK, hence ANTs,
    # refuses an image whose only transform is not orthonormal, so the approximation stays).
    img.set_qform(affine, code=xform_code)
    img.set_sform(affine, code=xform_code)
    write_atomic(path, lambda tmp: nib.save(img, str(tmp)), fsync=fsync)


def write_atomic(path: Path, write: Callable[[Path], Any], *, fsync: bool = False) -> None:
    """Create ``path`` atomically: ``write`` fills a temporary sibling, which then replaces ``path``.

    ``fsync``: flush the temporary file to disk before the rename, and the folder after it, so that
    a machine crash leaves either the old file or the complete new one under ``path``, and files
    written later (e.g. a sidecar that marks the work done) never outlive it on disk. The
    temporary file never outlives a failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(descriptor)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def copy_file_atomic(source: Path, destination: Path) -> None:
    """Copy ``source`` to ``destination`` atomically (temporary sibling, fsync, ``os.replace``)."""
    write_atomic(destination, lambda tmp: shutil.copyfile(source, tmp), fsync=True)


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write a JSON file atomically (sorted keys are not forced: order is kept)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def is_nonempty_file(path: Path) -> bool:
    """A file with content: what a crash or a placeholder (0 bytes) never passes for finished work."""
    return path.is_file() and path.stat().st_size > 0


def sweep_stale_temporaries(folder: Path, *, older_than_s: float = 3600.0) -> list[Path]:
    """Delete the temporaries (:func:`_temporary_sibling`) in ``folder`` left by killed jobs.

    Only those untouched for ``older_than_s``: a concurrent job may be writing the newer ones
    (no write of this package takes anywhere near an hour). Returns what was deleted."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for leftover in folder.glob(".tmp-*"):
        try:
            if leftover.is_file() and now - leftover.stat().st_mtime > older_than_s:
                leftover.unlink()
                removed.append(leftover)
        except OSError:  # gone meanwhile, or not ours to delete
            continue
    return removed


def remove_stale_temporaries(folder: Path, name: str) -> None:
    """Delete temporaries of ``name`` left by a killed run."""
    if folder.is_dir():
        for leftover in folder.glob(f".tmp-*-{name}"):
            leftover.unlink(missing_ok=True)
