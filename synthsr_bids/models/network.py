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

Two execution paths give the same numbers (to float32 rounding):

* the autograd path (training mode, or when autograd has something to record) uses the
  registered modules and never writes into a tensor that autograd may need;
* the inference path (eval mode, and either ``torch.no_grad()``/``torch.inference_mode()`` or
  no tensor requiring grad, as after :meth:`SynthSRUNet.to_inference`) works in
  ``torch.channels_last_3d``; calls oneDNN directly for every 3x3x3 convolution; applies ELU
  and the frozen BatchNorm in place (after max-pooling, where it commutes, so the skip is kept);
  writes the upsampled tensor straight into the concatenation buffer; folds the last BatchNorm
  into the 1x1x1 head, computed as one matrix product; and drops every intermediate as soon
  as it is no longer needed.

For repeated full-size passes, :func:`reuse_freed_cpu_memory` avoids page-faulting the large
activations again on every pass (a process-wide malloc setting: call it from the application).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetConfig", "SynthSRUNet", "KERAS_BN_EPS", "KERAS_BN_MOMENTUM", "reuse_freed_cpu_memory"]

LOGGER = logging.getLogger(__name__)

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

    def norm_inplace(self, x: Tensor) -> Tensor:
        """Frozen BatchNorm as ``x * scale + shift``, written into ``x``."""
        scale, shift = _frozen_norm_affine(self.norm)
        shape = (1, -1, 1, 1, 1)
        return x.mul_(scale.to(x.dtype).view(shape)).add_(shift.to(x.dtype).view(shape))


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
        if self._can_run_inplace(x):
            return self._forward_inference(x)
        return self._forward_autograd(x)

    def _can_run_inplace(self, x: Tensor) -> bool:
        """Eval mode and nothing for autograd to record (no_grad, or no tensor requiring grad)."""
        if self.training:
            return False
        if not torch.is_grad_enabled():
            return True
        return not x.requires_grad and not any(p.requires_grad for p in self.parameters())

    def _finish(self, x: Tensor) -> Tensor:
        if self.config.final_activation == "softmax":
            x = torch.softmax(x, dim=1)
        return x

    def _forward_autograd(self, x: Tensor) -> Tensor:
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
        return self._finish(self.head(x))

    def _forward_inference(self, x: Tensor) -> Tensor:
        # Every ``x = ...`` below drops the last reference to the previous activation, so at most
        # one skip per level, the current activation and its successor are alive at any time.
        x = x.to(memory_format=torch.channels_last_3d)
        skips: list[Tensor] = []
        last = len(self.encoder) - 1
        for level, block in enumerate(self.encoder):
            for conv in block.convs:
                x = F.elu_(_conv3x3_inference(conv, x))
            if level < last:
                skips.append(x)
                # The skip must survive, so BatchNorm is applied after pooling (see below).
                x = _pool_after_norm(block, x)
            else:
                x = block.norm_inplace(x)
        for step, block in enumerate(self.decoder):
            x = _upsample_concat(skips.pop(), x)
            for conv in block.convs:
                x = F.elu_(_conv3x3_inference(conv, x))
            if step < len(self.decoder) - 1:
                x = block.norm_inplace(x)
        if not self.decoder:
            return _head_inference(self.head, x, softmax=self.config.final_activation == "softmax")
        # The last BatchNorm is folded into the 1x1x1 head (exact: no padding is involved).
        return _head_inference(self.head, x, softmax=self.config.final_activation == "softmax",
                               norm=self.decoder[-1].norm)


def _conv3x3_inference(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)`` for a channels-last input, calling oneDNN directly on CPU.

    ``F.conv3d`` sends a single-input-channel convolution (the first layer of SynthSR) to the
    slow unfold+GEMM kernel, about 3x slower than oneDNN here, and returns it in the contiguous
    layout, which then costs a conversion. Calling ``torch.mkldnn_convolution`` avoids both.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.mkldnn_convolution(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups
        )
    return conv(x)


