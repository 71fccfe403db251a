"""Progress bars that share the terminal with log lines.

A tqdm bar and a logging ``StreamHandler`` both write to stderr; without coordination each log
line lands in the middle of the bar. :func:`progress_bar` routes the console log handlers of the
root logger through ``tqdm.write`` while the bar is shown (tqdm's own ``logging_redirect_tqdm``),
so log lines print above the bar. The bar is hidden when stderr is not a terminal (batch jobs,
SLURM logs), where only the log lines are wanted.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


@contextmanager
def progress_bar(total: int, *, unit: str, desc: str, enabled: bool | None = None) -> Iterator[tqdm]:
    """A bar of ``total`` ``unit`` s; ``enabled=None``: only on a terminal."""
    with logging_redirect_tqdm(), tqdm(total=total, unit=unit, desc=desc, disable=None if enabled is None
                                       else not enabled, leave=False) as bar:
        yield bar
