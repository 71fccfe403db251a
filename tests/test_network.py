"""Tests for synthsr_bids.models.network (the SynthSR U-Net)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy import ndimage

from synthsr_bids.models.network import SynthSRUNet, UNetConfig

KERAS_EPS = 1e-3  # keras.layers.BatchNormalization default epsilon


# --------------------------------------------------------------------------- helpers
def randomize(net: SynthSRUNet, seed: int = 0) -> SynthSRUNet:
    """Non-trivial weights and BatchNorm statistics, including negative BN scales."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 1.5 + 0.3)
            elif name.endswith("norm.weight"):
                sign = torch.where(torch.rand(tensor.shape, generator=gen) < 0.3, -1.0, 1.0)
                tensor.copy_(sign * (torch.rand(tensor.shape, generator=gen) + 0.5))
            elif tensor.dim() == 5:  # conv kernel: He scaling keeps activations O(1)
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
    return net


def numpy_reference(net: SynthSRUNet, x: np.ndarray) -> np.ndarray:
    """Independent float64 implementation of the neuron/SynthSR U-Net for one (C, D, H, W) volume."""
    cfg = net.config
    p = {k: v.detach().double().numpy() for k, v in net.state_dict().items()}

    def conv(v, w, b):
        out = np.empty((w.shape[0],) + v.shape[1:])
        for o in range(w.shape[0]):
            acc = np.full(v.shape[1:], b[o])
            for c in range(w.shape[1]):
                acc += ndimage.correlate(v[c], w[o, c], mode="constant", cval=0.0)
            out[o] = acc
        return out

    def elu(v):
        return np.where(v > 0, v, np.expm1(np.minimum(v, 0)))

    def bn(v, prefix):
        g, b, m, var = (p[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        sh = (-1, 1, 1, 1)
        return (v - m.reshape(sh)) / np.sqrt(var.reshape(sh) + KERAS_EPS) * g.reshape(sh) + b.reshape(sh)

    def pool(v):
        c, d, h, w = v.shape
        return v.reshape(c, d // 2, 2, h // 2, 2, w // 2, 2).max(axis=(2, 4, 6))

    def up(v):
        return v.repeat(2, axis=1).repeat(2, axis=2).repeat(2, axis=3)

    skips = []
    v = x.astype(np.float64)
    for level in range(cfg.n_levels):
        for i in range(cfg.convs_per_level):
            v = elu(conv(v, p[f"encoder.{level}.convs.{i}.weight"], p[f"encoder.{level}.convs.{i}.bias"]))
        skips.append(v)
        v = bn(v, f"encoder.{level}.norm")
        if level < cfg.n_levels - 1:
            v = pool(v)
    for step in range(cfg.n_levels - 1):
        v = np.concatenate([skips[cfg.n_levels - 2 - step], up(v)], axis=0)
        for i in range(cfg.convs_per_level):
            v = elu(conv(v, p[f"decoder.{step}.convs.{i}.weight"], p[f"decoder.{step}.convs.{i}.bias"]))
        v = bn(v, f"decoder.{step}.norm")
    v = conv(v, p["head.weight"], p["head.bias"])
    if cfg.final_activation == "softmax":
        e = np.exp(v - v.max(axis=0, keepdims=True))
        v = e / e.sum(axis=0, keepdims=True)
    return v


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_levels": 0},
        {"base_features": -1},
        {"in_channels": 1.5},
        {"convs_per_level": True},
        {"final_activation": "sigmoid"},
    ],
)
def test_config_rejects_invalid_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        UNetConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = UNetConfig(in_channels=2, out_channels=5, n_levels=3, base_features=8, feat_mult=3,
                     convs_per_level=1, final_activation="softmax")
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.level_features(2) == 72
    assert cfg.size_multiple == 4
    with pytest.raises(ValueError, match="dropout"):
        UNetConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


def test_synthsr_default_architecture_shapes_and_parameter_count():
    net = SynthSRUNet(UNetConfig())
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["encoder.0.convs.0.weight"] == (24, 1, 3, 3, 3)
    assert shapes["encoder.4.convs.1.weight"] == (384, 384, 3, 3, 3)
    assert shapes["decoder.0.convs.0.weight"] == (192, 192 + 384, 3, 3, 3)  # [skip, upsampled]
    assert shapes["decoder.3.convs.1.weight"] == (24, 24, 3, 3, 3)
    assert shapes["head.weight"] == (1, 24, 1, 1, 1)
    assert len(net.encoder) == 5 and len(net.decoder) == 4
    # Hand count: conv weights+biases and 2 learnable BN vectors per level and decoder step.
    feats = [24 * 2**level for level in range(5)]
    expected = 0
    c_in = 1
    for f in feats:
        expected += (c_in * f * 27 + f) + (f * f * 27 + f) + 2 * f
        c_in = f
    for f in reversed(feats[:-1]):
        expected += (3 * f * f * 27 + f) + (f * f * 27 + f) + 2 * f
    expected += 24 + 1
    assert sum(p.numel() for p in net.parameters()) == expected
    bn = net.encoder[0].norm
    assert bn.eps == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.01)


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize(
    "cfg, shape",
    [
        (UNetConfig(n_levels=3, base_features=2, convs_per_level=2), (8, 4, 12)),
        (UNetConfig(in_channels=2, out_channels=3, n_levels=2, base_features=3, feat_mult=3,
                    convs_per_level=1, final_activation="softmax"), (6, 4, 2)),
    ],
)
def test_forward_matches_independent_numpy_reference(cfg, shape):
    net = randomize(SynthSRUNet(cfg), seed=1).eval()
    x = torch.randn((2, cfg.in_channels) + shape, generator=torch.Generator().manual_seed(2))
    expected = np.stack([numpy_reference(net, x[i].numpy()) for i in range(2)])
    slow = net(x)  # grad enabled, parameters require grad: autograd path
    assert slow.requires_grad
    with torch.inference_mode():
        fast = net(x)
    np.testing.assert_allclose(slow.detach().numpy(), expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(fast.numpy(), expected, atol=2e-5, rtol=1e-5)
    if cfg.final_activation == "softmax":
        np.testing.assert_allclose(fast.sum(dim=1).numpy(), 1.0, atol=1e-6)


def test_single_level_network_has_no_decoder():
    cfg = UNetConfig(n_levels=1, base_features=2, out_channels=2, final_activation="softmax")
    net = randomize(SynthSRUNet(cfg), seed=5).eval()
    x = torch.randn(1, 1, 3, 5, 2)
    expected = numpy_reference(net, x[0].numpy())
    with torch.no_grad():
        np.testing.assert_allclose(net(x)[0].numpy(), expected, atol=2e-5)


@pytest.mark.parametrize(
    "shape, message",
    [((1, 8, 8, 8), "5D"), ((1, 2, 8, 8, 8), "1 input channel"), ((1, 1, 8, 12, 8), "multiple of 8")],
)
def test_forward_rejects_bad_input(shape, message):
    net = SynthSRUNet(UNetConfig(n_levels=4, base_features=2)).eval()
    with pytest.raises(ValueError, match=message):
        net(torch.zeros(shape))


# --------------------------------------------------------------------------- training
def test_training_updates_batchnorm_statistics_with_keras_momentum():
    cfg = UNetConfig(n_levels=1, base_features=3, convs_per_level=1)
    net = randomize(SynthSRUNet(cfg), seed=6)
    with torch.no_grad():
        net.encoder[0].norm.running_mean.zero_()
        net.encoder[0].norm.running_var.fill_(1.0)
    net.train()
    x = torch.randn(2, 1, 4, 6, 4, generator=torch.Generator().manual_seed(7))
    net(x)
    conv = net.encoder[0].convs[0]
    h = torch.nn.functional.elu(torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1)).detach()
    mean = h.mean(dim=(0, 2, 3, 4))
    var = h.var(dim=(0, 2, 3, 4), unbiased=True)
    assert torch.allclose(net.encoder[0].norm.running_mean, 0.01 * mean, atol=1e-6)
    assert torch.allclose(net.encoder[0].norm.running_var, 0.99 + 0.01 * var, atol=1e-6)


