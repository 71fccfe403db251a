"""The resumable two-stage training job: segmentation U-Net, then regression U-Net.

Stage ``segmentation`` trains a softmax U-Net on generator inputs with a soft Dice loss; at its
end the segmenter is written as ``segmenter.safetensors`` (float16) and read back, so every later
step (in this process or after a resume) uses the very same frozen weights. Stage ``regression``
trains the linear-head SynthSR U-Net with ``L1 + seg_loss_weight * soft Dice(segmenter(pred))``
(with ``seg_loss_interval`` = N > 1, the Dice term on every Nth step only, weighted N times).

The run directory holds:

* ``ckpt-<global step>.pt``: the newest full checkpoint only (weights, optimiser, step, RNG
  states), written atomically; plain tensors/containers, loaded with ``weights_only=True``;
* ``segmenter.safetensors``: the frozen segmenter (after stage 1);
* ``model.safetensors``: the regression weights as float16 (refreshed at every validation and at
  the end; the file to ship): the weight average when ``[regression].ema_decay`` > 0;
* ``ema-<global step>.safetensors``: that weight average (fp32, :mod:`.ema`), newest only, written
  just before its checkpoint;
* ``loss.csv``, ``validation.csv`` (per structure Dice, L1) and ``config.json``;
* ``segmenter_history.csv``: when the frozen segmenter was swapped (:func:`replace_segmenter`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from ..models.network import SynthSRUNet, UNetConfig
from ..io import copy_file_atomic, write_atomic
from ..models.weights import LoadedNetwork, load_weights, save_safetensors, sha256_file, sharpening_metadata
from .config import NetworkStage, TrainingConfig
from .ema import AverageUnavailable, WeightAverage, ema_path
from .parallel import SINGLE, ProcessGroup
from .rng import RandomSource
from .generator import SynthBatch, SynthGenerator
from .labels import (
    ContrastPriors,
    LabelScheme,
    LabelVolume,
    load_contrast_priors,
    load_label_map,
    load_label_scheme,
)
from .losses import SEG_INPUT_SCALE, hard_dice, regression_loss, softmax_dice_loss
from .resolution import blur

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainingError",
    "StepResult",
    "RunSummary",
    "Trainer",
    "find_label_maps",
    "load_volumes",
    "latest_checkpoint",
    "export_regression",
    "export_from_checkpoint",
    "replace_segmenter",
]

LOGGER = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "synthsr-bids-training-checkpoint"
CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
_EMA_RE = re.compile(r"^ema-(\d+)\.safetensors$")
SEGMENTER_FILE = "segmenter.safetensors"
LOCK_FILE = ".train.lock"
MODEL_FILE = "model.safetensors"

STAGES = ("segmentation", "regression", "done")

#: FreeSurfer names of the segmentation labels (for validation.csv).
_NAMES = {
    0: "background", 2: "left-cerebral-white-matter", 3: "left-cerebral-cortex", 4: "left-lateral-ventricle",
    5: "left-inf-lat-ventricle", 7: "left-cerebellum-white-matter", 8: "left-cerebellum-cortex",
    10: "left-thalamus", 11: "left-caudate", 12: "left-putamen", 13: "left-pallidum", 14: "3rd-ventricle",
    15: "4th-ventricle", 16: "brain-stem", 17: "left-hippocampus", 18: "left-amygdala", 24: "csf",
    26: "left-accumbens", 28: "left-ventral-dc", 41: "right-cerebral-white-matter", 42: "right-cerebral-cortex",
    43: "right-lateral-ventricle", 44: "right-inf-lat-ventricle", 46: "right-cerebellum-white-matter",
    47: "right-cerebellum-cortex", 49: "right-thalamus", 50: "right-caudate", 51: "right-putamen",
    52: "right-pallidum", 53: "right-hippocampus", 54: "right-amygdala", 58: "right-accumbens",
    60: "right-ventral-dc",
}


class TrainingError(RuntimeError):
    """The training job cannot go on; the message names the file and the fix."""


def _cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor uses on CPU (``$CXX``, else g++; clang++ on macOS), or None."""
    import shutil

    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))


@dataclass(frozen=True)
class StepResult:
    stage: str
    step: int  #: 1-based step within the stage
    global_step: int
    loss: float  #: the optimised total of this step (see :data:`LOSS_COLUMNS`)
    l1: float
    dice_loss: float  #: nan in the regression stage when the frozen segmenter's term was not evaluated
    generator_seconds: float
    network_seconds: float
    aux_dice_loss: float = math.nan  #: regression with auxiliary segmentation outputs only


@dataclass(frozen=True)
class RunSummary:
    stage: str
    global_step: int
    steps_this_session: int
    checkpoint: Path | None
    model: Path | None


