"""Label lists, generation classes, priors and label maps of the generative model.

Everything is indexed by *generation label index* ``i`` (position in ``generation_labels.npy``):
label maps are stored as ``uint8`` arrays of these indices so that the generator can turn them
into intensities, segmentation targets and left/right swaps with lookup tables.

File formats follow SynthSeg's ``labels_classes_priors`` folder (one value per generation label,
priors as ``(2, n_classes)`` arrays). Defaults are the copies in ``synthsr_bids/data/training``
(see the NOTICE.md there for credits).
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = [
    "DATA_DIR",
    "LEFT_RIGHT_PAIRS",
    "LabelFileError",
    "LabelScheme",
    "ContrastPriors",
    "LabelVolume",
    "load_label_scheme",
    "load_contrast_priors",
    "load_label_map",
    "label_volume_from_array",
    "split_hemispheres",
]

LOGGER = logging.getLogger(__name__)

#: Package copies of the label lists and priors.
DATA_DIR = Path(str(resources.files("synthsr_bids") / "data" / "training"))

#: FreeSurfer left label -> right label (aseg conventions; 136/137 <-> 163/164 as in SynthSeg's maps).
LEFT_RIGHT_PAIRS: Mapping[int, int] = {
    2: 41, 3: 42, 4: 43, 5: 44, 7: 46, 8: 47, 10: 49, 11: 50, 12: 51, 13: 52, 17: 53, 18: 54,
    19: 55, 20: 56, 25: 57, 26: 58, 27: 59, 28: 60, 30: 62, 31: 63, 136: 163, 137: 164,
}

#: FreeSurfer's extra-ventricular CSF: left out of :attr:`LabelVolume.tissue_box`.
EXTRA_VENTRICULAR_CSF = 24
#: FreeSurfer labels of midline structures (3rd/4th ventricle, brainstem) used to find the midline.
MIDLINE_LABELS = (14, 15, 16)


class LabelFileError(ValueError):
    """A label list, prior table or label map cannot be used; names the file and the fix."""

    def __init__(self, path: Path | str, problem: str, fix: str = "") -> None:
        self.path = Path(path)
        message = f"{self.path}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


@dataclass(frozen=True, eq=False)
class LabelScheme:
    """Per generation label lookup tables (all arrays have one entry per generation label).

    Attributes:
        labels: FreeSurfer label values (index 0 must be background 0).
        random_classes: Gaussian class for random contrasts.
        contrast_classes: class for realistic contrasts (column of the prior tables).
        segmentation: segmentation label value of each generation label (0 = background).
        t1_mean_prior, t1_std_prior: ``(2, n_contrast_classes)`` normal priors (row 0 mean,
            row 1 std) of the class mean and of the class std in T1.
        extracerebral_labels: labels removed by skull stripping (set to background).
    """

    labels: np.ndarray
    random_classes: np.ndarray
    contrast_classes: np.ndarray
    segmentation: np.ndarray
    t1_mean_prior: np.ndarray
    t1_std_prior: np.ndarray
    extracerebral_labels: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name in ("random_classes", "contrast_classes", "segmentation"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"LabelScheme.{name} has {len(getattr(self, name))} entries, labels has {n}")
        if n > 255:
            raise ValueError(f"at most 255 generation labels are supported, got {n}")
        if int(self.labels[0]) != 0:
            raise ValueError("the first generation label must be background (0)")
        n_cc = int(self.contrast_classes.max()) + 1
        for name in ("t1_mean_prior", "t1_std_prior"):
            arr = getattr(self, name)
            if arr.shape != (2, n_cc):
                raise ValueError(f"LabelScheme.{name} must have shape (2, {n_cc}), got {arr.shape}")

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    @property
    def n_random_classes(self) -> int:
        return int(self.random_classes.max()) + 1

    @property
    def n_contrast_classes(self) -> int:
        return int(self.contrast_classes.max()) + 1

    @property
    def segmentation_labels(self) -> tuple[int, ...]:
        """Sorted segmentation label values; output channel ``k`` of the segmenter is label ``[k]``."""
        return tuple(int(v) for v in np.unique(self.segmentation))

    @property
    def n_segmentation_labels(self) -> int:
        return len(self.segmentation_labels)

    def index_of(self, label: int) -> int:
        hits = np.flatnonzero(self.labels == label)
        if not len(hits):
            raise KeyError(f"label {label} is not a generation label")
        return int(hits[0])

    def segmentation_lut(self) -> np.ndarray:
        """Generation label index -> segmentation channel index (int64)."""
        channels = {v: k for k, v in enumerate(self.segmentation_labels)}
        return np.array([channels[int(v)] for v in self.segmentation], dtype=np.int64)

    def swap_lut(self) -> np.ndarray:
        """Generation label index -> index of its left/right mirror (itself if unpaired)."""
        return _mirror_lut(self.labels)

    def segmentation_swap_lut(self) -> np.ndarray:
        """Segmentation channel -> channel of its left/right mirror."""
        return _mirror_lut(self.segmentation_labels)

    def mask_lut(self, labels: Sequence[int]) -> np.ndarray:
        """Boolean table: generation index -> label value is in ``labels``."""
        return np.isin(self.labels, np.asarray(list(labels)))

    def extracerebral_lut(self) -> np.ndarray:
        return self.mask_lut(sorted(self.extracerebral_labels))


def _load_vector(path: Path, what: str) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LabelFileError(path, f"cannot read the {what} ({exc})", "give a .npy file saved by numpy") from exc
    return np.asarray(arr)


def load_label_scheme(
    *,
    generation_labels: Path | None = None,
    random_classes: Path | None = None,
    contrast_classes: Path | None = None,
    segmentation_labels: Path | None = None,
    t1_mean_prior: Path | None = None,
    t1_std_prior: Path | None = None,
    extracerebral_min_label: int = 500,
) -> LabelScheme:
    """Read a label scheme from SynthSeg-style ``.npy`` files (defaults: the package copies).

    Labels ``>= extracerebral_min_label`` are extra-cerebral (removed when skull stripping).
    """
    paths = {
        "generation labels": generation_labels or DATA_DIR / "generation_labels.npy",
        "random classes": random_classes or DATA_DIR / "generation_classes.npy",
        "contrast classes": contrast_classes or DATA_DIR / "generation_classes_contrast_specific.npy",
        "segmentation labels": segmentation_labels or DATA_DIR / "segmentation_labels.npy",
        "T1 mean prior": t1_mean_prior or DATA_DIR / "prior_means_t1.npy",
        "T1 std prior": t1_std_prior or DATA_DIR / "prior_stds_t1.npy",
    }
    arrays = {what: _load_vector(Path(p), what) for what, p in paths.items()}
    labels = arrays["generation labels"].astype(np.int64).ravel()
    n = len(labels)
    for what in ("random classes", "contrast classes", "segmentation labels"):
        arr = arrays[what].ravel()
        if len(arr) != n:
            raise LabelFileError(
                paths[what], f"has {len(arr)} entries but the generation labels ({paths['generation labels']}) have {n}",
                "use files made for the same label list",
            )
    order = np.argsort(labels, kind="stable")
    if labels[order[0]] != 0:
        raise LabelFileError(paths["generation labels"], "does not contain background (0)", "add label 0")
    # Background first, the rest in file order (the order itself does not matter elsewhere).
    order = np.concatenate([[int(np.flatnonzero(labels == 0)[0])], np.flatnonzero(labels != 0)])
    try:
        return LabelScheme(
            labels=labels[order],
            random_classes=arrays["random classes"].ravel().astype(np.int64)[order],
            contrast_classes=arrays["contrast classes"].ravel().astype(np.int64)[order],
            segmentation=arrays["segmentation labels"].ravel().astype(np.int64)[order],
            t1_mean_prior=np.asarray(arrays["T1 mean prior"], dtype=np.float64),
            t1_std_prior=np.asarray(arrays["T1 std prior"], dtype=np.float64),
            extracerebral_labels=frozenset(int(v) for v in labels if v >= extracerebral_min_label),
        )
    except ValueError as exc:
        raise LabelFileError(paths["T1 mean prior"], str(exc), "check that all files belong together") from exc


@dataclass(frozen=True, eq=False)
class ContrastPriors:
    """Uniform priors on class means/stds for named realistic contrasts (see contrast_priors.toml)."""

    names: tuple[str, ...]
    mean_low: Mapping[str, np.ndarray]
    mean_high: Mapping[str, np.ndarray]
    std_low: Mapping[str, np.ndarray]
    std_high: Mapping[str, np.ndarray]


def load_contrast_priors(path: Path | None = None, *, n_classes: int) -> ContrastPriors:
    """Read ``contrast_priors.toml`` (default: the package copy) for ``n_classes`` contrast classes."""
    path = Path(path) if path is not None else DATA_DIR / "contrast_priors.toml"
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LabelFileError(path, f"cannot read the contrast priors ({exc})") from exc
    tables = doc.get("contrasts", {})
    if not tables:
        raise LabelFileError(path, "has no [contrasts.NAME] table", "see synthsr_bids/data/training/contrast_priors.toml")
    out: dict[str, dict[str, np.ndarray]] = {k: {} for k in ("mean_low", "mean_high", "std_low", "std_high")}
    for name, table in tables.items():
        for key in out:
            values = np.asarray(table.get(key, []), dtype=np.float64)
            if values.shape != (n_classes,):
                raise LabelFileError(
                    path, f"[contrasts.{name}].{key} has {values.size} values, expected {n_classes}",
                    "one value per contrast-specific generation class",
                )
            out[key][name] = values
        if np.any(out["mean_high"][name] < out["mean_low"][name]) or np.any(out["std_high"][name] < out["std_low"][name]):
            raise LabelFileError(path, f"[contrasts.{name}] has a high bound below its low bound")
    return ContrastPriors(names=tuple(tables), **out)


@dataclass(frozen=True, eq=False)
class LabelVolume:
    """A label map in RAS voxel order, as generation label indices.

    Attributes:
        name: file name (for logs).
        indices: ``uint8`` array of generation label indices, cropped to the non-background box.
        brain_box: ``(low, high)`` voxel corners (inclusive, exclusive) of the non-extra-cerebral
            foreground inside ``indices``.
        tissue_box: the same without the extra-ventricular CSF (label 24), which in many label maps
            runs down the spinal canal into the neck; ``None``: the brain box.
    """

    name: str
    indices: np.ndarray
    brain_box: tuple[tuple[int, int, int], tuple[int, int, int]]
    tissue_box: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

    def box_centre_extent(self, which: str = "brain") -> tuple[np.ndarray, np.ndarray]:
        """Centre (voxels) and extent of the ``"brain"`` or ``"tissue"`` box."""
        box = self.tissue_box if which == "tissue" and self.tissue_box is not None else self.brain_box
        low, high = (np.asarray(c, dtype=np.float64) for c in box)
        return (low + high - 1) / 2, high - low

    @property
    def brain_centre(self) -> np.ndarray:
        return self.box_centre_extent("brain")[0]

    @property
    def brain_extent(self) -> np.ndarray:
        return self.box_centre_extent("brain")[1]


def split_hemispheres(labels: np.ndarray, *, left_labels: Sequence[int] | None = None) -> np.ndarray:
    """Give right-hemisphere voxels of a RAS-ordered map their right FreeSurfer label.

    For maps (like SynthSR's tutorial maps) that use left labels on both sides. The midline is a
    plane ``x = a + b y + c z`` fitted (least squares) to the midline structures 14, 15 and 16;
    left labels with ``x`` beyond the plane become their right counterpart.
    """
    left = list(LEFT_RIGHT_PAIRS) if left_labels is None else list(left_labels)
    mid = np.argwhere(np.isin(labels, MIDLINE_LABELS))
    if len(mid) < 10:
        raise ValueError("cannot find the midline: fewer than 10 voxels of labels 14/15/16")
    design = np.column_stack([np.ones(len(mid)), mid[:, 1], mid[:, 2]])
    coef, *_ = np.linalg.lstsq(design, mid[:, 0].astype(np.float64), rcond=None)
    _, ys, zs = np.indices(labels.shape, sparse=True)
    midline_x = coef[0] + coef[1] * ys + coef[2] * zs
    xs = np.arange(labels.shape[0])[:, None, None]
    right_side = xs > midline_x
    out = labels.copy()
    for lab in left:
        sel = (labels == lab) & right_side
        out[sel] = LEFT_RIGHT_PAIRS[lab]
    return out


def label_volume_from_array(
    values: np.ndarray,
    scheme: LabelScheme,
    *,
    name: str = "array",
    aliases: Mapping[int, int] | None = None,
    margin: int = 2,
    source: Path | str | None = None,
) -> LabelVolume:
    """Turn a RAS-ordered integer label array into a :class:`LabelVolume`.

    ``aliases`` maps label values that are not generation labels onto generation labels (e.g.
    SynthSR's choroid plexus 31 -> lateral ventricle 4). Any other unknown label is an error.
    """
    values = np.asarray(values)
    if values.ndim != 3:
        raise LabelFileError(source or name, f"label map must be 3D, got shape {values.shape}")
    ints = np.rint(values).astype(np.int64)
    if aliases:
        remapped = ints.copy()
        for src, dst in aliases.items():
            remapped[ints == src] = dst
        ints = remapped
    present = np.unique(ints)
    position = {int(v): i for i, v in enumerate(scheme.labels)}
    unknown = [int(v) for v in present if int(v) not in position]
    if unknown:
        raise LabelFileError(
            source or name, f"contains labels {unknown} that are not generation labels",
            "add them to the generation label list or map them with label_aliases in the config",
        )
    lut = np.zeros(int(present.max()) + 1, dtype=np.uint8)
    for v in present:
        lut[int(v)] = position[int(v)]
    indices = lut[ints]
    foreground = np.argwhere(indices > 0)
    if not len(foreground):
        raise LabelFileError(source or name, "is empty (only background)")
    low = np.maximum(foreground.min(0) - margin, 0)
    high = np.minimum(foreground.max(0) + 1 + margin, indices.shape)
    indices = np.ascontiguousarray(indices[low[0]:high[0], low[1]:high[1], low[2]:high[2]])
    brain = ~scheme.extracerebral_lut()[indices] & (indices > 0)
    brain_vox = np.argwhere(brain)
    if not len(brain_vox):
        raise LabelFileError(source or name, "has no brain labels (only background and extra-cerebral labels)")
    box = (tuple(int(v) for v in brain_vox.min(0)), tuple(int(v) + 1 for v in brain_vox.max(0)))
    tissue_box = box
    if EXTRA_VENTRICULAR_CSF in position:
        tissue_vox = np.argwhere(brain & (indices != position[EXTRA_VENTRICULAR_CSF]))
        if len(tissue_vox):
            tissue_box = (tuple(int(v) for v in tissue_vox.min(0)), tuple(int(v) + 1 for v in tissue_vox.max(0)))
    return LabelVolume(name=name, indices=indices, brain_box=box, tissue_box=tissue_box)  # type: ignore[arg-type]


def load_label_map(
    path: Path,
    scheme: LabelScheme,
    *,
    aliases: Mapping[int, int] | None = None,
    split_left_right: bool = False,
) -> LabelVolume:
    """Load a NIfTI label map, reorient it to RAS (axis permutations/flips only) and index it.

    Raises :class:`LabelFileError` naming the file when it is not a usable 3D label map.
    """
    path = Path(path)
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for bad files
        raise LabelFileError(path, f"cannot be read as a NIfTI image ({exc})") from exc
    zooms = np.asarray(image.header.get_zooms()[:3], dtype=np.float64)
    if len(image.shape) != 3:
        raise LabelFileError(path, f"is not a 3D label map (shape {image.shape})")
    if not np.allclose(zooms, 1.0, atol=0.05):
        raise LabelFileError(path, f"has voxel size {zooms.tolist()} mm, the generator needs 1 mm label maps",
                             "resample it (nearest neighbour) to 1 mm first")
    image = nib.as_closest_canonical(image)
    values = np.asarray(image.dataobj)
    ints = np.rint(values).astype(np.int64)
    if aliases:
        remapped = ints.copy()
        for src, dst in aliases.items():
            remapped[ints == src] = dst
        ints = remapped
    if split_left_right:
        ints = split_hemispheres(ints)
    LOGGER.debug("loaded label map %s, shape %s", path, ints.shape)
    return label_volume_from_array(ints, scheme, name=path.name, source=path)


def _mirror_lut(labels: Sequence[int]) -> np.ndarray:
    """Index into ``labels`` -> index of its left/right mirror (itself if unpaired)."""
    position = {int(v): i for i, v in enumerate(labels)}
    lut = np.arange(len(labels), dtype=np.int64)
    for left, right in LEFT_RIGHT_PAIRS.items():
        if left in position and right in position:
            lut[position[left]] = position[right]
            lut[position[right]] = position[left]
    return lut
