"""Exponential moving average (EMA) of the regression U-Net's weights.

The regression trains with batch size 1 (one 96^3 crop per step, as SynthSR), so every Adam step
follows a single sample's gradient and the weights jitter around the path the loss would take
with a lower learning rate. Averaging the weights over the last ~1/(1 - decay) steps removes most
of that jitter at no training cost (the optimiser keeps its step size, so the run does not learn
more slowly), and the average is what gets validated next to the raw weights and exported. BatchNorm running statistics are averaged the same way; integer buffers
(``num_batches_tracked``) are copied.

PyTorch's ``torch.optim.swa_utils.AveragedModel`` does the averaging but keeps a second module
and pickles into the checkpoint; here the average is plain tensors, updated in place with one
``torch._foreach_lerp_`` per step, and stored next to the checkpoint as ``ema.safetensors``
(fp32, 5.8 MB for the default 16x4 network): the checkpoint (weights + Adam moments, 17.6 MB) must
stay under the 20 MB a file in git may have. The file records the global step it belongs to;
a resume accepts it only for the same step as the checkpoint (a crash between the two writes
leaves a newer average, which is then restarted from the checkpoint's weights, with a warning).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import write_atomic

__all__ = ["EMA_FILE", "WeightAverage"]

LOGGER = logging.getLogger(__name__)

#: Name of the average's file in the run directory.
EMA_FILE = "ema.safetensors"


class WeightAverage:
    """``average <- decay * average + (1 - decay) * weights`` after every optimiser step.

    Args:
        model: the network whose ``state_dict`` is averaged; the average starts as a copy of it.
        decay: in [0, 1); the average spans about ``1 / (1 - decay)`` steps.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        self._float_keys = [k for k, v in self.state.items() if v.is_floating_point()]
        #: True when :meth:`resume` read the average from its file (False: it starts from the weights)
        self.restored = False

    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimiser step)."""
        current = model.state_dict()
        if set(current) != set(self.state):
            raise ValueError("the network's state keys changed since the average started")
        with torch.no_grad():
            targets = [current[k].detach() for k in self._float_keys]
            if targets:
                torch._foreach_lerp_([self.state[k] for k in self._float_keys], targets, 1.0 - self.decay)
            for key, value in current.items():
                if not value.is_floating_point():
                    self.state[key].copy_(value)

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the average into ``model`` (same architecture); returns it."""
        model.load_state_dict(self.state)
        return model

    def save(self, path: Path, *, global_step: int) -> Path:
        """Write the average (fp32 safetensors, atomically) tagged with ``global_step``."""
        metadata = {"synthsr_bids.role": "ema", "global_step": str(int(global_step)), "decay": repr(self.decay)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state.items()}
        write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=True)
        return Path(path)

    @classmethod
    def resume(cls, path: Path, model: nn.Module, decay: float, *, global_step: int) -> WeightAverage:
        """The average saved at ``global_step`` in ``path``, or a fresh one from ``model`` (logged why)."""
        average = cls(model, decay)
        path = Path(path)
        if not path.is_file():
            LOGGER.info("weight average (EMA, decay %g) starts at global step %d from the current weights", decay,
                        global_step)
            return average
        try:
            with safe_open(str(path), framework="pt") as handle:
                step_text = (handle.metadata() or {}).get("global_step")
            header_step = None if step_text is None else int(step_text)
            tensors = load_file(str(path))
        except (OSError, SafetensorError, ValueError) as exc:
            LOGGER.warning("%s: unreadable (%s); the weight average restarts from the current weights", path, exc)
            return average
        if header_step != global_step:
            LOGGER.warning("%s belongs to global step %s, the checkpoint to %d; the weight average restarts from "
                           "the current weights", path, header_step, global_step)
            return average
        mismatched = [k for k, v in average.state.items() if k not in tensors or tensors[k].shape != v.shape]
        if mismatched or set(tensors) != set(average.state):
            LOGGER.warning("%s does not fit the network (%s); the weight average restarts from the current weights",
                           path, ", ".join(mismatched[:3]) or "different keys")
            return average
        device = next(iter(average.state.values())).device
        average.state = {k: tensors[k].to(device=device, dtype=average.state[k].dtype) for k in average.state}
        average.restored = True
        return average