def test_training_reduces_loss_and_reaches_every_parameter():
    torch.manual_seed(0)
    cfg = UNetConfig(n_levels=2, base_features=4, convs_per_level=2)
    net = SynthSRUNet(cfg).train()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 1, 8, 8, 8, generator=gen)
    target = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1) * 2.0 + 0.5
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), target)
        loss.backward()
        if step == 0:
            for name, param in net.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
                assert param.grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


# --------------------------------------------------------------------------- loading
def test_load_for_inference_prepares_model_and_checks_state():
    cfg = UNetConfig(n_levels=2, base_features=2)
    source = randomize(SynthSRUNet(cfg), seed=9)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    net = SynthSRUNet(cfg).load_for_inference(state)
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    assert net.encoder[0].convs[1].weight.is_contiguous(memory_format=torch.channels_last_3d)
    for key, value in state.items():
        assert torch.equal(net.state_dict()[key], value), key
    with pytest.raises(KeyError, match="head.bias"):
        SynthSRUNet(cfg).load_for_inference({k: v for k, v in state.items() if k != "head.bias"})
    bad = dict(state, **{"head.weight": torch.zeros(2, 2, 1, 1, 1)})
    with pytest.raises(ValueError, match="head.weight"):
        SynthSRUNet(cfg).load_for_inference(bad)
