"""The training report's log readers and curve maths (the figures and HTML: test_training.py's CLI test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthsr_bids.training.report import (
    curves_figure,
    moving_average,
    read_loss_log,
    read_segmenter_replacements,
    read_validation_log,
)

LOSS_HEADER = "time,stage,step,global_step,loss,l1,dice_loss,generator_s,network_s\n"


def test_moving_average_is_trailing_and_skips_nans():
    values = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    assert moving_average(values, 2).tolist() == pytest.approx([1.0, 2.0, 3.0, 5.0, 6.0])
    assert moving_average(values, 1)[2] != moving_average(values, 1)[2]  # NaN alone stays NaN
    assert moving_average(values, 10)[-1] == pytest.approx(4.0)
    with pytest.raises(ValueError):
        moving_average(values, 0)


def test_loss_log_keeps_the_last_row_of_steps_repeated_after_a_resume(tmp_path: Path):
    log = tmp_path / "loss.csv"
    log.write_text(LOSS_HEADER
                   + "1,segmentation,1,1,0.9,,0.9,0.5,1.5\n"
                   + "2,segmentation,2,2,0.8,,0.8,0.5,1.5\n"
                   + "3,regression,1,3,0.30,0.20,0.40,0.1,1.0\n"
                   + "4,regression,2,4,0.28,0.18,0.40,0.1,1.0\n"
                   # killed before the checkpoint of step 2: the resumed run redoes step 2
                   + "9,regression,2,4,0.25,0.15,0.40,0.1,1.0\n"
                   + "9,regression,3,5,0.20,0.10,0.40,0.1,1.0\n")
    curves = read_loss_log(log)
    assert set(curves) == {"segmentation", "regression"}
    seg, reg = curves["segmentation"], curves["regression"]
    assert seg.steps.tolist() == [1, 2] and np.isnan(seg.l1).all() and seg.dice_loss.tolist() == [0.9, 0.8]
    assert reg.steps.tolist() == [1, 2, 3] and reg.l1.tolist() == pytest.approx([0.20, 0.15, 0.10])
    assert seg.seconds == pytest.approx(4.0) and reg.seconds == pytest.approx(3.3)
    assert read_loss_log(tmp_path / "missing.csv") == {}


def test_validation_log_series_and_newest_dice(tmp_path: Path):
    log = tmp_path / "validation.csv"
    log.write_text("global_step,stage,step,metric,label,structure,value\n"
                   "10,segmentation,10,dice,2,left-cerebral-white-matter,0.5\n"
                   "10,segmentation,10,mean_dice,,all-foreground,0.5\n"
                   "15,regression,5,dice,2,left-cerebral-white-matter,0.6\n"
                   "15,regression,5,dice,3,left-cerebral-cortex,0.4\n"
                   "15,regression,5,mean_dice,,all-foreground,0.5\n"
                   "15,regression,5,l1,,all,0.2\n"
                   "20,regression,10,l1,,all,0.1\n"
                   "20,regression,10,dice,2,left-cerebral-white-matter,0.7\n")
    log_ = read_validation_log(log)
    steps, values = log_.metrics["regression"]["l1"]
    assert steps.tolist() == [5, 10] and values.tolist() == pytest.approx([0.2, 0.1])
    assert log_.metrics["segmentation"]["mean_dice"][1].tolist() == [0.5]
    assert log_.latest == ("regression", 10)
    assert log_.latest_dice == [("left-cerebral-white-matter", pytest.approx(0.7))]


def test_segmenter_replacements_are_read_and_drawn(tmp_path: Path):
    assert read_segmenter_replacements(tmp_path / "missing.csv") == []
    history = tmp_path / "segmenter_history.csv"
    history.write_text("time,global_step,step,old_sha256,new_sha256,new_steps,source\n"
                       "2026-11-24T20:00:00,12000,8000,aa,bb,5500,/x.safetensors\n"
                       "2026-11-24T19:00:00,11000,7000,cc,aa,4000,/y.safetensors\n")
    steps = read_segmenter_replacements(history)
    assert steps == [7000, 8000]
    log = tmp_path / "validation.csv"
    log.write_text("global_step,stage,step,metric,label,structure,value\n"
                   "10,segmentation,10,mean_dice,,all-foreground,0.4\n"
                   "10,segmentation,10,mean_dice_target,,all-foreground,0.7\n")
    validation = read_validation_log(log)
    assert validation.metrics["segmentation"]["mean_dice_target"][1].tolist() == [0.7]
    fig = curves_figure({}, validation, replacements=steps)
    for index, ax in enumerate(fig.axes):  # the regression panels and the Dice panel, at the replacement steps
        dashed = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert dashed == ([] if index == 0 else steps)
    labels = [line.get_label() for line in fig.axes[3].get_lines()]
    assert "on the clean T1 target (segmentation stage)" in labels and "segmenter replaced" in labels
