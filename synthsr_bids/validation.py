"""Run the official BIDS validator (PyPI ``bids-validator-deno``).

Used on the raw input (unless ``--skip-bids-validation``) and by the tests on
everything we write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)

VALIDATOR = "bids-validator-deno"


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

    @property
    def errors(self) -> tuple[ValidationIssue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")

    @property
    def warnings(self) -> tuple[ValidationIssue, ...]:
        return tuple(i for i in self.issues if i.severity == "warning")

    def summary(self, limit: int = 10) -> str:
        lines = [f"{len(self.errors)} error(s), {len(self.warnings)} warning(s) in {self.dataset}"]
        for issue in self.errors[:limit]:
            lines.append(f"  {issue.code} {issue.location} {issue.message}".rstrip())
        if len(self.errors) > limit:
            lines.append(f"  ... and {len(self.errors) - limit} more errors")
        return "\n".join(lines)


class ValidatorUnavailableError(RuntimeError):
    pass


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


def validate_dataset(dataset: Path, *, timeout: float = 600.0) -> ValidationReport:
    """Validate ``dataset`` and return every issue the validator reported."""
    command = [find_validator(), str(dataset), "--format", "json"]
    LOGGER.debug("running %s", " ".join(command))
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False
    )
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
    return ValidationReport(dataset=dataset, issues=issues)
