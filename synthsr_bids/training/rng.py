"""Seeded random sources of the generative model (CPU and CUDA).

Scalar parameters are drawn on a CPU generator and voxel-wise noise on a generator that lives on
the device of the tensors (the same generator on CPU), so a run is reproducible from one seed and
its state can be checkpointed and restored exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["RandomSource"]


class RandomSource:
    """Two ``torch.Generator`` objects: ``params`` (CPU) and ``voxels`` (on ``device``)."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.params = torch.Generator(device="cpu")
        self.params.manual_seed(int(seed))
        if self.device.type == "cpu":
            self.voxels = self.params
        else:
            self.voxels = torch.Generator(device=self.device)
            self.voxels.manual_seed(int(seed) + 1)

    # ------------------------------------------------------------------ scalar draws (CPU)
    def uniform(self, low: float, high: float) -> float:
        return float(low) + (float(high) - float(low)) * float(torch.rand((), generator=self.params))

    def normal(self, mean: float = 0.0, std: float = 1.0) -> float:
        return float(mean) + float(std) * float(torch.randn((), generator=self.params))

    def bernoulli(self, p: float) -> bool:
        return float(torch.rand((), generator=self.params)) < float(p)

    def randint(self, n: int) -> int:
        return int(torch.randint(int(n), (), generator=self.params))

    def uniform_tensor(self, low: Tensor | float, high: Tensor | float, shape: tuple[int, ...]) -> Tensor:
        """float64 CPU tensor of U(low, high) draws (broadcast bounds)."""
        u = torch.rand(shape, generator=self.params, dtype=torch.float64)
        return torch.as_tensor(low, dtype=torch.float64) + (torch.as_tensor(high, dtype=torch.float64)
                                                            - torch.as_tensor(low, dtype=torch.float64)) * u

    def normal_tensor(self, mean: Tensor | float, std: Tensor | float, shape: tuple[int, ...]) -> Tensor:
        z = torch.randn(shape, generator=self.params, dtype=torch.float64)
        return torch.as_tensor(mean, dtype=torch.float64) + torch.as_tensor(std, dtype=torch.float64) * z

    # ------------------------------------------------------------------ voxel-wise draws (device)
    def randn(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.voxels, device=self.device, dtype=torch.float32)

    # ------------------------------------------------------------------ checkpointing
    def get_state(self) -> dict[str, Any]:
        state = {"params": self.params.get_state()}
        if self.voxels is not self.params:
            state["voxels"] = self.voxels.get_state()
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        self.params.set_state(state["params"])
        if self.voxels is not self.params and "voxels" in state:
            self.voxels.set_state(state["voxels"])
