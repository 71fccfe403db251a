"""Training configuration: typed frozen sections read from one TOML file.

Sections (see ``configs/default.toml``): ``[run]``, ``[data]``, ``[generator]`` (fields of
:class:`~synthsr_bids.training.generator.GeneratorConfig`), ``[segmentation]`` and ``[regression]``.
Relative paths are resolved against the directory of the TOML file. Unknown keys are errors
(a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .generator import GeneratorConfig

__all__ = [
    "ConfigError",
    "RunSection",
    "DataSection",
    "NetworkStage",
    "TrainingConfig",
    "load_config",
    "parse_override",
]


class ConfigError(ValueError):
    """The training configuration is invalid; the message names the file and key."""


@dataclass(frozen=True)
class RunSection:
    """Where and how the job runs."""

    dir: Path = Path("training_runs/default")  #: run directory (checkpoints, logs, exports)
    seed: int = 0
    device: str = "cpu"  #: "cpu", "cuda", "cuda:1", ...
    threads: int = 2  #: torch.set_num_threads (per process)
    #: data-parallel worker processes (:mod:`.parallel`): each trains on its own samples and the
    #: gradients are averaged, i.e. batch size x processes per step; CPU only
    processes: int = 1
    autocast: bool = True  #: bfloat16 autocast (CPU) / float16 (CUDA) for the networks
    #: glibc: keep freed tensor memory for the next step instead of unmapping it (1.3x faster
    #: steps on CPU, peak memory kept; :mod:`synthsr_bids.allocator`)
    keep_freed_memory: bool = True
    #: torch.compile (inductor) the networks as the training step calls them; validation and export
    #: use the same modules uncompiled. CPU needs a C++ compiler; the first step of a process compiles
    #: (~1 min here, then cached on disk under TORCHINDUCTOR_CACHE_DIR)
    compile: bool = False
    log_every: int = 10  #: steps between loss-log rows
    checkpoint_every: int = 100  #: steps between checkpoints
    checkpoint_minutes: float = 15.0  #: ... or minutes, whichever comes first
    validate_every: int = 500  #: steps between validation passes
    validation_samples: int = 5  #: fixed held-out samples (one per map, cycling)


@dataclass(frozen=True)
class DataSection:
    """Label maps and label/prior tables (empty path = the copy shipped in synthsr_bids/data/training)."""

    training_maps: tuple[Path, ...] = ()  #: files or directories of *.nii / *.nii.gz
    validation_maps: tuple[Path, ...] = ()
    validation_aliases: Mapping[int, int] = field(default_factory=dict)  #: label -> generation label
    validation_split_left_right: bool = False  #: maps with left labels on both sides
    generation_labels: Path | None = None
    random_classes: Path | None = None
    contrast_classes: Path | None = None
    segmentation_labels: Path | None = None
    t1_mean_prior: Path | None = None
    t1_std_prior: Path | None = None
    contrast_priors: Path | None = None


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class NetworkStage:
    """One U-Net and how long/fast it is trained."""

    base_features: int = 16
    n_levels: int = 4
    feat_mult: int = 2
    convs_per_level: int = 2
    steps: int = 1000
    lr: float = 1e-4  #: Adam learning rate (the peak, when a schedule is set)
    lr_schedule: str = "constant"  #: "constant", or "cosine": decays lr to lr_min by the last step
    lr_min: float = 0.0  #: cosine only: the learning rate at ``steps``
    warmup_steps: int = 0  #: linear ramp from lr / warmup_steps up to lr over the first steps
    batch_size: int = 1
    seg_loss_weight: float = 0.25  #: regression only: weight of the frozen segmenter's soft Dice
    #: regression only: the frozen segmenter's Dice term is evaluated on every ``seg_loss_interval``-th step only,
    #: weighted ``seg_loss_interval x seg_loss_weight`` there: the same loss in expectation over steps, at about
    #: 1/interval of the segmenter's cost (its forward and backward pass are ~40 % of a step on a CPU); 1 = every step
    seg_loss_interval: int = 1
    #: regression only: > 0 adds one output channel per segmentation label to the regressor, trained with
    #: this weight x soft Dice against the label map (an auxiliary task; exports keep the image channel only)
    aux_seg_weight: float = 0.0
    target_input_prob: float = 0.2  #: segmentation only: share of steps fed the clean T1 target
    #: segmentation only: the T1 target fed as input is blurred by an isotropic Gaussian of sigma
    #: U(0, target_blur_max) voxels (robustness to the regressor's blurry predictions)
    target_blur_max: float = 0.0
    #: segmentation only: start a fresh stage from the weights of this synthsr-bids segmenter file (e.g. another
    #: run's segmenter.safetensors; same network and labels) instead of a random initialisation, i.e. fine-tune it;
    #: read when the stage starts (a resumed stage takes its weights from the checkpoint)
    init_weights: Path | None = None
    #: regression only: > 0 keeps an exponential moving average of the weights (spanning ~1/(1 - ema_decay)
    #: steps, :mod:`.ema`), validated next to the raw weights and exported instead of them; 0 = off
    ema_decay: float = 0.0
    #: regression only: whether inference should unsharp-mask this model's outputs (mri_synthsr's post-processing);
    #: written into every exported weight file (``synthsr_bids.sharpen``), which the pipeline follows by default
    output_sharpening: bool = True

    def learning_rate(self, step: int) -> float:
        """The learning rate of (0-based) ``step``: warm-up, then the schedule.

        Applied to the optimiser at every step, so that a resumed run follows the configuration
        (an optimiser state restored from a checkpoint would otherwise keep its old rate).
        """
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        span = max(self.steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainingConfig:
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    generator: GeneratorConfig = GeneratorConfig()
    segmentation: NetworkStage = NetworkStage(steps=4000)
    regression: NetworkStage = NetworkStage(steps=100000)
    source: Path | None = None  #: the TOML file it was read from

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (paths as strings), e.g. for the run directory's config record."""

        def convert(value: Any) -> Any:
            if dataclasses.is_dataclass(value):
                return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, Mapping):
                return {str(k): convert(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [convert(v) for v in value]
            return value

        return convert(self)

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTIONS = ("run", "data", "generator", "segmentation", "regression")


def _coerce(value: Any, annotation: Any, *, base: Path, where: str) -> Any:
    """Turn a TOML value into the annotated field type."""
    text = str(annotation)
    if value is None:
        return None
    if "Path" in text and "tuple" in text:
        items = value if isinstance(value, list) else [value]
        return tuple(_path(v, base) for v in items)
    if "Path" in text:
        return None if value == "" else _path(value, base)
    if "Mapping[int, int]" in text:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of label = label, got {value!r}")
        return {int(k): int(v) for k, v in value.items()}
    if text.startswith("tuple[tuple[str, float]"):
        if isinstance(value, Mapping):
            return tuple((str(k), float(v)) for k, v in value.items())
        return tuple((str(k), float(v)) for k, v in value)
    if text.startswith("tuple"):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = int if "int" in text and "float" not in text else float
        return tuple(inner(v) for v in value)
    if annotation is bool or text == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int or text == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float or text == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str or text == "str":
        return str(value)
    return value


def _path(value: Any, base: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _replace_section(default: Any, values: Mapping[str, Any], *, base: Path, where: str) -> Any:
    """``default`` with ``values`` (TOML types, coerced to the field types) replaced."""
    cls = type(default)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], base=base, where=f"{where}.{k}") for k, v in values.items()}
    try:
        return dataclasses.replace(default, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` (value in TOML syntax, bare words are strings) -> (section, key, value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. run.threads=2)")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def load_config(path: Path | None, *, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Read a training TOML file (``None``: all defaults) and apply ``section.key=value`` overrides.

    Overrides' relative paths are resolved against the current directory.
    """
    doc: dict[str, Any] = {}
    base = Path.cwd()
    where = "<defaults>"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            with path.open("rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: no such configuration file (see configs/default.toml)") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
        base = path.resolve().parent
    unknown = sorted(set(doc) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}")
    defaults = TrainingConfig()
    sections: dict[str, Any] = {}
    for name in _SECTIONS:
        table = doc.get(name, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: [{name}] must be a table")
        sections[name] = _replace_section(getattr(defaults, name), table, base=base, where=f"{where} [{name}]")
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in _SECTIONS:
            raise ConfigError(f"override {text!r}: unknown section {section!r}; known: {sorted(_SECTIONS)}")
        sections[section] = _replace_section(sections[section], {key: value}, base=Path.cwd(), where=f"--set {section}")
    config = TrainingConfig(**sections, source=path)
    _validate(config, where)
    return config


def _validate(config: TrainingConfig, where: str) -> None:
    run = config.run
    if run.processes > 1 and not run.device.startswith("cpu"):
        raise ConfigError(f"{where} [run].processes = {run.processes} is for CPU training; on {run.device!r} use 1 "
                          "(and a larger batch_size)")
    for name in ("threads", "processes", "log_every", "checkpoint_every", "validate_every"):
        if getattr(run, name) < 1:
            raise ConfigError(f"{where} [run].{name} must be >= 1, got {getattr(run, name)}")
    for stage_name in ("segmentation", "regression"):
        stage: NetworkStage = getattr(config, stage_name)
        if stage.steps < 0 or stage.batch_size < 1 or stage.lr <= 0:
            raise ConfigError(f"{where} [{stage_name}]: steps >= 0, batch_size >= 1 and lr > 0 are required")
        if stage.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"{where} [{stage_name}].lr_schedule must be one of {LR_SCHEDULES}, "
                              f"got {stage.lr_schedule!r}")
        if stage.aux_seg_weight < 0 or stage.seg_loss_weight < 0:
            raise ConfigError(f"{where} [{stage_name}]: loss weights must be >= 0")
        if stage.seg_loss_interval < 1:
            raise ConfigError(f"{where} [{stage_name}].seg_loss_interval must be >= 1, got {stage.seg_loss_interval}")
        if stage_name == "segmentation" and stage.seg_loss_interval != 1:
            raise ConfigError(f"{where} [segmentation].seg_loss_interval: the frozen-segmenter loss belongs to the "
                              "regression stage")
        if not 0 <= stage.lr_min <= stage.lr or stage.warmup_steps < 0:
            raise ConfigError(f"{where} [{stage_name}]: 0 <= lr_min <= lr and warmup_steps >= 0 are required")
        if not 0 <= stage.target_input_prob <= 1 or stage.target_blur_max < 0:
            raise ConfigError(f"{where} [{stage_name}]: 0 <= target_input_prob <= 1 and target_blur_max >= 0 "
                              "are required")
        if stage_name != "segmentation" and (stage.init_weights is not None or stage.target_blur_max > 0):
            raise ConfigError(f"{where} [{stage_name}]: init_weights and target_blur_max belong to the segmentation "
                              "stage")
        if not 0 <= stage.ema_decay < 1:
            raise ConfigError(f"{where} [{stage_name}].ema_decay must be in [0, 1), got {stage.ema_decay}")
        if stage_name == "segmentation" and stage.ema_decay > 0:
            raise ConfigError(f"{where} [segmentation].ema_decay: the weight average belongs to the regression stage")
        if stage_name == "segmentation" and not stage.output_sharpening:
            raise ConfigError(f"{where} [segmentation].output_sharpening: the post-processing of synthetic images "
                              "belongs to the regression stage")
        if stage.init_weights is not None and stage.steps == 0:
            raise ConfigError(f"{where} [{stage_name}].init_weights is set but steps = 0: nothing would be trained")
        multiple = 2 ** (stage.n_levels - 1)
        bad = [s for s in config.generator.crop_shape if s % multiple]
        if bad:
            raise ConfigError(
                f"{where} [generator].crop_shape {config.generator.crop_shape} must be multiples of {multiple} "
                f"(2**(n_levels-1) of the {stage_name} network)"
            )
