"""TemplateFlow templates, read from ``$TEMPLATEFLOW_HOME`` (the network is never required).

The TemplateFlow client is created per call, so ``TEMPLATEFLOW_HOME`` is honoured even when
it changes after ``templateflow`` was imported (tests, wrappers). A file that is listed but
not downloaded yet (TemplateFlow's zero-byte placeholders) is fetched by the client when
there is a network; otherwise :class:`TemplateNotAvailableError` says how to pre-fetch it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from synthsr_bids.errors import NoInputError
from synthsr_bids.io import is_nonempty_file

LOGGER = logging.getLogger(__name__)


class TemplateNotAvailableError(NoInputError):
    """The requested template is not in ``TEMPLATEFLOW_HOME`` and cannot be downloaded."""


@dataclass(frozen=True)
class TemplateFiles:
    name: str
    resolution: int
    t1w: Path
    brain_mask: Path | None
    home: Path


@dataclass
class TemplateSpace:
    """What the report shows about template space."""

    name: str
    t1w: Path
    brain_mask: Path | None = None
    registered: list[tuple[str, Path]] = field(default_factory=list)
    median: Path | None = None
    median_n: int = 0
    lesion_map: Path | None = None
    lesion_n: int = 0
    notes: list[str] = field(default_factory=list)



def templateflow_home() -> Path:
    from templateflow.conf.env import get_templateflow_home

    return get_templateflow_home()


def prefetch_command(name: str, resolution: int) -> str:
    return (
        "python -c \"from templateflow import api; "
        f"api.get('{name}', resolution={resolution}, suffix='T1w', desc=None, extension='.nii.gz'); "
        f"api.get('{name}', resolution={resolution}, suffix='mask', desc='brain', extension='.nii.gz')\""
    )


def _not_available(name: str, resolution: int, home: Path, reason: str) -> TemplateNotAvailableError:
    return TemplateNotAvailableError(
        f"TemplateFlow template {name} (res-{resolution:02d} T1w) is not available: {reason}. "
        f"TEMPLATEFLOW_HOME is {home}. On a machine with internet access, pre-fetch it with\n"
        f"  TEMPLATEFLOW_HOME=/path/to/templateflow {prefetch_command(name, resolution)}\n"
        "then copy that folder here and point TEMPLATEFLOW_HOME at it (in a container, bind-mount it "
        "and set the variable); or choose another --template, or run with --skip-registration."
    )


def get_template(name: str, resolution: int = 1) -> TemplateFiles:
    """The template's T1w image (required) and brain mask (optional) as local files."""
    from templateflow.client import TemplateFlowClient

    home = templateflow_home()
    try:
        client = TemplateFlowClient(root=home)
        listed = client.ls(name, resolution=resolution, suffix="T1w", desc=None, extension=".nii.gz")
    except Exception as exc:  # pybids/templateflow raise several types for a broken home
        raise _not_available(name, resolution, home, f"TemplateFlow could not index {home} ({exc})") from exc
    if not listed:
        known = sorted(p.name[4:] for p in home.glob("tpl-*") if p.is_dir()) if home.is_dir() else []
        reason = (
            f"{home} has no tpl-{name} folder" if name not in known
            else f"tpl-{name} has no res-{resolution:02d} T1w image"
        )
        if known and name not in known:
            reason += f" (templates there: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''})"
        raise _not_available(name, resolution, home, reason)
    t1w = listed[0]
    if not is_nonempty_file(t1w):
        try:
            fetched = client.get(name, resolution=resolution, suffix="T1w", desc=None, extension=".nii.gz")
            t1w = fetched if isinstance(fetched, Path) else Path(fetched[0])
        except Exception as exc:  # requests/ConnectionError, RuntimeError from the client
            raise _not_available(
                name, resolution, home, f"{t1w.name} is not downloaded and could not be fetched (no network?): "
                f"{str(exc).splitlines()[0][:200]}"
            ) from exc
        if not is_nonempty_file(t1w):
            raise _not_available(name, resolution, home, f"{t1w.name} is empty after download")
    mask = None
    masks = client.ls(name, resolution=resolution, suffix="mask", desc="brain", extension=".nii.gz")
    if masks:
        mask = masks[0]
        if not is_nonempty_file(mask):
            try:
                client.get(name, resolution=resolution, suffix="mask", desc="brain", extension=".nii.gz")
            except Exception as exc:
                LOGGER.info("template brain mask %s not available (%s); QC uses a head mask instead", mask.name, exc)
            mask = mask if is_nonempty_file(mask) else None
    LOGGER.info("template %s res-%02d: %s", name, resolution, t1w)
    return TemplateFiles(name=name, resolution=resolution, t1w=t1w, brain_mask=mask, home=home)


def template_reference(template: TemplateFiles) -> str:
    """Where the template comes from, for sidecars."""
    return f"https://templateflow.s3.amazonaws.com/tpl-{template.name}/{template.t1w.name}"


__all__ = [
    "TemplateFiles",
    "TemplateNotAvailableError",
    "TemplateSpace",
    "get_template",
    "prefetch_command",
    "template_reference",
    "templateflow_home",
]
