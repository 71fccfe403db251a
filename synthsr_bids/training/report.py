"""A training run at a glance: ``<run dir>/report/index.html``.

``python -m synthsr_bids.training report --config configs/default.toml`` reads the run's
``loss.csv`` and ``validation.csv`` and its newest checkpoint, and writes

* ``curves.png``: training losses (moving averages) and the validation numbers against steps;
* ``samples.png``: the fixed held-out validation samples (input, synthetic T1 target,
  prediction of the newest checkpoint (its weight average when the run keeps one), absolute error, lesions outlined in red);
* ``index.html``: those figures, the run's position (stage, steps, CPU hours) and the newest
  validation Dice per structure.

Training runs for days across sessions; the curves and the pictures show whether it still
improves, and where it fails (contrasts, thick slices, lesions), better than a loss number.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from ..io import write_text_atomic
from ..reports.figures import BACKGROUND, LESION_COLOUR, save_figure
from ..reports.render import render
from .config import TrainingConfig
from .generator import SynthBatch
from .loop import SEGMENTER_HISTORY, Trainer, TrainingError, label_scheme, latest_checkpoint, load_validation_volumes

__all__ = [
    "LossCurve",
    "ValidationLog",
    "read_loss_log",
    "read_validation_log",
    "read_segmenter_replacements",
    "moving_average",
    "curves_figure",
    "samples_figure",
    "write_training_report",
]

REPORT_DIR = "report"
_FG = "#dddddd"


@dataclass(frozen=True)
class LossCurve:
    """One stage's rows of ``loss.csv``."""

    steps: np.ndarray  #: 1-based step within the stage
    loss: np.ndarray
    l1: np.ndarray  #: NaN in the segmentation stage
    dice_loss: np.ndarray
    seconds: float  #: generator + network time of these steps
    #: the ``time`` column (UNIX seconds the row was written) and each row's generator + network
    #: seconds: together they tell a row copied from another run's log (None when not read from a log)
    times: np.ndarray | None = None
    step_seconds: np.ndarray | None = None


@dataclass(frozen=True)
class ValidationLog:
    """``validation.csv``: summary metrics per (stage, step) and the newest per-structure Dice."""

    metrics: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  #: stage -> metric -> (steps, values)
    latest_dice: list[tuple[str, float]] = field(default_factory=list)  #: (structure, Dice) of the last pass
    latest: tuple[str, int] | None = None  #: (stage, step) of the last pass


def read_loss_log(path: Path) -> dict[str, LossCurve]:
    """Stage name -> :class:`LossCurve` (empty dict when the file does not exist yet)."""
    if not path.is_file():
        return {}
    rows: dict[str, list[list[float]]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            rows.setdefault(row["stage"], []).append([
                float(row["step"]), float(row["loss"]), float(row["l1"] or "nan"), float(row["dice_loss"] or "nan"),
                float(row["generator_s"]) + float(row["network_s"]), float(row["time"])])
    curves = {}
    for stage, values in rows.items():
        a = np.asarray(values, dtype=np.float64)
        # A resumed run repeats the steps after its last checkpoint: keep the last row per step.
        _, last = np.unique(a[::-1, 0], return_index=True)
        keep = np.sort(len(a) - 1 - last)
        a = a[keep]
        curves[stage] = LossCurve(steps=a[:, 0].astype(np.int64), loss=a[:, 1], l1=a[:, 2], dice_loss=a[:, 3],
                                  seconds=float(a[:, 4].sum()), times=a[:, 5], step_seconds=a[:, 4])
    return curves


def read_validation_log(path: Path) -> ValidationLog:
    metrics: dict[str, dict[str, list[tuple[int, float]]]] = {}
    per_pass: dict[tuple[str, int], list[tuple[str, float]]] = {}
    order: list[tuple[str, int]] = []
    if path.is_file():
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                key = (row["stage"], int(row["step"]))
                if key not in per_pass:
                    per_pass[key] = []
                    order.append(key)
                value = float(row["value"])
                if row["metric"] == "dice":
                    per_pass[key].append((row["structure"], value))
                else:
                    metrics.setdefault(row["stage"], {}).setdefault(row["metric"], []).append((key[1], value))
    arrays = {stage: {name: (np.asarray([s for s, _ in pts], dtype=np.int64), np.asarray([v for _, v in pts]))
                      for name, pts in table.items()} for stage, table in metrics.items()}
    latest = order[-1] if order else None
    return ValidationLog(metrics=arrays, latest_dice=per_pass.get(latest, []) if latest else [], latest=latest)


def read_segmenter_replacements(path: Path) -> list[int]:
    """Regression steps at which the frozen segmenter was replaced (``segmenter_history.csv``)."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return sorted(int(row["step"]) for row in csv.DictReader(fh))


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (shorter at the start; NaNs ignored)."""
    values = np.asarray(values, dtype=np.float64)
    if window < 1:
        raise ValueError("window must be >= 1")
    valid = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(valid, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(valid)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(hi - window, 0)
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), np.nan)


