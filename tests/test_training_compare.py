"""Paired A/B comparison of two training runs (``python -m synthsr_bids.training compare``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from synthsr_bids.training.__main__ import main
from synthsr_bids.training.compare import (
    CompareError,
    compare_curves,
    compare_runs,
    format_comparison,
)
from synthsr_bids.training.report import LossCurve

LOSS_HEADER = "time,stage,step,global_step,loss,l1,dice_loss,generator_s,network_s,aux_dice_loss\n"
VALIDATION_HEADER = "global_step,stage,step,metric,label,structure,value\n"


def _curve(steps, l1, times=None) -> LossCurve:
    steps = np.asarray(steps, dtype=np.int64)
    l1 = np.asarray(l1, dtype=np.float64)
    times = None if times is None else np.asarray(times, dtype=np.float64)
    return LossCurve(steps=steps, loss=l1 * 2, l1=l1, dice_loss=np.full(l1.shape, 0.5), seconds=0.0, times=times,
                     step_seconds=None if times is None else np.full(l1.shape, 1.1))


def _write_run(folder: Path, rows: list[tuple[int, float]], *, validation: list[tuple[int, float]] = (),
               started: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{started + 3 * step},regression,{step},{step + 100},{2 * l1},{l1},0.5,0.1,1.0,\n" for step, l1 in rows]
    (folder / "loss.csv").write_text(LOSS_HEADER + "".join(lines))
    if validation:
        (folder / "validation.csv").write_text(VALIDATION_HEADER + "".join(
            f"{step + 100},regression,{step},l1,,all,{value}\n" for step, value in validation))
    return folder


def test_blocks_pair_by_step_and_report_b_minus_a():
    # A has steps 10..19 (and an older step 5 B never ran); B has 10..17 plus 21
    a = _curve([5, *range(10, 20)], [0.9, *[0.10] * 10])
    b = _curve([*range(10, 18), 21], [0.10, 0.12, 0.12, 0.12, 0.13, 0.13, 0.13, 0.13, 0.5])
    result = compare_curves(a, b, block=4)
    assert result.first_step == 10 and result.same_start
    assert [(blk.first, blk.last, blk.count) for blk in result.blocks] == [(10, 13, 4), (14, 17, 4)]
    assert [blk.difference for blk in result.blocks] == pytest.approx([0.015, 0.03])
    assert result.count == 8
    assert result.difference == pytest.approx((0.015 + 0.03) / 2)
    # two equal-size blocks: SE of the mean = |d1 - d2| / 2
    assert result.standard_error == pytest.approx(0.0075)
    # blocks of 3: 10-12, 13-15 and a 2-step rest that is left out of the standard error
    thirds = compare_curves(a, b, block=3)
    assert [blk.count for blk in thirds.blocks] == [3, 3, 2]
    assert thirds.standard_error == pytest.approx(abs(0.04 / 3 - 0.08 / 3) / 2)


def test_different_first_step_is_flagged_as_not_paired():
    result = compare_curves(_curve([1, 2, 3], [0.2, 0.2, 0.2]), _curve([1, 2, 3], [0.3, 0.2, 0.2]), block=10)
    assert not result.same_start
    assert math.isnan(result.standard_error)  # one block: no spread to estimate
    assert "WARNING" in format_comparison(result)


def test_a_metric_logged_on_every_other_step_has_full_blocks_and_pairs_on_the_l1():
    # the fork (B) logs the segmenter's Dice on odd steps only, and its total loss weighs it twice
    steps = np.arange(1, 13)
    l1 = np.full(12, 0.1)
    dice_a = np.linspace(0.5, 0.4, 12)
    dice_b = np.where(steps % 2 == 1, dice_a + np.where(steps <= 4, 0.01, 0.03), np.nan)
    a = LossCurve(steps=steps, loss=l1 + 0.25 * dice_a, l1=l1, dice_loss=dice_a, seconds=0.0)
    b = LossCurve(steps=steps, loss=np.where(np.isnan(dice_b), l1, l1 + 0.5 * np.nan_to_num(dice_b)), l1=l1,
                  dice_loss=dice_b, seconds=0.0)
    result = compare_curves(a, b, metric="dice_loss", block=4)
    assert [(blk.first, blk.last, blk.count) for blk in result.blocks] == [(1, 3, 2), (5, 7, 2), (9, 11, 2)]
    assert [blk.difference for blk in result.blocks] == pytest.approx([0.01, 0.03, 0.03])
    # the last window (9-12) is covered too: three blocks in the standard error
    assert result.standard_error == pytest.approx(np.std([0.01, 0.03, 0.03], ddof=1) / math.sqrt(3))
    # the totals differ from the first step on (other weights), the L1 says the runs start together
    loss = compare_curves(a, b, metric="loss", block=4)
    assert loss.same_start and "WARNING" not in format_comparison(loss)


def test_rows_copied_with_the_run_folder_are_history_not_pairs():
    # steps 1-3 were copied into the fork (same time stamps); the fork's own rows start at step 4,
    # which it scored with the same weights on the same sample (same loss, other time)
    shared = [0.5, 0.4, 0.3]
    a = _curve([1, 2, 3, 4, 5], [*shared, 0.20, 0.20], times=[10, 20, 30, 40, 50])
    b = _curve([1, 2, 3, 4, 5], [*shared, 0.20, 0.15], times=[10, 20, 30, 95, 99])
    result = compare_curves(a, b, block=10)
    assert result.first_step == 4 and result.same_start and result.count == 2
    assert result.difference == pytest.approx(-0.025)
    # a full copy whose own first row differs did not resume the same state: flagged
    unpaired = compare_curves(a, _curve([1, 2, 3, 4, 5], [*shared, 0.35, 0.15], times=[10, 20, 30, 95, 99]))
    assert unpaired.first_step == 4 and not unpaired.same_start
    # equal losses written at other times (two arms of a setting that does not touch training) are pairs
    twins = compare_curves(a, _curve([1, 2, 3, 4, 5], [*shared, 0.20, 0.20], times=[11, 21, 31, 41, 51]))
    assert twins.count == 5 and twins.difference == 0.0
    with pytest.raises(CompareError, match="only share rows copied"):
        compare_curves(a, a)


def test_errors_name_the_problem(tmp_path: Path):
    with pytest.raises(CompareError, match="no regression step"):
        compare_curves(_curve([1, 2], [0.1, 0.1]), _curve([3, 4], [0.1, 0.1]))
    with pytest.raises(CompareError, match="unknown metric"):
        compare_curves(_curve([1], [0.1]), _curve([1], [0.1]), metric="psnr")
    with pytest.raises(CompareError, match="no loss log"):
        compare_runs(tmp_path / "nothing", tmp_path / "nothing")


def test_cli_prints_blocks_and_paired_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    a = _write_run(tmp_path / "main", [(s, 0.10) for s in range(1, 201)], validation=[(100, 0.11), (200, 0.10)])
    b = _write_run(tmp_path / "fork", [(1, 0.10), *[(s, 0.08) for s in range(2, 201)]],
                   validation=[(200, 0.095)], started=7)
    assert main(["compare", str(a), str(b), "--block", "100"]) == 0
    out = capsys.readouterr().out
    assert "| 1-100 | 100 | 0.1000 | 0.0802 | -0.0198 |" in out
    assert "| 101-200 | 100 | 0.1000 | 0.0800 | -0.0200 |" in out
    assert "**-0.0199 +- 0.0001**" in out
    assert "| 200 | 0.1000 | 0.0950 | -0.0050 |" in out  # only the step both validated
    assert "WARNING" not in out
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 66
    assert "no loss log" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["compare", str(a), str(b), "--block", "0"])
    assert usage.value.code == 2 and "must be >= 1" in capsys.readouterr().err
