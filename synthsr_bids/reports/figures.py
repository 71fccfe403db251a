"""Report figures, drawn with matplotlib's object API (``Figure`` + Agg; no pyplot state, so
concurrent jobs and threads cannot interfere) and written atomically as PNG.

Volumes are shown in RAS voxel order after :func:`to_ras` (axial and coronal slices with the
subject's right on the right of the picture, "R" marked; sagittal slices anterior to the right).
"""

from __future__ import annotations

import io
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from synthsr_bids.preprocessing.orientation import reorient_to_ras

PLANES = ("axial", "coronal", "sagittal")
#: RAS axis sliced for each plane.
PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
DPI = 80
PANEL_INCHES = 1.6
BACKGROUND = "#111111"
LESION_COLOUR = "#ff3030"
OUTLIER_COLOUR = "#d62728"
#: Red -> orange -> yellow (the dark and white ends of "hot" are cut: they vanish on anatomy).
HEAT_CMAP = ListedColormap(colormaps["hot"](np.linspace(0.3, 0.88, 256)), name="heat")


def save_figure(fig: Figure, path: Path) -> Path:
    """PNG through a temporary sibling and ``os.replace`` (never a half-written figure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor=fig.get_facecolor())
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{path.name}")
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def to_ras(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``data`` with its voxel axes permuted/flipped into RAS order."""
    out, _, _ = reorient_to_ras(np.asarray(data), np.asarray(affine, dtype=np.float64))
    return np.ascontiguousarray(out)


def intensity_window(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> tuple[float, float]:
    """Display range from percentiles of the non-zero voxels."""
    values = volume[np.isfinite(volume) & (volume != 0)]
    if values.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(values, [low, high]))
    if vmin < 0 and np.mean(values < 0) < 0.05:  # sharpening undershoot, not real negative values
        vmin = 0.0
    if vmax <= vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def slice_indices(reference: np.ndarray, axis: int, n: int) -> list[int]:
    """``n`` slices spread over the foreground (> 10% of the 99th percentile) along ``axis``."""
    size = reference.shape[axis]
    positive = reference[np.isfinite(reference)]
    threshold = 0.1 * float(np.percentile(positive, 99)) if positive.size else 0.0
    profile = (reference > threshold).sum(axis=tuple(a for a in range(3) if a != axis))
    present = np.flatnonzero(profile)
    first, last = (int(present[0]), int(present[-1])) if present.size else (0, size - 1)
    span = last - first
    positions = np.linspace(first + 0.15 * span, last - 0.15 * span, n) if n > 1 else [first + 0.5 * span]
    return sorted({int(round(p)) for p in positions})


def slice_reference(layers: Sequence[Layer]) -> np.ndarray:
    """The volume whose foreground places the slices: the last layer (the synthetic image),
    or the last one with any positive voxel when it is empty (e.g. a failed or blank output)."""
    for layer in reversed(layers):
        if np.any(np.asarray(layer.volume) > 0):
            return layer.volume
    return layers[-1].volume


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """2D picture (rows bottom-to-top after ``origin="lower"``) of a RAS volume."""
    axis = PLANE_AXIS[plane]
    return np.take(volume, index, axis=axis).T


@dataclass(frozen=True)
class Layer:
    """One row of a mosaic: a RAS volume, its label, and how to colour it."""

    label: str
    volume: np.ndarray
    cmap: str = "gray"