def _style(ax, title: str, xlabel: str) -> None:  # type: ignore[no-untyped-def]
    ax.set_facecolor(BACKGROUND)
    ax.set_title(title, color=_FG, fontsize=9)
    ax.set_xlabel(xlabel, color=_FG, fontsize=8)
    ax.tick_params(colors=_FG, labelsize=7)
    for spine in ax.spines.values():
        spine.set_color("#555555")
    ax.grid(color="#333333", linewidth=0.5)


def curves_figure(losses: dict[str, LossCurve], validation: ValidationLog, *, window: int = 200,
                  replacements: Sequence[int] = ()) -> Figure:
    """Four panels: the two stages' training losses (moving averages) and the validation numbers.

    ``replacements``: regression steps where the frozen segmenter was replaced (dashed lines: the
    Dice numbers of the regression stage change meaning there).
    """
    fig = Figure(figsize=(10, 6.4), facecolor=BACKGROUND)
    axes = fig.subplots(2, 2)
    for ax in (axes[0, 1], axes[1, 0], axes[1, 1]):
        for i, step in enumerate(replacements):
            ax.axvline(step, color="#9be39b", linestyle="--", linewidth=0.8,
                       label="segmenter replaced" if i == 0 else None)
    panels = [
        (axes[0, 0], "segmentation", "dice_loss", "segmentation: training soft-Dice loss"),
        (axes[0, 1], "regression", "l1", "regression: training L1 (target units / 255)"),
    ]
    for ax, stage, attr, title in panels:
        _style(ax, title, "step")
        curve = losses.get(stage)
        if curve is None or not len(curve.steps):
            ax.text(0.5, 0.5, "no steps yet", color=_FG, ha="center", va="center", transform=ax.transAxes)
            continue
        raw = getattr(curve, attr)
        ax.plot(curve.steps, raw, color="#3b6ea8", linewidth=0.3, alpha=0.5)
        ax.plot(curve.steps, moving_average(raw, window), color="#ffb000", linewidth=1.2,
                label=f"mean of {window} steps")
        ax.legend(fontsize=7, facecolor=BACKGROUND, labelcolor=_FG, edgecolor="#555555")
    ax = axes[1, 0]
    _style(ax, "validation (held-out maps): L1", "regression step")
    reg = validation.metrics.get("regression", {})
    for name, colour, label in (("l1", "#ffb000", "l1"), ("l1_lesion", LESION_COLOUR, "l1 inside lesions"),
                                ("l1_ema", "#7fb3e6", "l1, weight average"),
                                ("l1_lesion_ema", "#e6a0c4", "l1 inside lesions, weight average")):
        if name in reg:
            ax.plot(*reg[name], marker="o", markersize=3, color=colour, label=label)
    if reg:
        ax.legend(fontsize=7, facecolor=BACKGROUND, labelcolor=_FG, edgecolor="#555555")
    ax = axes[1, 1]
    _style(ax, "validation: mean Dice of the frozen segmenter", "step in stage")
    for stage, metric, colour, label in (
            ("segmentation", "mean_dice", "#3b6ea8", "on the input (segmentation stage)"),
            ("segmentation", "mean_dice_target", "#7fb3e6", "on the clean T1 target (segmentation stage)"),
            ("regression", "mean_dice", "#ffb000", "on the prediction (regression stage)")):
        table = validation.metrics.get(stage, {})
        if metric in table:
            ax.plot(*table[metric], marker="o", markersize=3, color=colour, label=label)
    if validation.metrics:
        ax.legend(fontsize=7, facecolor=BACKGROUND, labelcolor=_FG, edgecolor="#555555")
    fig.tight_layout()
    return fig


def _describe(batch: SynthBatch) -> str:
    p = batch.params[0] if batch.params else None
    if p is None:
        return ""
    thick = p.acquisition.thick_axes
    spacing = ", ".join(f"{p.acquisition.axes[a].spacing:.1f} mm" for a in thick) if thick else "1 mm iso"
    lesions = "+".join(p.lesions) if p.lesions else "no lesion"
    return f"{p.contrast}, {spacing}{' oblique' if p.acquisition.oblique else ''}, {lesions}"