# ---------------------------------------------------------------------------- data
def find_label_maps(paths: Sequence[Path]) -> list[Path]:
    """Expand files/directories into a sorted list of NIfTI label maps."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.name.endswith((".nii", ".nii.gz"))))
        elif path.is_file():
            found.append(path)
        else:
            raise TrainingError(f"{path}: label map file or directory does not exist (fix [data] in the config)")
    return found


def load_volumes(
    paths: Sequence[Path],
    scheme: LabelScheme,
    *,
    aliases: dict[int, int] | None = None,
    split_left_right: bool = False,
) -> list[LabelVolume]:
    files = find_label_maps(paths)
    if not files:
        raise TrainingError(f"no *.nii/*.nii.gz label maps in {[str(p) for p in paths]} (fix [data] in the config)")
    volumes = []
    for path in files:
        volumes.append(load_label_map(path, scheme, aliases=aliases, split_left_right=split_left_right))
        LOGGER.info("label map %s: %s voxels", path.name, "x".join(map(str, volumes[-1].indices.shape)))
    return volumes


def label_scheme(config: TrainingConfig) -> LabelScheme:
    """The label tables named in ``config.data`` (the package's SynthSeg copies by default)."""
    data = config.data
    return load_label_scheme(
        generation_labels=data.generation_labels, random_classes=data.random_classes,
        contrast_classes=data.contrast_classes, segmentation_labels=data.segmentation_labels,
        t1_mean_prior=data.t1_mean_prior, t1_std_prior=data.t1_std_prior)


def load_validation_volumes(config: TrainingConfig, scheme: LabelScheme) -> list[LabelVolume]:
    """The held-out label maps of ``config.data`` (empty when none are configured)."""
    data = config.data
    if not data.validation_maps:
        return []
    return load_volumes(data.validation_maps, scheme, aliases=dict(data.validation_aliases),
                        split_left_right=data.validation_split_left_right)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the highest global step in ``run_dir`` (None if there is none)."""
    best: tuple[int, Path] | None = None
    if not Path(run_dir).is_dir():
        return None
    for path in Path(run_dir).iterdir():
        match = _CKPT_RE.match(path.name)
        if match and (best is None or int(match.group(1)) > best[0]):
            best = (int(match.group(1)), path)
    return None if best is None else best[1]


@contextlib.contextmanager
def run_lock(run_dir: Path, what: str) -> Iterator[None]:
    """Hold ``<run dir>/.train.lock`` (one training process or segmenter swap per run directory)."""
    lock = FileLock(str(Path(run_dir) / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TrainingError(f"{run_dir} is in use by another training process (lock {LOCK_FILE}); stop it "
                            f"(SIGTERM writes a checkpoint) before you {what}") from None
    try:
        yield
    finally:
        lock.release()


def check_segmenter_file(path: Path, seg_config: UNetConfig, labels: Sequence[int]) -> LoadedNetwork:
    """Read a segmenter weight file and check it has the run's ``[segmentation]`` network and labels."""
    try:
        loaded = load_weights(path)
    except Exception as exc:  # WeightFileError, OSError, safetensors errors
        raise TrainingError(f"{path}: cannot read the segmenter ({exc})") from exc
    if loaded.config != seg_config:
        raise TrainingError(f"{path}: segmenter {loaded.config} does not match [segmentation] {seg_config}")
    # "synthsr_bids.segmentation_labels": the key of segmenters written before "labels" (as morphometry reads them)
    stored = loaded.metadata.get("labels", loaded.metadata.get("synthsr_bids.segmentation_labels", "null"))
    try:
        theirs = json.loads(stored)
    except ValueError:
        theirs = stored
    if theirs != list(labels):
        raise TrainingError(f"{path}: its labels {theirs} are not this run's segmentation labels {list(labels)}")
    return loaded


def _atomic_torch_save(obj: Any, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp), fsync=True)


def _unet_config(stage: NetworkStage, *, out_channels: int, activation: str) -> UNetConfig:
    return UNetConfig(in_channels=1, out_channels=out_channels, n_levels=stage.n_levels,
                      base_features=stage.base_features, feat_mult=stage.feat_mult,
                      convs_per_level=stage.convs_per_level, final_activation=activation)


def image_head_only(model: SynthSRUNet) -> SynthSRUNet:
    """The regressor without its auxiliary segmentation outputs (head channel 0 only): the shipped network."""
    if model.config.out_channels == 1:
        return model
    single = SynthSRUNet(dataclasses.replace(model.config, out_channels=1))
    state = {k: (v[:1] if k.startswith("head.") else v) for k, v in model.state_dict().items()}
    single.load_state_dict(state)
    return single


