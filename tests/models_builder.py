"""Small real model files for the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from synthsr_bids.models.network import KERAS_BN_EPS, SynthSRUNet, UNetConfig
from synthsr_bids.models.weights import save_safetensors


def identity_unet(*, base_features: int = 4, n_levels: int = 3) -> SynthSRUNet:
    """A SynthSR U-Net whose output equals its (non-negative) input.

    Every convolution passes channel 0 through its centre tap, decoders read channel 0 of
    the skip connection, BatchNorms are exact identities and ELU is the identity on x >= 0.
    Geometry errors in the pipeline (flips, shifts, wrong affines) therefore show up as a
    mismatch between input and output images.
    """
    net = pass_channel_zero(SynthSRUNet(UNetConfig(base_features=base_features, n_levels=n_levels)))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.weight[0, 0] = 1.0
    return net.eval()


def pass_channel_zero(net: SynthSRUNet) -> SynthSRUNet:
    """Set every encoder/decoder block so that channel 0 carries the (non-negative) input
    unchanged to the head; the head is left for the caller to define."""
    with torch.no_grad():
        for block in list(net.encoder) + list(net.decoder):
            for conv in block.convs:
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[0, 0, 1, 1, 1] = 1.0
            block.norm.running_mean.zero_()
            block.norm.running_var.fill_(1.0 - KERAS_BN_EPS)
            block.norm.weight.fill_(1.0)
            block.norm.bias.zero_()
    return net


def random_unet(*, base_features: int = 4, n_levels: int = 3, seed: int = 0) -> SynthSRUNet:
    torch.manual_seed(seed)
    net = SynthSRUNet(UNetConfig(base_features=base_features, n_levels=n_levels))
    with torch.no_grad():
        for block in list(net.encoder) + list(net.decoder):
            block.norm.running_mean.uniform_(-0.1, 0.1)
            block.norm.running_var.uniform_(0.5, 1.5)
    return net.eval()


def write_model(net: SynthSRUNet, path: Path, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(net, path, {"description": "test model", **(metadata or {})})
    return path