def samples_figure(batches: Sequence[SynthBatch], predictions: Sequence[torch.Tensor]) -> Figure:
    """Rows: samples; columns: input, target, prediction, |prediction - target|; middle axial slice.

    The slice is the crop's middle along its last axis, or the lesion's centre when it has one.
    """
    columns = ("input", "target (synthetic T1)", "prediction", "|prediction - target|")
    fig = Figure(figsize=(2.0 * len(columns), 2.15 * max(len(batches), 1)), facecolor=BACKGROUND)
    axes = np.atleast_2d(fig.subplots(max(len(batches), 1), len(columns)))
    for row, (batch, pred) in enumerate(zip(batches, predictions)):
        target = batch.target[0, 0].float().numpy()
        lesion = batch.lesion_mask[0, 0].numpy()
        z = int(np.argmax(lesion.sum(axis=(0, 1)))) if lesion.any() else target.shape[2] // 2
        prediction = pred[0, 0].float().numpy()
        vmax = float(np.percentile(target, 99.5)) or 1.0
        shown = [(batch.input[0, 0].numpy(), 0.0, 1.0, "gray"), (target, 0.0, vmax, "gray"),
                 (prediction, 0.0, vmax, "gray"), (np.abs(prediction - target), 0.0, 0.5 * vmax, "inferno")]
        for col, (volume, lo, hi, cmap) in enumerate(shown):
            ax = axes[row, col]
            ax.imshow(volume[:, :, z].T, cmap=cmap, vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            if lesion[:, :, z].any() and col != 1:
                ax.contour(lesion[:, :, z].T.astype(float), levels=[0.5], colors=LESION_COLOUR, linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], color=_FG, fontsize=8)
            if col == 0:
                ax.set_ylabel(_describe(batch), color=_FG, fontsize=6)
    fig.tight_layout()
    return fig


def _predict(trainer: Trainer, batches: Sequence[SynthBatch]) -> list[torch.Tensor]:
    """Predictions of the weights the run exports: the weight average when it keeps one, else the raw weights."""
    assert trainer.regressor is not None
    model = trainer.averaged_regressor() or trainer.regressor.eval()
    with torch.no_grad():
        return [trainer.synthesize(batch.input, model).cpu() for batch in batches]


def write_training_report(config: TrainingConfig, *, output: Path | None = None) -> Path:
    """Write the report of the run in ``config.run.dir``; returns the path of ``index.html``."""
    run_dir = Path(config.run.dir).resolve()
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise TrainingError(f"no checkpoint in {run_dir} (train first)")
    out = Path(output) if output is not None else run_dir / REPORT_DIR
    losses = read_loss_log(run_dir / "loss.csv")
    validation = read_validation_log(run_dir / "validation.csv")
    replacements = read_segmenter_replacements(run_dir / SEGMENTER_HISTORY)
    save_figure(curves_figure(losses, validation, replacements=replacements), out / "curves.png")

    samples, weights = None, None
    if config.data.validation_maps:
        # Only the held-out maps are read: they are all the samples need (and all the training maps would
        # take much longer to load).
        scheme = label_scheme(config)
        held_out = load_validation_volumes(config, scheme)
        trainer = Trainer(config, volumes=held_out, validation_volumes=held_out, scheme=scheme)
        trainer.load_checkpoint(checkpoint)
        if trainer.regressor is not None:
            torch.set_num_threads(config.run.threads)
            batches = trainer.validation_batches()
            save_figure(samples_figure(batches, _predict(trainer, batches)), out / "samples.png")
            samples = "samples.png"
            weights = "raw weights" if trainer.reg_ema is None else f"weight average: {trainer.reg_ema.describe()}"
    stage_steps = {"segmentation": config.segmentation.steps, "regression": config.regression.steps}
    stages = [{"name": name, "done": int(curve.steps.max()) if len(curve.steps) else 0,
               "planned": stage_steps.get(name, 0), "hours": curve.seconds / 3600.0}
              for name, curve in losses.items()]
    latest_metrics = []
    if validation.latest is not None:
        stage, step = validation.latest
        for name, (steps, values) in validation.metrics.get(stage, {}).items():
            if len(steps) and steps[-1] == step:
                latest_metrics.append((name, f"{values[-1]:.4f}"))
    html = render("training.html", run_dir=str(run_dir), checkpoint=checkpoint.name, stages=stages,
                  total_hours=sum(s["hours"] for s in stages), latest=validation.latest,
                  latest_metrics=latest_metrics, dice=[(name, f"{value:.3f}") for name, value in validation.latest_dice],
                  samples=samples, weights=weights, replacements=replacements, command="python -m synthsr_bids.training report", run_id=checkpoint.stem)
    path = out / "index.html"
    write_text_atomic(path, html)
    return path
