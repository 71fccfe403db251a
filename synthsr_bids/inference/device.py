"""Choosing the torch device and the precision of each attempt to run the network."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

__all__ = ["DeviceError", "Attempt", "resolve_device", "attempt_plan"]

LOGGER = logging.getLogger(__name__)

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


class DeviceError(ValueError):
    """The requested device does not exist on this machine (the message says what to use instead)."""


def resolve_device(spec: str) -> str:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a concrete device string (``"cpu"`` or ``"cuda:N"``).

    ``auto`` picks the first CUDA device when one is usable, else the CPU.
    """
    spec = (spec or "").strip().lower()
    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return "cpu"
    match = _CUDA.match(spec)
    if match is None:
        raise DeviceError(f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {spec!r} was requested but no usable CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
            "use '--device cpu' or '--device auto'"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"device {spec!r} was requested but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})"
        )
    return f"cuda:{index}"


@dataclass(frozen=True)
class Attempt:
    """One way of running the network: on ``device``, with fp16 autocast when ``half``."""

    device: str
    half: bool


def attempt_plan(device: str, *, half: bool) -> tuple[Attempt, ...]:
    """The attempts tried in order when the previous one runs out of memory.

    A GPU run is retried on the CPU in float32 (fp16 autocast only exists on CUDA here).
    ``half`` on the CPU is ignored: CPU fp16/bf16 would break parity with the reference.
    """
    if device.startswith("cuda"):
        return (Attempt(device, half), Attempt("cpu", False))
    return (Attempt(device, False),)
