"""Exit codes and the exceptions that map onto them.

Exit codes follow the BIDS Apps execution-specification draft (which borrows from
``sysexits.h``), so schedulers and wrappers can tell a usage mistake from a bad
scan from a full disk.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Process exit status of ``synthsr-bids``."""

    OK = 0
    SCAN_FAILED = 1  #: at least one scan failed; the others were written
    VALIDATION_FAILED = 16  #: the input dataset is not valid BIDS
    USAGE = 64  #: bad command line
    DATA_ERROR = 65  #: the input data cannot be used (e.g. no dataset_description.json)
    NO_INPUT = 66  #: nothing matched the selection
    CANNOT_CREATE = 73  #: the output (or work) directory cannot be created or written


class SynthSRBidsError(Exception):
    """Base class of errors that end a run with a specific exit code."""

    exit_code: ExitCode = ExitCode.SCAN_FAILED


class UsageError(SynthSRBidsError):
    exit_code = ExitCode.USAGE


class InputDataError(SynthSRBidsError):
    exit_code = ExitCode.DATA_ERROR


class NoInputError(SynthSRBidsError):
    exit_code = ExitCode.NO_INPUT


class OutputError(SynthSRBidsError):
    exit_code = ExitCode.CANNOT_CREATE


class ValidationFailedError(SynthSRBidsError):
    exit_code = ExitCode.VALIDATION_FAILED


class BadInputError(Exception):
    """One input image cannot be processed. Other scans go on.

    The message names the file, what is wrong, and what the user can do about it.
    """

    def __init__(self, path: Path | str, problem: str, fix: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        message = f"{self.path}: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)
