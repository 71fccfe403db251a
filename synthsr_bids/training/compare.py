"""Paired A/B comparison of two training runs forked from one checkpoint.

The generator's random state is part of every checkpoint, so two runs resumed from copies of
the same checkpoint with the same thread count draw *identical* samples step for step (a
different thread count changes nothing in the generator, but keep it equal so that both
arms run at the same speed). Whatever differs in their training losses at the same step is
then the effect of the changed setting (learning rate, loss network, ...), not sampling noise,
and a few hundred steps measure effects that unpaired runs would need thousands of steps for.

``python -m synthsr_bids.training compare RUN_A RUN_B`` pairs the ``loss.csv`` rows of the
two run folders by step and prints the mean of ``B - A`` per block of steps, over all paired
steps (with a standard error from the means of the full blocks: neighbouring steps share weights,
so their differences are not independent; consecutive blocks are not fully independent either, so
read it as a lower bound), and the validation numbers both runs logged at the same step. Rows a
fork copied with the whole run folder (same time stamp, step time and losses in both logs) are
history both runs share and are skipped. The first paired step is checked: if the two runs did not score the same loss there, they did
not start from the same weights or did not draw the same samples, and the comparison says so.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .report import LossCurve, read_loss_log, read_validation_log

__all__ = ["PairedBlock", "PairedComparison", "compare_curves", "compare_runs", "format_comparison"]

#: Loss columns of :class:`LossCurve` that can be compared.
METRICS = ("l1", "loss", "dice_loss")
#: Relative tolerance for "the first paired step scored the same" (bfloat16 autocast is deterministic
#: on one thread; a different thread count can change the last bits of the reductions).
SAME_START_RTOL = 1e-3


class CompareError(ValueError):
    """The two runs cannot be compared (no loss log, no common steps); the message says why."""


@dataclass(frozen=True)
class PairedBlock:
    """Mean difference ``B - A`` over the paired steps ``first..last``."""

    first: int
    last: int
    count: int
    mean_a: float
    mean_b: float

    @property
    def difference(self) -> float:
        return self.mean_b - self.mean_a


@dataclass(frozen=True)
class PairedComparison:
    """The paired comparison of one metric of one stage (see the module docstring)."""

    stage: str
    metric: str
    blocks: tuple[PairedBlock, ...]
    mean_a: float
    mean_b: float
    #: standard error of the mean difference from the means of the full blocks (NaN with fewer than 2)
    standard_error: float
    #: the first paired step and whether both runs scored the same there (same weights and samples)
    first_step: int
    same_start: bool
    #: validation metric name -> [(step, value A, value B)] at the steps both runs validated
    validation: dict[str, list[tuple[int, float, float]]]

    @property
    def difference(self) -> float:
        return self.mean_b - self.mean_a

    @property
    def count(self) -> int:
        return sum(b.count for b in self.blocks)


def compare_curves(a: LossCurve, b: LossCurve, *, metric: str = "l1", block: int = 100, stage: str = "regression",
                   validation: dict[str, list[tuple[int, float, float]]] | None = None) -> PairedComparison:
    """Pair two loss curves by step and summarise ``B - A`` of ``metric`` in blocks of ``block`` steps.

    Raises:
        CompareError: unknown metric, bad block size, or no step in common.
    """
    if metric not in METRICS:
        raise CompareError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if block < 1:
        raise CompareError("the block size must be at least 1 step")
    common, ia, ib = np.intersect1d(a.steps, b.steps, assume_unique=True, return_indices=True)
    values_a = getattr(a, metric)[ia]
    values_b = getattr(b, metric)[ib]
    keep = np.isfinite(values_a) & np.isfinite(values_b)
    if common[keep].size == 0:
        raise CompareError(f"the two runs have no {stage} step with a {metric} value in common")
    own = ~_copied_rows(a, b, ia, ib)
    keep &= own
    last_paired = int(common[own][-1]) if own.any() else -1  # of any row, with or without a value of metric
    common, values_a, values_b = common[keep], values_a[keep], values_b[keep]
    if common.size == 0:
        raise CompareError("the two runs only share rows copied from one log into the other (the history before "
                           "the fork): nothing to compare yet")
    first = int(common[0])
    same_start = _same_start(a, b, first, metric)
    blocks = []
    starts = first + ((common - first) // block) * block
    window_starts = np.unique(starts)
    for start in window_starts:
        sel = starts == start
        steps = common[sel]
        blocks.append(PairedBlock(first=int(steps[0]), last=int(steps[-1]), count=int(sel.sum()),
                                  mean_a=float(values_a[sel].mean()), mean_b=float(values_b[sel].mean())))
    # The standard error uses the full blocks only: a short last block would count as a whole
    # degree of freedom with the noise of a few steps. A block is full when the paired steps go on
    # past the end of its window (so a metric logged on every Nth step only, e.g. the segmenter's
    # Dice with seg_loss_interval = N, still has full blocks of block / N values).
    full = np.array([blk.difference for blk, start in zip(blocks, window_starts, strict=True)
                     if start + block - 1 <= last_paired])
    standard_error = float(full.std(ddof=1) / math.sqrt(full.size)) if full.size >= 2 else math.nan
    return PairedComparison(stage=stage, metric=metric, blocks=tuple(blocks), mean_a=float(values_a.mean()),
                            mean_b=float(values_b.mean()), standard_error=standard_error, first_step=first,
                            same_start=same_start, validation=validation or {})


def _same_start(a: LossCurve, b: LossCurve, step: int, metric: str) -> bool:
    """Whether both runs scored the same at their first paired ``step``: judged on the L1 when both logged
    one there (it does not depend on the loss weights, which may be what the fork changed, e.g.
    ``seg_loss_interval`` reweights the logged total), else on ``metric``."""
    for name in ("l1", metric):
        x, y = getattr(a, name)[a.steps == step], getattr(b, name)[b.steps == step]
        if x.size and y.size and np.isfinite(x[0]) and np.isfinite(y[0]):
            return bool(np.isclose(y[0], x[0], rtol=SAME_START_RTOL, atol=0.0))
    return False


def _copied_rows(a: LossCurve, b: LossCurve, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Leading paired rows that one log copied from the other (a fork made by copying the whole run folder).

    A row is a copy when its time stamp, its step time and all its losses are the same in both logs:
    the two runs' own rows are written at other times with other step times, even where the losses
    agree (the fork's first step, scored with the same weights on the same sample).
    """
    copied = np.zeros(ia.size, dtype=bool)
    if a.times is None or b.times is None or a.step_seconds is None or b.step_seconds is None:
        return copied
    same = (a.times[ia] == b.times[ib]) & (a.step_seconds[ia] == b.step_seconds[ib])
    for name in METRICS:
        x, y = getattr(a, name)[ia], getattr(b, name)[ib]
        same &= (x == y) | (np.isnan(x) & np.isnan(y))
    leading = int(np.argmax(~same)) if (~same).any() else same.size
    copied[:leading] = True
    return copied


