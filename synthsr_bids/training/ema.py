"""Exponential moving average (EMA) of the regression U-Net's weights.

The regression trains with batch size 1 (one 96^3 crop per step, as SynthSR), so every Adam step
follows a single sample's gradient and the weights jitter around the path the loss would take
with a lower learning rate. Averaging the weights over the last ~1/(1 - decay) steps removes most
of that jitter at no training cost (the optimiser keeps its step size, so the run does not learn
more slowly), and the average is what gets validated next to the raw weights and exported.
BatchNorm running statistics are averaged the same way; integer buffers (``num_batches_tracked``)
are copied. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so a
young average (a new run starting from random weights) is not dominated by its starting point.

PyTorch's ``torch.optim.swa_utils.AveragedModel`` does the averaging but keeps a second module
and pickles into the checkpoint; here the average is plain tensors, updated in place with one
``torch._foreach_lerp_`` per step, and stored next to each checkpoint as
``ema-<global step>.safetensors`` (fp32, 5.8 MB for the default 16x4 network; the checkpoint
itself, weights + Adam moments at 17.6 MB, must stay under the 20 MB a file in git may have). The
file is written before its checkpoint and old ones are deleted with the old checkpoints, so the
newest checkpoint always has its own average, also while a trainer is writing the next one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import write_atomic

__all__ = ["EMA_PATTERN", "AverageUnavailable", "WeightAverage", "ema_path"]

LOGGER = logging.getLogger(__name__)

#: File name pattern of the average of global step N (``ema-<N:08d>.safetensors``), beside ``ckpt-<N>.pt``.
EMA_PATTERN = "ema-{:08d}.safetensors"
#: Warm-up of the decay: ``min(decay, (1 + n) / (WARMUP + n))`` after ``n`` updates.
WARMUP = 10


def ema_path(run_dir: Path, global_step: int) -> Path:
    """Where the average belonging to the checkpoint of ``global_step`` lives."""
    return Path(run_dir) / EMA_PATTERN.format(int(global_step))


class AverageUnavailable(RuntimeError):
    """The saved average cannot be used (missing, unreadable, another step or network); says why."""


class WeightAverage:
    """``average <- d * average + (1 - d) * weights`` after every optimiser step, ``d`` the warmed-up decay.

    Args:
        model: the network whose ``state_dict`` is averaged; the average starts as a copy of it.
        decay: in [0, 1); the average spans about ``1 / (1 - decay)`` steps once warmed up.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        self._float_keys = [k for k, v in self.state.items() if v.is_floating_point()]
        #: number of updates averaged so far (0: a copy of the weights it started from)
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses (warm-up, see the module docstring)."""
        return min(self.decay, (1.0 + self.updates) / (WARMUP + self.updates))

    def describe(self) -> str:
        """``"ema <decay> over <n> steps"``: recorded in exported weight files."""
        return f"ema {self.decay:g} over {self.updates} steps"

    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimiser step)."""
        current = model.state_dict()
        if set(current) != set(self.state):
            raise ValueError("the network's state keys changed since the average started")
        weight = 1.0 - self.current_decay()
        with torch.no_grad():
            targets = [current[k].detach() for k in self._float_keys]
            if targets:
                torch._foreach_lerp_([self.state[k] for k in self._float_keys], targets, weight)
            for key, value in current.items():
                if not value.is_floating_point():
                    self.state[key].copy_(value)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the average into ``model`` (same architecture); returns it."""
        model.load_state_dict(self.state)
        return model

    def save(self, path: Path, *, global_step: int) -> Path:
        """Write the average (fp32 safetensors, atomically) tagged with ``global_step`` and its update count."""
        metadata = {"synthsr_bids.role": "ema", "global_step": str(int(global_step)), "decay": repr(self.decay),
                    "updates": str(self.updates)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state.items()}
        write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=True)
        return Path(path)

    @classmethod
    def load(cls, path: Path, model: nn.Module, decay: float, *, global_step: int,
             resizable: Sequence[str] = ()) -> WeightAverage:
        """The average saved in ``path`` for ``global_step`` of ``model``'s architecture.

        ``resizable``: key prefixes whose first dimension may differ from the file (an output head
        that gained or lost channels): the rows both have are kept, others come from ``model``.

        Raises:
            AverageUnavailable: missing, unreadable, written for another step or another network.
        """
        path = Path(path)
        average = cls(model, decay)
        if not path.is_file():
            raise AverageUnavailable(f"{path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            step, updates = int(metadata["global_step"]), int(metadata["updates"])
            tensors = load_file(str(path))
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise AverageUnavailable(f"{path} is not a readable weight average ({exc!r})") from exc
        if step != int(global_step):
            raise AverageUnavailable(f"{path} belongs to global step {step}, not {global_step}")
        if set(tensors) != set(average.state):
            raise AverageUnavailable(f"{path} does not fit the network (different weights)")
        for key, mine in average.state.items():
            theirs = tensors[key]
            if theirs.shape == mine.shape:
                mine.copy_(theirs.to(dtype=mine.dtype))
            elif any(key.startswith(p) for p in resizable) and theirs.shape[1:] == mine.shape[1:]:
                rows = min(theirs.shape[0], mine.shape[0])
                mine[:rows].copy_(theirs[:rows].to(dtype=mine.dtype))
                LOGGER.info("%s: %s resized from %d to %d rows (new rows from the current weights)", path, key,
                            theirs.shape[0], mine.shape[0])
            else:
                raise AverageUnavailable(f"{path} does not fit the network ({key}: {tuple(theirs.shape)} vs "
                                         f"{tuple(mine.shape)})")
        average.updates = updates
        return average

    @classmethod
    def resume(cls, path: Path, model: nn.Module, decay: float, *, global_step: int,
               resizable: Sequence[str] = ()) -> WeightAverage:
        """:meth:`load`, or (logged with the reason) a fresh average starting from ``model``'s weights."""
        try:
            average = cls.load(path, model, decay, global_step=global_step, resizable=resizable)
            LOGGER.info("weight average resumed from %s (%d updates)", path, average.updates)
            return average
        except AverageUnavailable as exc:
            if Path(path).exists():
                LOGGER.warning("%s; the weight average restarts from the current weights", exc)
            else:
                LOGGER.info("weight average (EMA, decay %g) starts at global step %d from the current weights",
                            decay, global_step)
            return cls(model, decay)
