"""Progress bars and log lines share stderr without garbling each other."""

from __future__ import annotations

import logging
import sys

from synthsr_bids.progress import progress_bar


def test_log_lines_print_above_a_shown_bar_and_handlers_come_back(capsys):
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("LOG %(message)s"))
    root.addHandler(console)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with progress_bar(3, unit="scan", desc="demo-bar", enabled=True) as bar:
            assert console not in root.handlers  # routed through tqdm.write meanwhile
            logging.getLogger("synthsr_bids.test").info("scan %d done", 1)
            bar.update(1)
        assert console in root.handlers
        logging.getLogger("synthsr_bids.test").info("after")
    finally:
        root.removeHandler(console)
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "demo-bar" in err  # the bar was drawn
    lines = err.replace("\r", "\n").splitlines()
    assert "LOG scan 1 done" in lines and "LOG after" in lines  # whole lines, formatter kept
    assert err.count("scan 1 done") == 1


def test_bar_is_hidden_when_asked(capsys):
    with progress_bar(2, unit="case", desc="hidden-bar", enabled=False) as bar:
        bar.update(2)
    assert "hidden-bar" not in capsys.readouterr().err
