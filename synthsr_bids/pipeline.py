"""The participant level: every selected scan through load -> synthesise -> write.

One bad scan never stops the others: its error is logged (with a crash report
for unexpected errors) and the run's exit code says that something failed.
Finished scans are skipped on rerun when their sidecar records the same source,
model and settings, unless ``--overwrite``.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from synthsr_bids.config import RunConfig
from synthsr_bids.derivatives import dataset as shared_files
from synthsr_bids.derivatives.naming import (
    RESOLUTION_LABELS,
    OutputPaths,
    desc_for,
    description_for,
    output_paths,
)
from synthsr_bids.derivatives.sidecars import (
    ModelInfo,
    build_sidecar,
    file_sha256,
    provenance,
    provenance_matches,
    zooms_of,
)
from synthsr_bids.discovery import ScanInput
from synthsr_bids.errors import BadInputError
from synthsr_bids.io import (
    is_nonempty_file,
    load_scan,
    remove_stale_temporaries,
    save_nifti_atomic,
    write_json_atomic,
)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScanResult:
    """What happened to one scan."""

    scan: ScanInput
    status: str
    """``written``, ``skipped`` or ``failed``."""
    outputs: tuple[Path, ...] = ()
    seconds: float = 0.0
    error: str | None = None
    crash_file: Path | None = None


@dataclass
class Network:
    """The loaded network and what the sidecars say about it."""

    model: Any
    info: ModelInfo
    in_channels: int = 1
    notes: tuple[str, ...] = ()
    """What every sidecar made with this network must say (e.g. that it is a preview model)."""
    sharpen: bool = True
    """Unsharp-mask the outputs: ``--enable/--disable-sharpening``, else what the weight file asks."""


@dataclass(frozen=True)
class RunSummary:
    results: tuple[ScanResult, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> tuple[ScanResult, ...]:
        return tuple(r for r in self.results if r.status == "failed")

    def counts(self) -> dict[str, int]:
        counts = {"written": 0, "skipped": 0, "failed": 0}
        for result in self.results:
            counts[result.status] += 1
        return counts


def _conversion_cache(sha256: str, work_dir: Path) -> Path:
    """Where converted (.h5 -> safetensors) weights are cached: the models cache when it
    already holds this model or is writable (e.g. baked into a read-only image), else the
    work directory."""
    from synthsr_bids.models.registry import models_cache_dir

    cache = models_cache_dir() / "converted"
    if (cache / f"{sha256}.safetensors").is_file():
        return cache
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        return work_dir / "converted_models"
    return cache


def load_network(config: RunConfig) -> Network:
    """Resolve ``--model`` (never downloads) and load the weights."""
    from synthsr_bids.models.registry import ModelIntegrityError, resolve_model, write_hash_record
    from synthsr_bids.models.weights import PREVIEW_STATUS, SHARPEN_METADATA, STATUS_METADATA, load_weights

    resolved = resolve_model(config.inference.model)
    loaded = load_weights(resolved.path, cache_dir=_conversion_cache(resolved.sha256, config.work_dir))
    if loaded.source_sha256 != resolved.sha256:
        # resolve_model may trust a hash record (same size and mtime); the bytes just loaded decide.
        write_hash_record(resolved.path, loaded.source_sha256)
        raise ModelIntegrityError(
            f"{resolved.path}: the file loaded has SHA-256 {loaded.source_sha256[:12]}..., not the "
            f"{resolved.sha256[:12]}... recorded for model {resolved.name}: it changed on disk after its "
            "SHA-256 was recorded. The record is now updated: run again to use the file as it is now "
            "(a registered model that no longer matches its registered SHA-256 is then refused), or "
            "restore the file."
        )
    spec = resolved.spec
    info = ModelInfo(
        name=resolved.name,
        sha256=resolved.sha256,
        license=resolved.license,
        version=str(getattr(spec, "version", "") or ""),
    )
    notes: tuple[str, ...] = ()
    if loaded.metadata.get(STATUS_METADATA) == PREVIEW_STATUS:
        note = (f"model {resolved.name} {info.version} is a preview (an early training checkpoint, below the "
                "quality targets of MODEL_CARD.md); for research results use an official model, e.g. "
                "`synthsr-models fetch synthsr-v1` then `--model synthsr-v1`")
        LOGGER.warning(note)
        notes = (note,)
    sharpen = config.inference.sharpen
    if sharpen is None:
        sharpen = loaded.sharpen
        why = (f"as model {resolved.name} asks" if SHARPEN_METADATA in loaded.metadata
               else f"model {resolved.name} does not say: mri_synthsr's default")
        LOGGER.info("sharpening %s (%s; --%s-sharpening to change it)", "on" if sharpen else "off", why,
                    "disable" if sharpen else "enable")
    elif sharpen != loaded.sharpen:
        LOGGER.info("sharpening %s (command line), although model %s asks for it %s", "on" if sharpen else "off",
                    resolved.name, "on" if loaded.sharpen else "off")
    return Network(model=loaded.model, info=info, in_channels=loaded.config.in_channels, notes=notes,
                   sharpen=sharpen)


def precision_of(half: bool, device: str) -> str:
    """The arithmetic a run uses: ``--half`` is float16 autocast on CUDA, ignored elsewhere."""
    return "float16-autocast" if half and device.startswith("cuda") else "float32"


def _finished(paths: OutputPaths, prov: Mapping[str, Any]) -> bool:
    """Outputs a rerun can keep: every image present and not empty, and the sidecar (written last)
    recording the same provenance."""
    images = paths.images()
    return all(is_nonempty_file(p) for p in images) and provenance_matches(paths.sidecar, prov)


def _crash_file(config: RunConfig, scan: ScanInput) -> Path:
    folder = config.output_dir / f"sub-{scan.subject}" / "log" / config.run_id
    return folder / f"crash-{Path(scan.relpath).name.split('.')[0]}.txt"


def _write_outputs(
    scan: ScanInput,
    paths: OutputPaths,
    *,
    config: RunConfig,
    network: Network,
    device: str,
    prov: dict[str, Any],
) -> tuple[Path, ...]:
    import numpy as np

    from synthsr_bids.inference.predict import SynthesisOptions, resample_to_grid, synthesize

    started = time.perf_counter()
    loaded = load_scan(scan.path, clip_outliers=not config.inference.ct)
    load_seconds = time.perf_counter() - started
    options = SynthesisOptions(
        flip=config.inference.flip,
        sharpen=network.sharpen,
        ct=config.inference.ct,
        device=device,
        half=config.inference.half,
    )
    result = synthesize(loaded.data, loaded.affine, network.model, options)
    if not np.isfinite(result.data).all():  # never written as if it were an image
        raise RuntimeError(f"the synthetic image has {int((~np.isfinite(result.data)).sum())} NaN/Inf voxels; "
                           "nothing was written")
    timings = {"load": load_seconds, **result.timings}

    for folder_path in paths.images():
        remove_stale_temporaries(folder_path.parent, folder_path.name)
    write_started = time.perf_counter()
    # Images reach the disk before the sidecar that marks the scan done (a crash never leaves a
    # sidecar next to a truncated image).
    save_nifti_atomic(result.data, result.affine, paths.t1w, fsync=True)
    written: list[Path] = [paths.t1w]
    native = None
    if paths.native_t1w is not None:
        native = resample_to_grid(result.data, result.affine, loaded.shape, loaded.affine, order=1)
        save_nifti_atomic(native, loaded.affine, paths.native_t1w, fsync=True)
        written.append(paths.native_t1w)
    timings["write"] = time.perf_counter() - write_started
    runtime = time.perf_counter() - started

    common = dict(
        source_relpath=scan.relpath,
        source_suffix=scan.suffix,
        input_zooms=loaded.zooms,
        input_shape=loaded.shape,
        input_axcodes=loaded.axcodes,
        affine_source=loaded.affine_source,
        model=network.info,
        prov=prov,
        device=result.device,
        precision=precision_of(config.inference.half, result.device),
        timings=timings,
        runtime_seconds=runtime,
        warnings=loaded.warnings,
        notes=[*network.notes, *result.notes],
        software=shared_files.software_versions(),
        command_line=config.command_line,
    )
    labels = RESOLUTION_LABELS if paths.native_t1w is not None else None
    # The sidecar of the 1 mm image is written last: it marks the scan as done.
    if paths.native_sidecar is not None and native is not None:
        write_json_atomic(
            paths.native_sidecar,
            build_sidecar(
                **common,
                output_shape=native.shape,
                output_zooms=zooms_of(loaded.affine),
                resolution="native",
                resolution_labels=labels,
            ),
        )
        written.append(paths.native_sidecar)
    write_json_atomic(
        paths.sidecar,
        build_sidecar(
            **common,
            output_shape=result.data.shape,
            output_zooms=zooms_of(result.affine),
            resolution="1" if labels else None,
            resolution_labels=labels,
        ),
    )
    written.append(paths.sidecar)
    LOGGER.debug("%s: stage seconds %s", scan.label, {k: round(v, 2) for k, v in timings.items()})
    return tuple(written)


def process_scan(scan: ScanInput, *, config: RunConfig, network: Network, device: str) -> ScanResult:
    """Synthesise one scan; never raises for a problem with this scan."""
    started = time.perf_counter()
    paths = output_paths(config.output_dir, scan.entities, scan.suffix, native_grid=config.native_grid)
    try:
        source_hash = file_sha256(scan.path) if scan.path.exists() else ""
        prov = provenance(
            source_relpath=scan.relpath,
            source_sha256=source_hash,
            model=network.info,
            flip=config.inference.flip,
            sharpen=network.sharpen,
            ct=config.inference.ct,
            native_grid=config.native_grid,
            precision=precision_of(config.inference.half, device),
        )
        if not config.overwrite and _finished(paths, prov):
            return ScanResult(scan, "skipped", paths.images(), time.perf_counter() - started)
        outputs = _write_outputs(scan, paths, config=config, network=network, device=device, prov=prov)
        return ScanResult(scan, "written", outputs, time.perf_counter() - started)
    except BadInputError as exc:
        return ScanResult(scan, "failed", (), time.perf_counter() - started, error=str(exc) + _left_over(paths))
    except Exception as exc:  # one bad scan must not stop the others
        crash = _crash_file(config, scan)
        try:
            crash.parent.mkdir(parents=True, exist_ok=True)
            crash.write_text(
                f"scan: {scan.path}\nrun: {config.run_id}\ncommand: {' '.join(config.command_line)}\n\n"
                + traceback.format_exc()
            )
        except OSError:
            crash = None
        return ScanResult(
            scan,
            "failed",
            (),
            time.perf_counter() - started,
            error=f"{scan.path}: unexpected {exc.__class__.__name__}: {exc}" + _left_over(paths),
            crash_file=crash,
        )


def _left_over(paths: OutputPaths) -> str:
    """For a failed scan: say that the outputs of an earlier, successful run of it are still there
    (they do not describe the current file, and the group level would use them)."""
    if not paths.sidecar.is_file():
        return ""
    return (f" The outputs of an earlier run of this scan ({paths.t1w.name}, its sidecar and what was derived "
            "from it) are left in place: delete them if they should not be used.")


def prepare_output_dataset(config: RunConfig, scans: Sequence[ScanInput]) -> None:
    """Create the shared top-level files (safe under concurrent jobs)."""
    shared_files.ensure_dataset_description(config.output_dir, config.bids_dir)
    shared_files.add_descriptions(
        config.output_dir, {desc_for(s.suffix): description_for(s.suffix) for s in scans}
    )
    shared_files.ensure_bidsignore(config.output_dir)


def output_collisions(scans: Sequence[ScanInput], config: RunConfig) -> dict[str, list[str]]:
    """Scans that would write the same output (e.g. ``sub-01_T2w.nii`` and ``sub-01_T2w.nii.gz``: the
    output name comes from the entities), each mapped to the others it collides with."""
    by_output: dict[Path, list[str]] = {}
    for scan in scans:
        target = output_paths(config.output_dir, scan.entities, scan.suffix, native_grid=config.native_grid).t1w
        by_output.setdefault(target, []).append(scan.relpath)
    return {relpath: [other for other in group if other != relpath]
            for group in by_output.values() if len(group) > 1 for relpath in group}


def run_scans(
    scans: Sequence[ScanInput], *, config: RunConfig, network: Network, device: str
) -> RunSummary:
    """Process ``scans`` in order with a progress bar and one log line per scan."""
    from synthsr_bids.progress import progress_bar

    results: list[ScanResult] = []
    total = len(scans)
    collisions = output_collisions(scans, config)
    with progress_bar(total, unit="scan", desc="synthsr-bids") as bar:
        for index, scan in enumerate(scans, start=1):
            bar.set_postfix_str(scan.label, refresh=True)
            if scan.relpath in collisions:  # neither is processed: which one is meant is not ours to guess
                result = ScanResult(scan, "failed", (), 0.0, error=str(BadInputError(
                    scan.path, f"has the same BIDS entities and suffix as {', '.join(collisions[scan.relpath])} "
                    "(e.g. only the extension differs), so both would write the same outputs.",
                    'keep one of the files (BIDS allows one), or select one with --bids-filter-file, e.g. '
                    '{"anat": {"extension": ".nii.gz"}}.')))
            else:
                result = process_scan(scan, config=config, network=network, device=device)
            results.append(result)
            prefix = f"[{index}/{total}] {scan.label}"
            if result.status == "written":
                LOGGER.info("%s: written in %.1f s -> %s", prefix, result.seconds, result.outputs[0].name)
            elif result.status == "skipped":
                LOGGER.info("%s: already done with the same model and settings, skipped (use --overwrite to redo)", prefix)
            else:
                LOGGER.error("%s: FAILED: %s", prefix, result.error)
                if result.crash_file:
                    LOGGER.error("%s: crash report: %s", prefix, result.crash_file)
            bar.update(1)
    return RunSummary(tuple(results))


def summarise(summary: RunSummary) -> str:
    counts = summary.counts()
    return (
        f"{counts['written']} written, {counts['skipped']} skipped (already done), "
        f"{counts['failed']} failed"
    )