def export_regression(model: SynthSRUNet, path: Path, *, metadata: dict[str, str], sharpen: bool) -> Path:
    """Write the regression U-Net (image channel only) as float16 safetensors (atomic) via models/weights.py.

    ``sharpen``: the post-processing the file asks inference for (``[regression].output_sharpening``).
    """
    metadata = {**metadata, **sharpening_metadata(sharpen)}
    save_safetensors(image_head_only(model), path, metadata, dtype=torch.float16)
    return path


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """Runs (and resumes) the two training stages described in the module docstring.

    Args:
        config: the training configuration.
        volumes, validation_volumes: label maps; loaded from ``config.data`` when None.
        scheme, contrasts: label tables and contrast priors; read from ``config.data`` when None.
    """

    def __init__(
        self,
        config: TrainingConfig,
        *,
        volumes: Sequence[LabelVolume] | None = None,
        validation_volumes: Sequence[LabelVolume] | None = None,
        scheme: LabelScheme | None = None,
        contrasts: ContrastPriors | None = None,
        group: ProcessGroup = SINGLE,
    ) -> None:
        self.config = config
        #: this worker among the data-parallel workers (:mod:`.parallel`); rank 0 writes all files
        self.group = group
        self.run_dir = Path(config.run.dir).resolve()
        self.device = torch.device(config.run.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"[run].device is {config.run.device!r} but CUDA is not available (set device = \"cpu\")")
        if config.run.compile and self.device.type == "cpu" and not _cxx_compiler():
            raise TrainingError("[run].compile is on but no C++ compiler was found (inductor compiles C++ on CPU): "
                                "install one (e.g. apt-get install g++, or set CXX) or pass --set run.compile=false")
        data = config.data
        self.scheme = scheme or label_scheme(config)
        self.contrasts = contrasts or load_contrast_priors(data.contrast_priors, n_classes=self.scheme.n_contrast_classes)
        if volumes is None:
            volumes = load_volumes(data.training_maps, self.scheme)
        if validation_volumes is None:
            validation_volumes = load_validation_volumes(config, self.scheme)
        self.generator = SynthGenerator(volumes, self.scheme, self.contrasts, config.generator,
                                        seed=group.generator_seed(config.run.seed), device=self.device)
        self.validation_volumes = list(validation_volumes or [])
        self._validation: list[SynthBatch] | None = None
        self.stop_requested = False
        self._last_validation = -1

        n_seg = self.scheme.n_segmentation_labels
        self.seg_config = _unet_config(config.segmentation, out_channels=n_seg, activation="softmax")
        # Trained and used as a logits network; the softmax is fused into the loss (losses.py).
        self._seg_logits_config = dataclasses.replace(self.seg_config, final_activation="linear")
        aux_channels = n_seg if config.regression.aux_seg_weight > 0 else 0
        self.reg_config = _unet_config(config.regression, out_channels=1 + aux_channels, activation="linear")
        self.stage = "segmentation" if config.segmentation.steps > 0 else "regression"
        self.step = 0
        self.global_step = 0
        self.segmenter: SynthSRUNet | None = None
        #: the weights the segmentation stage started from (``init_weights``): their steps and SHA-256
        self.seg_origin: dict[str, Any] = {"steps": 0, "sha256": ""}
        #: SHA-256 of the frozen segmenter file in use (regression stage), recorded in checkpoints
        self.segmenter_sha256 = ""
        self.seg_opt: torch.optim.Optimizer | None = None
        self.regressor: SynthSRUNet | None = None
        self.reg_opt: torch.optim.Optimizer | None = None
        #: exponential moving average of the regressor's weights ([regression].ema_decay > 0), see .ema
        self.reg_ema: WeightAverage | None = None
        self._averaged_net: SynthSRUNet | None = None  # reused by averaged_regressor()
        self._compiled: dict[torch.nn.Module, Callable[..., Any]] = {}  # see _for_training()
        torch.manual_seed(config.run.seed)
        if self.stage == "segmentation":
            self._new_segmenter()
        else:
            self._new_regressor()

    # ------------------------------------------------------------------ networks
    def _prepare(self, model: SynthSRUNet) -> SynthSRUNet:
        return model.to(self.device).to(memory_format=torch.channels_last_3d)

    def _new_segmenter(self) -> None:
        self.segmenter = self._prepare(SynthSRUNet(self._seg_logits_config))
        self.group.broadcast(self.segmenter)
        self.seg_opt = torch.optim.Adam(self.segmenter.parameters(), lr=self.config.segmentation.lr)

    def initialise_segmenter(self) -> None:
        """Start a fresh segmentation stage from ``[segmentation].init_weights`` (no-op without it).

        Called by :meth:`run` when nothing was resumed: a resumed stage takes its weights from the
        checkpoint, and its origin (steps, SHA-256 of the file) from there too.
        """
        init = self.config.segmentation.init_weights
        if init is None:
            return
        assert self.segmenter is not None
        loaded = check_segmenter_file(Path(init), self.seg_config, self.scheme.segmentation_labels)
        self.segmenter.load_state_dict(loaded.model.state_dict())
        self.seg_origin = {"steps": int(loaded.metadata.get("synthsr_bids.steps", "0") or 0),
                           "sha256": loaded.source_sha256}
        LOGGER.info("segmentation stage starts from %s (%d steps, sha256 %s)", init, self.seg_origin["steps"],
                    loaded.source_sha256[:12])

    def _new_regressor(self) -> None:
        self.regressor = self._prepare(SynthSRUNet(self.reg_config))
        self.group.broadcast(self.regressor)
        self.reg_opt = torch.optim.Adam(self.regressor.parameters(), lr=self.config.regression.lr)
        decay = self.config.regression.ema_decay
        self.reg_ema = WeightAverage(self.regressor, decay) if decay > 0 else None

    def start_regression_for_timing(self) -> None:
        """Enter the regression stage with the current (possibly untrained) segmenter frozen, as training
        does, without writing anything to the run directory: for benchmarks of the regression step."""
        if self.segmenter is None:
            self._new_segmenter()
        assert self.segmenter is not None
        self.segmenter.eval().requires_grad_(False)
        self.stage, self.step = "regression", 0
        self._new_regressor()

    def averaged_regressor(self) -> SynthSRUNet | None:
        """A network holding the current weight average (eval mode), or None when the run keeps none."""
        if self.reg_ema is None:
            return None
        if self._averaged_net is None or self._averaged_net.config != self.reg_config:
            self._averaged_net = self._prepare(SynthSRUNet(self.reg_config))
        return self.reg_ema.copy_to(self._averaged_net).eval()

    def _load_frozen_segmenter(self) -> None:
        path = self.run_dir / SEGMENTER_FILE
        if not path.is_file():
            raise TrainingError(f"{path}: the frozen segmenter is missing; delete the run directory's checkpoints "
                                "to restart stage 1, or restore the file")
        loaded = check_segmenter_file(path, self.seg_config, self.scheme.segmentation_labels)
        logits_net = SynthSRUNet(self._seg_logits_config).load_for_inference(loaded.model.state_dict())
        self.segmenter_sha256 = loaded.source_sha256
        self.segmenter = logits_net.to(self.device)
        self.seg_opt = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.config.run.autocast:
            return contextlib.nullcontext()
        if self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _for_training(self, module: torch.nn.Module) -> Callable[..., Any]:
        """``module`` as the training step calls it: with ``[run].compile``, a ``torch.compile`` wrapper
        (made once per module, sharing its parameters and buffers); otherwise the module itself.

        The module stays uncompiled for everything else (validation on whole volumes, export, state
        dicts), so only the fixed-size training forward passes are compiled.
        """
        if not self.config.run.compile:
            return module
        if module not in self._compiled:  # modules hash by identity
            self._compiled[module] = torch.compile(module, dynamic=False)
        return self._compiled[module]

    def _to_net(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device).contiguous(memory_format=torch.channels_last_3d)

    # ------------------------------------------------------------------ steps
    def train_step(self) -> StepResult:
        """One optimisation step of the current stage."""
        if self.stage == "done":
            raise TrainingError("training is finished; nothing to do")
        stage_cfg = self.config.segmentation if self.stage == "segmentation" else self.config.regression
        t0 = time.perf_counter()
        batch = self.generator.generate(stage_cfg.batch_size)
        t1 = time.perf_counter()
        if self.stage == "segmentation":
            assert self.segmenter is not None and self.seg_opt is not None
            self.segmenter.train()
            x = self.segmentation_input(batch)
            self.seg_opt.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self._for_training(self.segmenter)(self._to_net(x))
            loss = softmax_dice_loss(logits, batch.labels.to(self.device))
            loss.backward()
            self.group.average_gradients(self.segmenter.parameters())
            _set_learning_rate(self.seg_opt, stage_cfg.learning_rate(self.step))
            self.seg_opt.step()
            self.group.average_buffers(self.segmenter)
            value = float(loss.detach())
            l1, dice, aux = math.nan, value, math.nan
        else:
            assert self.regressor is not None and self.reg_opt is not None
            self.regressor.train()
            self.reg_opt.zero_grad(set_to_none=True)
            # Every worker is at the same step, so all of them take (or skip) the segmenter's term together.
            dice_step = self.step % stage_cfg.seg_loss_interval == 0
            segmenter = None if self.segmenter is None or not dice_step else self._for_training(self.segmenter)
            with self._autocast():
                pred = self._for_training(self.regressor)(self._to_net(batch.input))
                terms = regression_loss(pred, batch.target.to(self.device), batch.labels.to(self.device),
                                        segmenter=segmenter,
                                        seg_weight=stage_cfg.seg_loss_weight * stage_cfg.seg_loss_interval,
                                        aux_weight=stage_cfg.aux_seg_weight)
            terms.total.backward()
            self.group.average_gradients(self.regressor.parameters())
            _set_learning_rate(self.reg_opt, stage_cfg.learning_rate(self.step))
            self.reg_opt.step()
            self.group.average_buffers(self.regressor)
            if self.reg_ema is not None:
                self.reg_ema.update(self.regressor)
            value, l1 = float(terms.total.detach()), terms.l1
            # nan: the segmenter's Dice was not evaluated at this step
            dice = terms.dice_loss if segmenter is not None and stage_cfg.seg_loss_weight > 0 else math.nan
            aux = terms.aux_dice_loss if stage_cfg.aux_seg_weight > 0 else math.nan
        t2 = time.perf_counter()
        value, l1, dice, aux = self.group.mean([value, l1, dice, aux])  # one step = every worker's sample
        self.step += 1
        self.global_step += 1
        if not math.isfinite(value):
            raise TrainingError(f"{self.stage} loss is {value} at step {self.step}; lower [{self.stage}].lr and "
                                f"resume from the last checkpoint in {self.run_dir}")
        return StepResult(self.stage, self.step, self.global_step, value, l1, dice, t1 - t0, t2 - t1, aux)

    def segmentation_input(self, batch: SynthBatch) -> torch.Tensor:
        """What the segmenter is trained on at this step: the generator's input, or (with probability
        ``target_input_prob``) the clean T1 target, blurred by sigma ~ U(0, ``target_blur_max``) voxels."""
        stage_cfg = self.config.segmentation
        if not self.generator.rng.bernoulli(stage_cfg.target_input_prob):
            return batch.input
        x = batch.target * SEG_INPUT_SCALE
        if stage_cfg.target_blur_max > 0:
            sigma = self.generator.rng.uniform(0.0, stage_cfg.target_blur_max)
            x = torch.stack([blur(volume[0], (sigma,) * 3)[None] for volume in x]).to(x.dtype)
        return x

    def synthesize(self, image: torch.Tensor, model: SynthSRUNet | None = None) -> torch.Tensor:
        """The image channel (float32) of ``model`` (default: the regressor) for ``image``; the caller picks
        train/eval mode and grad."""
        model = self.regressor if model is None else model
        assert model is not None
        with self._autocast():
            return model(self._to_net(image))[:, :1].float()

    def _finish_stage(self) -> None:
        if self._last_validation != self.global_step:
            self.validate()  # the final numbers of every stage are kept in validation.csv
        if self.stage == "segmentation":
            assert self.segmenter is not None
            path = self.run_dir / SEGMENTER_FILE
            softmax_net = SynthSRUNet(self.seg_config)
            softmax_net.load_state_dict(self.segmenter.state_dict())
            metadata = segmenter_metadata(self.scheme.segmentation_labels,
                                          steps=int(self.seg_origin["steps"]) + self.step)
            if self.seg_origin["sha256"]:
                metadata["synthsr_bids.fine_tuned_from"] = str(self.seg_origin["sha256"])
            if self.group.is_main:
                save_safetensors(softmax_net, path, metadata, dtype=torch.float16)
                LOGGER.info("segmentation stage finished after %d steps; frozen segmenter written to %s",
                            self.step, path)
            self.group.barrier()  # every worker reads the file rank 0 wrote
            self._load_frozen_segmenter()
            self.stage, self.step = "regression", 0
            if self.config.regression.steps == 0:  # a segmentation-only run (e.g. fine-tuning a segmenter)
                self.stage = "done"
                return
            self._new_regressor()
        elif self.stage == "regression":
            self.export()
            LOGGER.info("regression stage finished after %d steps", self.step)
            self.stage = "done"

    # ------------------------------------------------------------------ validation
    def validation_batches(self) -> list[SynthBatch]:
        """Fixed held-out samples (same seed every time, independent of the training RNG)."""
        if self._validation is None:
            if not self.validation_volumes:
                self._validation = []
            else:
                gen = SynthGenerator(self.validation_volumes, self.scheme, self.contrasts, self.config.generator,
                                     seed=self.config.run.seed + 7919, device=self.device)
                n = self.config.run.validation_samples
                self._validation = [gen.generate(1, volume_index=i % len(self.validation_volumes)) for i in range(n)]
        return self._validation

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation pass on the held-out maps; appends to validation.csv, returns summary numbers.

        Regression stage: ``l1``/``l1_lesion`` and the frozen segmenter's Dice describe the raw
        weights; ``l1_ema``/``l1_lesion_ema`` the weight average (when the run keeps one).
        """
        if not self.group.is_main:
            return {}
        batches = self.validation_batches()
        if not batches or self.stage == "done":
            return {}
        self._last_validation = self.global_step
        n_classes = self.scheme.n_segmentation_labels
        dice_sum = torch.zeros(n_classes, dtype=torch.float64)
        dice_count = torch.zeros(n_classes, dtype=torch.float64)
        target_sum = torch.zeros(n_classes, dtype=torch.float64)
        target_count = torch.zeros(n_classes, dtype=torch.float64)
        l1s, lesion_l1s = [], []
        ema_l1s, ema_lesion_l1s = [], []
        averaged = self.averaged_regressor() if self.stage == "regression" else None
        seg = self.segmenter
        assert seg is not None or self.stage == "regression"
        if seg is not None:
            seg.eval()
        if self.regressor is not None:
            self.regressor.eval()
        for batch in batches:
            labels = batch.labels.to(self.device)
            if self.stage == "segmentation":
                x = batch.input
            else:
                pred = self.synthesize(batch.input)
                target = batch.target.to(self.device)
                l1s.append(float((pred - target).abs().mean()))
                mask = batch.lesion_mask.to(self.device)
                if bool(mask.any()):
                    lesion_l1s.append(float((pred - target).abs()[mask].mean()))
                if averaged is not None:
                    error = (self.synthesize(batch.input, averaged) - target).abs()
                    ema_l1s.append(float(error.mean()))
                    if bool(mask.any()):
                        ema_lesion_l1s.append(float(error[mask].mean()))
                x = pred * SEG_INPUT_SCALE
            if seg is None:
                continue
            with self._autocast():
                logits = seg(self._to_net(x))
            dice, present = hard_dice(logits.argmax(1).cpu(), labels[:, 0].cpu(), n_classes)
            dice_sum += torch.where(present, dice, torch.zeros_like(dice))
            dice_count += present.double()
            if self.stage == "segmentation":  # also on the clean T1 target (what it segments as a loss network)
                with self._autocast():
                    logits = seg(self._to_net(batch.target * SEG_INPUT_SCALE))
                dice, present = hard_dice(logits.argmax(1).cpu(), labels[:, 0].cpu(), n_classes)
                target_sum += torch.where(present, dice, torch.zeros_like(dice))
                target_count += present.double()
        if self.regressor is not None:
            self.regressor.train()
        if seg is not None and self.stage == "segmentation":
            seg.train()
        rows: list[tuple[str, str, str, float]] = []
        summary: dict[str, float] = {}
        seg_labels = self.scheme.segmentation_labels
        valid = dice_count > 0
        for k in range(n_classes):
            if valid[k] and seg_labels[k] != 0:
                value = float(dice_sum[k] / dice_count[k])
                rows.append(("dice", str(seg_labels[k]), _NAMES.get(seg_labels[k], f"label-{seg_labels[k]}"), value))
        fg = [v for m, _, _, v in rows if m == "dice"]
        if fg:
            summary["mean_dice"] = float(np.mean(fg))
            rows.append(("mean_dice", "", "all-foreground", summary["mean_dice"]))
        target_fg = [float(target_sum[k] / target_count[k]) for k in range(n_classes)
                     if target_count[k] > 0 and seg_labels[k] != 0]
        # metric -> (structure column, per-sample values): each logged as its mean when there are values
        means = {"mean_dice_target": ("all-foreground", target_fg), "l1": ("all", l1s),
                 "l1_lesion": ("lesions", lesion_l1s), "l1_ema": ("all", ema_l1s),
                 "l1_lesion_ema": ("lesions", ema_lesion_l1s)}
        for metric, (structure, values) in means.items():
            if values:
                summary[metric] = float(np.mean(values))
                rows.append((metric, "", structure, summary[metric]))
        path = self.run_dir / "validation.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["global_step", "stage", "step", "metric", "label", "structure", "value"])
            for metric, label, name, value in rows:
                writer.writerow([self.global_step, self.stage, self.step, metric, label, name, f"{value:.6f}"])
        LOGGER.info("validation at %s step %d: %s", self.stage, self.step,
                    ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))
        return summary

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "stage": self.stage,
            "step": self.step,
            "global_step": self.global_step,
            "config": json.dumps(self.config.to_dict(), sort_keys=True),
            "seg_config": json.dumps(self.seg_config.to_dict(), sort_keys=True),
            "reg_config": json.dumps(self.reg_config.to_dict(), sort_keys=True),
            "generator_rng": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.group.world > 1:  # every worker's streams, so that a resume continues each exactly
            state["generator_rng_ranks"] = self.group.gather(self.generator.get_state())
            state["torch_rng_ranks"] = self.group.gather(torch.get_rng_state())
        if self.stage == "segmentation":
            assert self.segmenter is not None and self.seg_opt is not None
            state["segmenter"] = _contiguous_state(self.segmenter.state_dict())
            state["seg_opt"] = self.seg_opt.state_dict()
            state["seg_origin"] = json.dumps(self.seg_origin)
        else:
            state["segmenter_sha256"] = self.segmenter_sha256
            if self.regressor is not None and self.reg_opt is not None:
                state["regressor"] = _contiguous_state(self.regressor.state_dict())
                state["reg_opt"] = self.reg_opt.state_dict()
        return state

    def save_checkpoint(self) -> Path:
        """Write ``ckpt-<global step>.pt`` atomically and delete older checkpoints."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / f"ckpt-{self.global_step:08d}.pt"
        state = self.state_dict()  # collective with several workers: every worker calls this method
        if not self.group.is_main:
            return path
        average = ema_path(self.run_dir, self.global_step)
        if self.reg_ema is not None:  # first: the checkpoint's average exists as soon as the checkpoint does
            self.reg_ema.save(average, global_step=self.global_step)
        _atomic_torch_save(state, path)
        for old in self.run_dir.iterdir():
            if (_CKPT_RE.match(old.name) and old != path) or (_EMA_RE.match(old.name) and old != average):
                old.unlink(missing_ok=True)
        LOGGER.info("checkpoint %s (%.1f MB)", path, path.stat().st_size / 1e6)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything saved by :meth:`save_checkpoint` (weights, optimiser, steps, RNG)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt/unsafe files
            raise TrainingError(f"{path}: cannot read the checkpoint ({exc}); delete it to restart") from exc
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{path}: not a synthsr-bids training checkpoint")
        for key, mine in (("seg_config", self.seg_config), ("reg_config", self.reg_config)):
            theirs = UNetConfig.from_dict(json.loads(state[key]))
            if key == "reg_config" and dataclasses.replace(theirs, out_channels=mine.out_channels) == mine:
                continue  # auxiliary segmentation outputs switched on or off: only the head changes (below)
            if theirs != mine:
                raise TrainingError(f"{path}: was written for {theirs}, the configuration asks for {mine}; use a new "
                                    "[run].dir or restore the old network settings")
        self.stage, self.step, self.global_step = state["stage"], int(state["step"]), int(state["global_step"])
        if self.stage not in STAGES:
            raise TrainingError(f"{path}: unknown stage {self.stage!r}")
        self._restore_sample_streams(state, path)
        if self.stage == "segmentation":
            self._new_segmenter()
            assert self.segmenter is not None and self.seg_opt is not None
            self.segmenter.load_state_dict(state["segmenter"])
            self.seg_opt.load_state_dict(state["seg_opt"])
            if "seg_origin" in state:  # the file named by init_weights may have changed since
                self.seg_origin = json.loads(state["seg_origin"])
            self.regressor, self.reg_opt, self.reg_ema = None, None, None
        else:
            if self.config.segmentation.steps > 0:
                seg_file = self.run_dir / SEGMENTER_FILE
                expected = state.get("segmenter_sha256", "")
                if expected and seg_file.is_file() and sha256_file(seg_file) != expected:
                    raise TrainingError(f"{seg_file}: does not match the checkpoint {path} (sha256 differs)")
                self._load_frozen_segmenter()
            else:
                self.segmenter = None
            if self.stage == "done" and "regressor" not in state:  # a segmentation-only run
                self.regressor, self.reg_opt = None, None
                torch.set_rng_state(self._torch_rng(state))
                LOGGER.info("resumed from %s: stage done (segmentation only)", path)
                if self.config.regression.steps > 0:
                    LOGGER.warning("%s: this run trained a segmenter only; [regression].steps does not add a "
                                   "regression stage to it: start a new [run].dir that uses its segmenter", path)
                return
            self._new_regressor()
            assert self.regressor is not None and self.reg_opt is not None
            if "regressor" in state:
                weights, moments = state["regressor"], state["reg_opt"]
                if weights["head.bias"].shape[0] != self.reg_config.out_channels:
                    LOGGER.warning("%s: regressor head resized from %d to %d output channels ([regression]."
                                   "aux_seg_weight changed); new channels start at zero", path,
                                   weights["head.bias"].shape[0], self.reg_config.out_channels)
                    weights, moments = _resize_head(weights, moments, self.regressor)
                self.regressor.load_state_dict(weights)
                self.reg_opt.load_state_dict(moments)
                if self.reg_ema is not None:  # a resized head keeps the average of its remaining rows
                    self.reg_ema = WeightAverage.resume(ema_path(self.run_dir, self.global_step), self.regressor,
                                                        self.config.regression.ema_decay, global_step=self.global_step,
                                                        resizable=("head.",))
            if self.stage == "done" and self.step < self.config.regression.steps:
                # Training longer than first planned: the learning-rate schedule follows the new length
                # (a cosine schedule thus restarts warm, from the rate at this step of the longer run).
                LOGGER.info("%s: the regression stage ended at step %d; [regression].steps = %d continues it "
                            "(learning rate %.2e from here)", path, self.step, self.config.regression.steps,
                            self.config.regression.learning_rate(self.step))
                self.stage = "regression"
        # Last: building the networks above drew their (discarded) initial weights from it.
        torch.set_rng_state(self._torch_rng(state))
        LOGGER.info("resumed from %s: stage %s, step %d (global %d)", path, self.stage, self.step, self.global_step)

    def _restore_sample_streams(self, state: dict[str, Any], path: Path) -> None:
        """This worker's generator state: its own when the checkpoint has one per worker, else rank 0's
        stream for rank 0 and, for the others, a new stream seeded from the checkpoint's step."""
        ranks = state.get("generator_rng_ranks")
        if ranks is not None and len(ranks) == self.group.world:
            self.generator.set_state(ranks[self.group.rank])
        elif self.group.is_main:
            self.generator.set_state(state["generator_rng"])
            if self.group.world > 1:
                LOGGER.warning("%s was written by %d worker(s), this run has %d: the other workers start new "
                               "sample streams", path, len(ranks or [0]), self.group.world)
        else:
            self.generator.rng = RandomSource(self.group.generator_seed(self.config.run.seed) + self.global_step,
                                              device=self.device)

    def _torch_rng(self, state: dict[str, Any]) -> torch.Tensor:
        ranks = state.get("torch_rng_ranks")
        if ranks is not None and len(ranks) == self.group.world:
            return ranks[self.group.rank]
        return state["torch_rng"]

    def export(self, path: Path | None = None) -> Path | None:
        """Write the regression weights as float16 safetensors (``model.safetensors`` by default; rank 0 only)."""
        if self.regressor is None or not self.group.is_main:
            return None
        path = Path(path) if path is not None else self.run_dir / MODEL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        gen = self.config.generator
        averaged = self.averaged_regressor()
        return export_regression(self.regressor if averaged is None else averaged, path,
                                 sharpen=self.config.regression.output_sharpening, metadata={
            "synthsr_bids.weights": "raw" if self.reg_ema is None else self.reg_ema.describe(),
            "synthsr_bids.role": "regression",
            "synthsr_bids.trained_steps": str(self.step if self.stage == "regression" else self.config.regression.steps),
            "synthsr_bids.crop_shape": json.dumps(list(gen.crop_shape)),
            "synthsr_bids.output_scale": "255",
            "license": "Apache-2.0",
            "description": "synthsr-bids regression U-Net trained on synthetic data (SynthSR method); "
                           "input RAS 1 mm min-max [0,1], output x255 = synthetic T1w MPRAGE",
        })

    # ------------------------------------------------------------------ driver
    def _log_rows(self, rows: list[StepResult]) -> None:
        if not rows or not self.group.is_main:
            return
        path = self.run_dir / "loss.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(LOSS_COLUMNS)
            for r in rows:
                writer.writerow([f"{time.time():.0f}", r.stage, r.step, r.global_step, f"{r.loss:.6f}",
                                 "" if math.isnan(r.l1) else f"{r.l1:.6f}",
                                 "" if math.isnan(r.dice_loss) else f"{r.dice_loss:.6f}",
                                 f"{r.generator_seconds:.3f}", f"{r.network_seconds:.3f}",
                                 "" if math.isnan(r.aux_dice_loss) else f"{r.aux_dice_loss:.6f}"])

    def run(
        self,
        *,
        max_steps: int | None = None,
        max_minutes: float | None = None,
        resume: bool = True,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> RunSummary:
        """Train until both stages are done, ``max_steps`` steps or ``max_minutes`` have passed.

        Resumes from the newest checkpoint in the run directory (if ``resume``), and always leaves
        a checkpoint of the last completed step behind.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Rank 0 holds the lock for all workers of this run.
        lock = run_lock(self.run_dir, "start another one") if self.group.is_main else contextlib.nullcontext()
        with lock:
            return self._run(max_steps=max_steps, max_minutes=max_minutes, resume=resume, on_step=on_step)

    def _run(self, *, max_steps: int | None, max_minutes: float | None, resume: bool,
             on_step: Callable[[StepResult], None] | None) -> RunSummary:
        torch.set_num_threads(self.config.run.threads)
        if self.group.is_main:
            (self.run_dir / "config.json").write_text(self.config.dumps() + "\n")
            _upgrade_loss_log(self.run_dir / "loss.csv")  # once per session, not at every log write
        # Rank 0 (holding the lock) chooses the checkpoint for every worker: a worker listing the directory
        # itself could see another one while a stopping job replaces it.
        latest = self.group.broadcast_object(latest_checkpoint(self.run_dir) if resume and self.group.is_main else None)
        if latest is not None:
            self.load_checkpoint(latest)
            positions = self.group.gather((self.stage, self.global_step))
            if len(set(positions)) > 1:
                raise TrainingError(f"the workers resumed at different positions {positions} from {latest}")
        elif self.stage == "segmentation" and self.step == 0:
            self.initialise_segmenter()
        run_cfg = self.config.run
        start = time.monotonic()
        last_ckpt_time = start
        done_here = 0
        pending: list[StepResult] = []
        checkpoint: Path | None = None
        dirty = False

        def budget_left() -> bool:
            if self.stop_requested:
                return False
            if max_steps is not None and done_here >= max_steps:
                return False
            return max_minutes is None or (time.monotonic() - start) / 60.0 < max_minutes

        # Every worker leaves the loop at the same step: any worker's stop (signal, budget) stops all.
        while self.stage != "done" and not self.group.any(not budget_left()):
            stage_cfg = self.config.segmentation if self.stage == "segmentation" else self.config.regression
            if self.step >= stage_cfg.steps:
                self._finish_stage()
                checkpoint = self.save_checkpoint()
                dirty = False
                continue
            result = self.train_step()
            done_here += 1
            dirty = True
            pending.append(result)
            if on_step is not None:
                on_step(result)
            if self.step % run_cfg.log_every == 0:
                self._log_rows(pending)
                LOGGER.info("%s step %d/%d: loss %.4f, lr %.2e (generator %.2fs, network %.2fs)", self.stage,
                            self.step, stage_cfg.steps, result.loss, stage_cfg.learning_rate(self.step - 1),
                            result.generator_seconds, result.network_seconds)
                pending = []
            if self.step % run_cfg.validate_every == 0:
                self.validate()
                if self.stage == "regression":
                    self.export()
            if self.group.any(self.step % run_cfg.checkpoint_every == 0
                              or (time.monotonic() - last_ckpt_time) / 60.0 >= run_cfg.checkpoint_minutes):
                self._log_rows(pending)
                pending = []
                checkpoint = self.save_checkpoint()
                last_ckpt_time = time.monotonic()
                dirty = False
        self._log_rows(pending)
        if dirty or checkpoint is None:
            checkpoint = self.save_checkpoint()
        model = self.export() if self.regressor is not None else None
        return RunSummary(stage=self.stage, global_step=self.global_step, steps_this_session=done_here,
                          checkpoint=checkpoint, model=model)


#: Columns of loss.csv (``aux_dice_loss``: empty without auxiliary segmentation outputs). In the regression
#: stage ``loss`` is the optimised total: ``l1`` plus the weighted Dice terms of that step, so with
#: ``seg_loss_interval`` = N > 1 it weighs the Dice N times on every Nth step and is the L1 alone on the
#: others, where ``dice_loss`` is empty (not evaluated; also with no frozen segmenter or a zero weight).
LOSS_COLUMNS = ("time", "stage", "step", "global_step", "loss", "l1", "dice_loss", "generator_s", "network_s",
                "aux_dice_loss")


def _upgrade_loss_log(path: Path) -> None:
    """Rewrite (atomically) a loss.csv written with fewer columns, so that new rows line up with its header."""
    if not path.is_file():
        return
    with path.open(newline="") as fh:
        header = next(csv.reader(fh), None)
        if header is None or tuple(header) == LOSS_COLUMNS:
            return
        fh.seek(0)
        rows = list(csv.DictReader(fh))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=LOSS_COLUMNS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


def _fit_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` cut or zero-padded along its first dimension to ``rows``."""
    if tensor.shape[0] >= rows:
        return tensor[:rows].clone()
    pad = torch.zeros((rows - tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad])


def _resize_head(weights: dict[str, Any], optimiser: dict[str, Any],
                 model: SynthSRUNet) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checkpointed regressor weights and Adam state with the head fitted to ``model``'s output channels.

    Channel 0 (the image) keeps its weights and moments; added auxiliary channels start at zero
    (uniform softmax), removed ones are dropped.
    """
    rows = model.config.out_channels
    weights = {k: (_fit_rows(v, rows) if k.startswith("head.") else v) for k, v in weights.items()}
    params = list(model.parameters())
    state = {}
    for index, moments in optimiser["state"].items():
        shape = params[int(index)].shape
        state[index] = {k: (_fit_rows(v, shape[0]) if torch.is_tensor(v) and v.dim() and v.shape != shape else v)
                        for k, v in moments.items()}
    return weights, {**optimiser, "state": state}


def _set_learning_rate(optimiser: torch.optim.Optimizer, lr: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = lr


def _contiguous_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict with standard-layout CPU tensors (channels-last weights are stored contiguous)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


#: Synthesised T1w images are ``255 x`` the regression output (FreeSurfer-like: white matter ~110);
#: the segmenter was trained on ``target x SEG_INPUT_SCALE``, i.e. on ``T1w x SEG_INPUT_SCALE / 255``.
SYNTHESIS_OUTPUT_SCALE = 255.0


def segmenter_metadata(labels: Sequence[int], *, steps: int) -> dict[str, str]:
    """The safetensors metadata of a segmentation U-Net, as :mod:`synthsr_bids.morphometry.segment` reads it."""
    return {
        "synthsr_bids.role": "segmenter",
        "synthsr_bids.steps": str(int(steps)),
        "labels": json.dumps([int(v) for v in labels]),
        "input_scale": repr(SEG_INPUT_SCALE / SYNTHESIS_OUTPUT_SCALE),
        "license": "Apache-2.0",
    }


#: <run dir>/segmenter_history.csv: one row per :func:`replace_segmenter`.
SEGMENTER_HISTORY = "segmenter_history.csv"
SEGMENTER_HISTORY_COLUMNS = ("time", "global_step", "step", "old_sha256", "new_sha256", "new_steps", "source")


def replace_segmenter(config: TrainingConfig, source: Path) -> Path:
    """Make the segmenter file ``source`` the frozen loss network of a run in its regression stage.

    For a better segmenter trained elsewhere (e.g. a fine-tuning run with ``init_weights``): the
    file must have this run's ``[segmentation]`` network and labels. Refused while a training
    process holds the run directory (stop it first: it keeps its segmenter in memory). Steps,
    each atomic, in an order that a rerun after a crash completes: a row in
    ``segmenter_history.csv`` (so that the jump it causes in the Dice numbers can be told
    apart from training), the file as ``<run dir>/segmenter.safetensors``, and the newest
    checkpoint's ``segmenter_sha256``. Returns the checkpoint.
    """
    source = Path(source).resolve()
    run_dir = Path(config.run.dir).resolve()
    if config.segmentation.steps == 0:
        raise TrainingError("[segmentation].steps is 0: this run has no frozen segmenter to replace")
    with run_lock(run_dir, "replace its segmenter"):
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise TrainingError(f"{run_dir}: no checkpoint; a segmenter can only be replaced in the regression stage")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("stage") != "regression":
            raise TrainingError(f"{checkpoint}: stage {state.get('stage')!r}; a segmenter can only be replaced in "
                                "the regression stage")
        scheme = label_scheme(config)
        expected = _unet_config(config.segmentation, out_channels=scheme.n_segmentation_labels, activation="softmax")
        staged = run_dir / f".{SEGMENTER_FILE}.staged"
        copy_file_atomic(source, staged)  # check exactly the bytes that will be installed
        try:
            loaded = check_segmenter_file(staged, expected, scheme.segmentation_labels)
            old_sha, new_sha = str(state.get("segmenter_sha256", "")), loaded.source_sha256
            installed = run_dir / SEGMENTER_FILE
            if old_sha == new_sha and installed.is_file() and sha256_file(installed) == new_sha:
                LOGGER.info("%s is already the segmenter of %s; nothing to do", source, run_dir)
                return checkpoint
            row = [str(state["global_step"]), str(state["step"]), old_sha, new_sha,
                   loaded.metadata.get("synthsr_bids.steps", ""), str(source)]
            _append_history(run_dir / SEGMENTER_HISTORY, row)
            os.replace(staged, run_dir / SEGMENTER_FILE)
        finally:
            staged.unlink(missing_ok=True)
        state["segmenter_sha256"] = new_sha
        _atomic_torch_save(state, checkpoint)
    LOGGER.info("%s replaced by %s (sha256 %s -> %s) at regression step %d; %s re-pointed", run_dir / SEGMENTER_FILE,
                source, old_sha[:12], new_sha[:12], int(state["step"]), checkpoint.name)
    return checkpoint


def _append_history(path: Path, row: list[str]) -> None:
    """Append ``time`` + ``row`` to the segmenter history, unless its last row already records it (a rerun)."""
    rows = list(csv.reader(path.open(newline=""))) if path.is_file() else []
    if rows and rows[-1][1:] == row:
        return
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if not rows:
            writer.writerow(SEGMENTER_HISTORY_COLUMNS)
        writer.writerow([time.strftime("%Y-%m-%dT%H:%M:%S"), *row])
        fh.flush()
        os.fsync(fh.fileno())


@dataclass(frozen=True)
class CheckpointRegressor:
    """The regression U-Net of a checkpoint (image channel only)."""

    model: SynthSRUNet
    steps: int  #: regression steps trained
    weights: str  #: ``"raw"``, or ``"ema <decay> over <n> steps"`` for the weight average


def regressor_from_checkpoint(checkpoint: Path, *, average: bool = True) -> CheckpointRegressor:
    """The regression U-Net of a training checkpoint and its number of regression steps.

    ``average``: when the run keeps a weight average (``[regression].ema_decay`` > 0), return it
    (``ema-<global step>.safetensors`` beside the checkpoint: what the run validates and exports)
    instead of the raw weights; an average that is missing or does not belong to the checkpoint is
    an error then (pass ``average=False`` for the raw weights).
    """
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{checkpoint}: cannot read the checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{checkpoint}: not a synthsr-bids training checkpoint")
    if "regressor" not in state:
        raise TrainingError(f"{checkpoint}: has no regression weights yet (stage {state.get('stage')!r}); "
                            "train until the regression stage has started")
    model = SynthSRUNet(UNetConfig.from_dict(json.loads(state["reg_config"])))
    model.load_state_dict(state["regressor"])
    decay = float(json.loads(state["config"]).get("regression", {}).get("ema_decay", 0.0) or 0.0)
    weights = "raw"
    if average and decay > 0:
        try:
            averaged = WeightAverage.load(ema_path(Path(checkpoint).parent, int(state["global_step"])), model, decay,
                                          global_step=int(state["global_step"]))
        except AverageUnavailable as exc:
            raise TrainingError(f"{checkpoint}: the run keeps a weight average, but {exc}; export the raw weights "
                                "with --raw, or resume training for a checkpoint with its average") from exc
        averaged.copy_to(model)
        weights = averaged.describe()
    return CheckpointRegressor(model=image_head_only(model), steps=int(state["step"]), weights=weights)


def export_from_checkpoint(checkpoint: Path, output: Path, *, sharpen: bool, average: bool = True) -> Path:
    """Export the regression weights of a training checkpoint as float16 safetensors (``average``: see
    :func:`regressor_from_checkpoint`; ``sharpen``: see :func:`export_regression`)."""
    regressor = regressor_from_checkpoint(checkpoint, average=average)
    return export_regression(regressor.model, Path(output), sharpen=sharpen, metadata={
        "synthsr_bids.role": "regression",
        "synthsr_bids.trained_steps": str(regressor.steps),
        "synthsr_bids.weights": regressor.weights,
        "license": "Apache-2.0",
    })