def _hide(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def label_colormap(colours: Mapping[int, tuple[int, int, int]]) -> tuple[ListedColormap, np.ndarray]:
    """A colormap over label *positions*, and the lookup label id -> position."""
    ids = sorted(colours)
    lookup = np.zeros(max(ids) + 1 if ids else 1, dtype=np.int32)
    rgba = [(0.0, 0.0, 0.0, 0.0)]
    for position, label in enumerate(i for i in ids if i != 0):
        lookup[label] = position + 1
        r, g, b = colours[label]
        rgba.append((r / 255, g / 255, b / 255, 1.0))
    return ListedColormap(rgba), lookup


def mosaic(
    layers: Sequence[Layer],
    path: Path,
    *,
    reference: np.ndarray | None = None,
    contour: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    label_colours: Mapping[int, tuple[int, int, int]] | None = None,
    heat: np.ndarray | None = None,
    heat_label: str = "",
    n_slices: int = 5,
    title: str = "",
) -> Path:
    """For each plane, one row per layer with ``n_slices`` slices at the same positions.

    ``contour`` (binary RAS volume) is outlined in red on every row; ``labels`` (RAS label
    ids) is drawn semi-transparent with ``label_colours``; ``heat`` (RAS, 0..1) is drawn with
    a hot colour map above 0 and a colour bar.
    """
    if not layers:
        raise ValueError("nothing to draw")
    reference = slice_reference(layers) if reference is None else reference
    windows = [intensity_window(layer.volume) for layer in layers]
    if heat is not None:  # darker anatomy so that the heat map stands out
        windows = [(low, low + 1.8 * (high - low)) for low, high in windows]
    rows = [(plane, index) for plane in PLANES for index in range(len(layers))]
    columns = {plane: slice_indices(reference, PLANE_AXIS[plane], n_slices) for plane in PLANES}
    n_cols = max(len(c) for c in columns.values())
    fig = Figure(figsize=(PANEL_INCHES * n_cols + 1.3, PANEL_INCHES * len(rows) + (0.5 if title else 0.1)))
    fig.set_facecolor(BACKGROUND)
    label_cmap = lookup = None
    if labels is not None:
        label_cmap, lookup = label_colormap(label_colours or {})
    heat_image = None
    axes = fig.subplots(len(rows), n_cols, squeeze=False, gridspec_kw={"wspace": 0.02, "hspace": 0.04})
    for row, (plane, layer_index) in enumerate(rows):
        layer = layers[layer_index]
        vmin, vmax = windows[layer_index]
        for col in range(n_cols):
            ax = axes[row][col]
            _hide(ax)
            ax.set_facecolor("black")
            if col >= len(columns[plane]):
                continue
            index = columns[plane][col]
            ax.imshow(plane_slice(layer.volume, plane, index), cmap=layer.cmap, vmin=vmin, vmax=vmax,
                      origin="lower", interpolation="nearest")
            if labels is not None and lookup is not None:
                positions = lookup[np.clip(plane_slice(labels, plane, index), 0, len(lookup) - 1)]
                ax.imshow(np.ma.masked_equal(positions, 0), cmap=label_cmap, vmin=0, vmax=label_cmap.N - 1,
                          alpha=0.45, origin="lower", interpolation="nearest")
            if heat is not None:
                picture = plane_slice(heat, plane, index)
                heat_image = ax.imshow(np.ma.masked_less_equal(picture, 0), cmap=HEAT_CMAP, vmin=0, vmax=1,
                                       origin="lower", interpolation="nearest", alpha=0.9)
            if contour is not None:
                outline = plane_slice(contour, plane, index)
                if outline.any() and outline.min() != outline.max():
                    ax.contour(outline.astype(float), levels=[0.5], colors=LESION_COLOUR, linewidths=1.0)
            if plane != "sagittal" and col == 0:
                ax.text(0.97, 0.03, "R", color="yellow", fontsize=8, ha="right", va="bottom", transform=ax.transAxes)
            if col == 0:
                ax.set_ylabel(f"{layer.label}\n{plane} ", color="white", fontsize=8)
    top = 1.0 - 0.45 / fig.get_figheight() if title else 0.99
    fig.subplots_adjust(left=0.9 / fig.get_figwidth(), right=0.99 if heat is None else 0.9, bottom=0.01, top=top)
    if title:
        fig.suptitle(title, color="white", fontsize=10, y=0.995)
    if heat_image is not None:
        bar = fig.colorbar(heat_image, ax=axes, fraction=0.02, pad=0.01)
        bar.set_label(heat_label, color="white")
        bar.ax.tick_params(colors="white")
    return save_figure(fig, path)


def spread(positions: Sequence[float], gap: float, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """``positions`` moved apart to at least ``gap`` from each other, order kept, inside
    ``[low, high]`` when they fit (label placement: labels at these heights do not overlap)."""
    values = np.asarray(positions, dtype=np.float64)
    if values.size == 0:
        return values.copy()
    order = np.argsort(values, kind="stable")
    placed = np.clip(values[order], low, high)
    for i in range(1, placed.size):
        placed[i] = max(placed[i], placed[i - 1] + gap)
    if placed[-1] > high:
        placed[-1] = high
        for i in range(placed.size - 2, -1, -1):
            placed[i] = min(placed[i], placed[i + 1] - gap)
    out = np.empty_like(placed)
    out[order] = placed
    return out


#: Most flagged points named in one strip-plot panel (the farthest from the median first).
MAX_POINT_LABELS = 6


def strip_plots(
    series: Mapping[str, Sequence[float]],
    names: Sequence[str],
    path: Path,
    *,
    flagged: Mapping[str, Sequence[bool]] | None = None,
    ylabels: Mapping[str, str] | None = None,
    columns: int = 4,
    title: str = "",
) -> Path:
    """One panel per series: jittered points on the left, median line, flagged points in red
    and named on the right (at most :data:`MAX_POINT_LABELS` per panel, the rest counted)."""
    keys = [k for k in series if any(math.isfinite(v) for v in series[k])]
    if not keys:
        keys = list(series)[:1]
    n = max(len(keys), 1)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(3.2 * columns, 2.6 * rows + (0.4 if title else 0)))
    axes = fig.subplots(rows, columns, squeeze=False)
    rng = np.random.default_rng(0)
    for position, key in enumerate(keys):
        ax = axes[position // columns][position % columns]
        values = np.asarray(series[key], dtype=float)
        marks = np.asarray((flagged or {}).get(key, [False] * len(values)), dtype=bool)
        x = rng.uniform(-0.25, 0.25, size=len(values))
        finite = np.isfinite(values)
        ax.scatter(x[finite & ~marks], values[finite & ~marks], s=18, color="#1f77b4", alpha=0.8)
        median = float(np.median(values[finite])) if finite.any() else math.nan
        if finite.any():
            ax.axhline(median, color="grey", lw=0.8, ls="--")
        ax.set_xlim(-0.4, 1.6)
        ax.set_xticks([])
        ax.set_title(key, fontsize=9)
        ax.set_ylabel((ylabels or {}).get(key, ""), fontsize=8)
        ax.tick_params(labelsize=7)
        red = np.flatnonzero(finite & marks)
        if red.size:
            ax.scatter(x[red], values[red], s=30, color=OUTLIER_COLOUR, marker="D")
            named = sorted(red, key=lambda i: -abs(values[i] - median))[:MAX_POINT_LABELS]
            low, high = ax.get_ylim()
            more = red.size - len(named)
            heights = spread([(values[i] - low) / (high - low or 1.0) for i in named], gap=0.13,
                             low=0.16 if more else 0.08, high=0.92)
            for i, height in zip(named, heights):
                ax.annotate(wrap_label(names[i], 24), (x[i], values[i]), xytext=(0.36, height),
                            textcoords="axes fraction", fontsize=6, color=OUTLIER_COLOUR, va="center",
                            arrowprops={"arrowstyle": "-", "color": OUTLIER_COLOUR, "lw": 0.5})
            if more:
                ax.text(0.98, 0.02, f"+{more} more flagged", transform=ax.transAxes,
                        fontsize=6, color=OUTLIER_COLOUR, ha="right", va="bottom")
    for position in range(len(keys), rows * columns):
        axes[position // columns][position % columns].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def wrap_label(name: str, width: int = 28) -> str:
    """``name`` on lines of at most ``width`` characters where possible, broken after ``_``
    (BIDS entities stay whole): ``sub-02_ses-1_run-01_desc-synthsrT2w_T1w`` ->
    ``sub-02_ses-1_run-01_`` / ``desc-synthsrT2w_T1w``."""
    lines: list[str] = []
    current = ""
    for part in name.replace("_", "_\0").split("\0"):
        if current and len(current) + len(part) > width:
            lines.append(current)
            current = part
        else:
            current += part
    lines.append(current)
    return "\n".join(lines)


def pages(n: int, per_page: int) -> list[range]:
    """Indices ``0..n-1`` cut into consecutive pages of at most ``per_page``, of even sizes
    (52 items by 48 -> 26 + 26, not 48 + 4)."""
    if n <= 0:
        return []
    count = math.ceil(n / per_page)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(count)]


def thumbnails(
    pictures: Sequence[tuple[str, np.ndarray]],
    path: Path,
    *,
    outline: np.ndarray | None = None,
    columns: int = 6,
    title: str = "",
) -> Path:
    """A grid of 2D pictures (already oriented), each titled (long names wrapped at ``_``);
    ``outline`` contoured on each. The caller bounds the number of pictures (see :func:`pages`)."""
    n = max(len(pictures), 1)
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(2.2 * columns, 2.4 * rows + (0.4 if title else 0)))
    fig.set_facecolor(BACKGROUND)
    axes = fig.subplots(rows, columns, squeeze=False)
    for position in range(rows * columns):
        ax = axes[position // columns][position % columns]
        _hide(ax)
        if position >= len(pictures):
            ax.set_visible(False)
            continue
        name, picture = pictures[position]
        vmin, vmax = intensity_window(picture)
        ax.imshow(picture, cmap="gray", vmin=vmin, vmax=vmax, origin="lower")
        if outline is not None and outline.min() != outline.max():
            ax.contour(outline.astype(float), levels=[0.5], colors="#00e5ff", linewidths=0.7)
        ax.set_title(wrap_label(name), color="white", fontsize=7)
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    return save_figure(fig, path)