def _head_inference(head: nn.Conv3d, x: Tensor, *, softmax: bool, norm: nn.BatchNorm3d | None = None) -> Tensor:
    """The 1x1x1 output convolution (after ``norm`` if given) as one matrix product over voxels.

    ``F.conv3d`` runs a 1x1x1 convolution to a single channel through a slow generic kernel
    (about 17x slower here than this ``addmm``). A frozen BatchNorm before it is an affine map
    per channel and is folded into the weights and bias.
    """
    n, c, d, h, w = x.shape
    weight = head.weight.view(head.out_channels, c)
    bias = head.bias
    if norm is not None:
        scale, shift = _frozen_norm_affine(norm)
        bias = bias + weight @ shift
        weight = weight * scale
    voxels = x.permute(0, 2, 3, 4, 1).reshape(-1, c)  # a view for a channels-last x
    out = torch.addmm(bias.to(x.dtype), voxels, weight.t().to(x.dtype))
    if softmax:
        out = torch.softmax(out, dim=1)
    return out.view(n, d, h, w, head.out_channels).permute(0, 4, 1, 2, 3).contiguous()


def _frozen_norm_affine(norm: nn.BatchNorm3d) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` such that eval-mode ``norm(x) == x * scale + shift`` per channel."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    return scale, norm.bias - norm.running_mean * scale


def _pool_after_norm(block: _Block, skip: Tensor) -> Tensor:
    """``max_pool(batch_norm(skip))`` without modifying ``skip``.

    With a positive per-channel scale, the affine BatchNorm commutes with max-pooling, so we
    pool first and normalise the 8x smaller result in place. Channels with a non-positive scale
    (possible with a learned negative gamma) are handled exactly by min-pooling them instead.
    """
    scale, _ = _frozen_norm_affine(block.norm)
    if bool((scale > 0).all()):
        return block.norm_inplace(F.max_pool3d(skip, kernel_size=2))
    positive = (scale > 0).view(1, -1, 1, 1, 1)
    pooled_max = F.max_pool3d(skip, kernel_size=2)
    pooled_min = F.max_pool3d(skip.neg(), kernel_size=2).neg_()
    return block.norm_inplace(torch.where(positive, pooled_max, pooled_min))


def _upsample_concat(skip: Tensor, low: Tensor) -> Tensor:
    """``cat([skip, nearest_upsample_x2(low)], dim=1)`` written into one channels-last buffer."""
    n, c_skip, d, h, w = skip.shape
    c_low = low.shape[1]
    out = torch.empty((n, c_skip + c_low, d, h, w), dtype=skip.dtype, device=skip.device,
                      memory_format=torch.channels_last_3d)
    out[:, :c_skip].copy_(skip)
    # View the upsampled half as (n, c, d/2, 2, h/2, 2, w/2, 2) and broadcast ``low`` into it.
    target = out[:, c_skip:]
    s_n, s_c, s_d, s_h, s_w = target.stride()
    blocks = target.as_strided(
        (n, c_low, d // 2, 2, h // 2, 2, w // 2, 2),
        (s_n, s_c, 2 * s_d, s_d, 2 * s_h, s_h, 2 * s_w, s_w),
    )
    blocks.copy_(low[:, :, :, None, :, None, :, None].expand(n, c_low, d // 2, 2, h // 2, 2, w // 2, 2))
    return out


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def reuse_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory in the process heap for reuse (Linux only; process-wide).

    By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it
    on ``free``, so each full-size activation (0.8 GB at 192x224x192x24 in float32) is
    page-faulted and zeroed again on every forward pass: about 1.5 s of a 9 s pass on 2 cores.
    After this call large blocks come from the heap and stay there for the next pass; the
    price is that the peak memory of the process is not given back to the system.

    Meant to be called once by a program whose main job is inference (the BIDS App), not by a
    library user. Returns whether the setting was applied (False on non-glibc systems).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    LOGGER.debug("glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1: never trim) applied: %s", applied)
    return applied
