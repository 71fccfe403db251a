"""Render the Jinja2 report templates of ``synthsr_bids/data/reports`` (autoescaped)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from synthsr_bids import __version__

TEMPLATES_DIR = Path(str(resources.files("synthsr_bids") / "data" / "reports"))


@lru_cache(maxsize=1)
def _environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(
        loader=FileSystemLoader(str(TEMPLATES_DIR)),
        autoescape=select_autoescape(["html"], default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=False,
        keep_trailing_newline=True,
    )


def render(template_name: str, /, **context: Any) -> str:
    """Render the template file ``template_name`` with the common fields (version, date) filled in."""
    context.setdefault("version", __version__)
    context.setdefault("date", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    context.setdefault("command", "")
    context.setdefault("run_id", "")
    return _environment().get_template(template_name).render(**context)


def relative_link(path: Path, start: Path) -> str:
    """URL-style relative link from the folder ``start`` to ``path``."""
    return Path(os.path.relpath(path, start)).as_posix()