def _paired_validation(run_a: Path, run_b: Path, stage: str, since: int) -> dict[str, list[tuple[int, float, float]]]:
    """Validation numbers both runs logged at the same step (from step ``since`` on; the last value of a
    step logged twice, e.g. again after a resume)."""
    log_a = read_validation_log(run_a / "validation.csv").metrics.get(stage, {})
    log_b = read_validation_log(run_b / "validation.csv").metrics.get(stage, {})
    paired: dict[str, list[tuple[int, float, float]]] = {}
    for name in sorted(set(log_a) & set(log_b)):
        by_step_a = dict(zip(log_a[name][0].tolist(), log_a[name][1].tolist(), strict=True))
        by_step_b = dict(zip(log_b[name][0].tolist(), log_b[name][1].tolist(), strict=True))
        rows = [(int(s), float(by_step_a[s]), float(by_step_b[s])) for s in sorted(by_step_a)
                if s in by_step_b and s >= since]
        if rows:
            paired[name] = rows
    return paired


def compare_runs(run_a: Path, run_b: Path, *, stage: str = "regression", metric: str = "l1",
                 block: int = 100) -> PairedComparison:
    """:func:`compare_curves` on the ``loss.csv`` (and ``validation.csv``) of two run folders."""
    curves = []
    for run in (run_a, run_b):
        log = Path(run) / "loss.csv"
        if not log.is_file():
            raise CompareError(f"{log}: no loss log (is {run} a training run folder?)")
        stages = read_loss_log(log)
        if stage not in stages:
            raise CompareError(f"{log}: no {stage} steps (stages logged: {', '.join(stages) or 'none'})")
        curves.append(stages[stage])
    result = compare_curves(curves[0], curves[1], metric=metric, block=block, stage=stage)
    return dataclasses.replace(result, validation=_paired_validation(Path(run_a), Path(run_b), stage,
                                                                     since=result.first_step))


def format_comparison(result: PairedComparison, *, name_a: str = "A", name_b: str = "B") -> str:
    """Markdown table of the comparison (what the ``compare`` command prints)."""
    lines = [f"{result.stage} {result.metric}, paired by step: B = {name_b}, A = {name_a}", ""]
    if not result.same_start:
        warning = (f"WARNING: the runs scored differently at their first paired step {result.first_step}: they did "
                   "not start from the same checkpoint or did not draw the same samples, so this is not a paired "
                   "comparison.")
        lines += [warning, ""]
    lines += ["| steps | paired | A | B | B - A |", "|---|---|---|---|---|"]
    for blk in result.blocks:
        lines.append(f"| {blk.first}-{blk.last} | {blk.count} | {blk.mean_a:.4f} | {blk.mean_b:.4f} | "
                     f"{blk.difference:+.4f} |")
    se = "" if math.isnan(result.standard_error) else f" +- {result.standard_error:.4f}"
    lines.append(f"| all | {result.count} | {result.mean_a:.4f} | {result.mean_b:.4f} | "
                 f"**{result.difference:+.4f}{se}** |")
    for name, rows in result.validation.items():
        lines += ["", f"validation {name}:", "", "| step | A | B | B - A |", "|---|---|---|---|"]
        lines += [f"| {step} | {va:.4f} | {vb:.4f} | {vb - va:+.4f} |" for step, va, vb in rows]
    return "\n".join(lines)
