"""The SynthSR U-Net in PyTorch.

The architecture is the ``unet`` of the ``neuron`` package used by SynthSR, SynthSeg and
FreeSurfer's ``mri_synthsr`` (built there with ``nb_features=24, nb_levels=5, conv_size=3,
feat_mult=2, nb_conv_per_level=2, batch_norm=-1, activation='elu'``):

* encoder level ``l`` (``l = 0 .. n_levels-1``) has ``base_features * feat_mult**l`` features and
  ``convs_per_level`` 3x3x3 convolutions ("same" padding, bias), each followed by ELU(alpha=1);
  then *one* BatchNorm (eps 1e-3) for the level; then a 2x max-pool (all levels but the last).
  The skip connection is the output of the last convolution of the level, after its ELU and
  before the BatchNorm.
* decoder step ``k`` (``k = 0 .. n_levels-2``, deepest first) works at encoder level
  ``n_levels-2-k``: nearest-neighbour x2 upsampling, concatenation ``[skip, upsampled]`` (skip
  channels first), ``convs_per_level`` convolutions + ELU, then one BatchNorm.
* head: a 1x1x1 convolution to ``out_channels`` ("likelihood"), then identity or a softmax over
  channels.

Keras layer names (see :mod:`synthsr_bids.models.weights`): ``unet_conv_downarm_{l}_{i}``,
``unet_bn_down_{l}``, ``unet_conv_uparm_{n_levels+k}_{i}``, ``unet_bn_up_{k}``, ``unet_likelihood``.

``forward`` is the plain PyTorch definition (registered modules, autograd-safe, any device,
dtype or autocast): training uses it, and it is the reference the tests check every other
path against. Inference goes through :func:`synthsr_bids.inference.engine.forward`, which
computes the same function faster and with less memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetConfig", "SynthSRUNet", "KERAS_BN_EPS", "KERAS_BN_MOMENTUM"]

#: Keras ``BatchNormalization`` defaults (epsilon=1e-3, momentum=0.99 on the running average).
KERAS_BN_EPS = 1e-3
#: PyTorch's momentum is the weight of the *new* batch: 1 - 0.99.
KERAS_BN_MOMENTUM = 0.01

_ACTIVATIONS = ("linear", "softmax")


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net (the defaults are SynthSR's)."""

    in_channels: int = 1
    out_channels: int = 1
    n_levels: int = 5
    base_features: int = 24
    feat_mult: int = 2
    convs_per_level: int = 2
    final_activation: str = "linear"

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "n_levels", "base_features", "feat_mult", "convs_per_level"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")
        if self.final_activation not in _ACTIVATIONS:
            raise ValueError(
                f"UNetConfig.final_activation must be one of {_ACTIVATIONS}, got {self.final_activation!r}"
            )

    def level_features(self, level: int) -> int:
        """Number of features of encoder level ``level`` (decoder steps reuse them)."""
        return self.base_features * self.feat_mult**level

    @property
    def size_multiple(self) -> int:
        """Every spatial size of the input must be a multiple of this (``2**(n_levels-1)``)."""
        return 2 ** (self.n_levels - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they would be silently lost)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**dict(values))


class _Block(nn.Module):
    """``convs_per_level`` (conv 3x3x3 + ELU) followed by one BatchNorm."""

    def __init__(self, in_channels: int, features: int, n_convs: int) -> None:
        super().__init__()
        channels = [in_channels] + [features] * n_convs
        self.convs = nn.ModuleList(
            nn.Conv3d(channels[i], features, kernel_size=3, padding=1, bias=True) for i in range(n_convs)
        )
        self.norm = nn.BatchNorm3d(features, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)

    def convs_autograd(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.elu(conv(x))
        return x


class SynthSRUNet(nn.Module):
    """The SynthSR / SynthSeg U-Net: ``(N, C_in, D, H, W) -> (N, C_out, D, H, W)``.

    ``D``, ``H`` and ``W`` must be multiples of ``2**(n_levels-1)``.

    Examples:
        >>> net = SynthSRUNet(UNetConfig(n_levels=2, base_features=2)).eval()
        >>> with torch.no_grad():
        ...     net(torch.zeros(1, 1, 4, 6, 2)).shape
        torch.Size([1, 1, 4, 6, 2])
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        n = config.n_levels
        encoder = []
        in_channels = config.in_channels
        for level in range(n):
            features = config.level_features(level)
            encoder.append(_Block(in_channels, features, config.convs_per_level))
            in_channels = features
        self.encoder = nn.ModuleList(encoder)
        decoder = []
        for step in range(n - 1):
            level = n - 2 - step
            features = config.level_features(level)
            decoder.append(_Block(features + in_channels, features, config.convs_per_level))
            in_channels = features
        self.decoder = nn.ModuleList(decoder)
        self.head = nn.Conv3d(in_channels, config.out_channels, kernel_size=1, bias=True)

    # ------------------------------------------------------------------ loading helpers
    def load_for_inference(self, state_dict: Mapping[str, Tensor]) -> SynthSRUNet:
        """Load ``state_dict`` strictly, switch to eval mode and ``channels_last_3d``; returns self.

        ``num_batches_tracked`` buffers may be absent (Keras has no such counter).
        """
        expected = self.state_dict()
        missing = sorted(k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked"))
        unexpected = sorted(k for k in state_dict if k not in expected)
        if missing or unexpected:
            raise KeyError(f"state dict does not fit {self.config}: missing {missing}, unexpected {unexpected}")
        for key, value in state_dict.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"state dict entry {key!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(expected[key].shape)} for {self.config}"
                )
        with torch.no_grad():
            for key, target in expected.items():
                if key in state_dict:
                    target.copy_(state_dict[key])
        return self.to_inference()

    def to_inference(self) -> SynthSRUNet:
        """Eval mode, no parameter gradients, ``channels_last_3d`` weights; returns self."""
        self.eval()
        self.requires_grad_(False)
        return self.to(memory_format=torch.channels_last_3d)

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor) -> None:
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"SynthSRUNet expects a 5D (N, C, D, H, W) tensor, got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"SynthSRUNet expects {cfg.in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        bad = [s for s in x.shape[2:] if s % cfg.size_multiple]
        if bad:
            raise ValueError(
                f"spatial shape {tuple(x.shape[2:])} is not a multiple of {cfg.size_multiple} "
                f"(2**(n_levels-1)); pad the volume first"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        skips = []
        last = len(self.encoder) - 1
        for level, block in enumerate(self.encoder):
            x = block.convs_autograd(x)
            if level < last:
                skips.append(x)
                x = F.max_pool3d(block.norm(x), kernel_size=2)
            else:
                x = block.norm(x)
        for block in self.decoder:
            up = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([skips.pop(), up], dim=1)
            x = block.norm(block.convs_autograd(x))
        x = self.head(x)
        if self.config.final_activation == "softmax":
            x = torch.softmax(x, dim=1)
        return x
