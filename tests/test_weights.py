"""Tests for synthsr_bids.models.weights (Keras .h5 and safetensors loading).

The Keras parity fixtures in tests/data/keras_parity/ were written by tools/keras_unet.py with
TensorFlow 2.15 (Keras 2): small U-Nets with SynthSR's layer names, random weights and
non-trivial BatchNorm statistics, an input volume and the Keras output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors
import torch

from synthsr_bids.models.network import SynthSRUNet, UNetConfig
from synthsr_bids.models.weights import (
    SHARPEN_METADATA,
    LoadedNetwork,
    WeightFileError,
    keras_name_map,
    load_weights,
    recommended_sharpening,
    sharpening_metadata,
    read_keras_h5,
    save_safetensors,
    sha256_file,
)

FIXTURES = Path(__file__).parent / "data" / "keras_parity"
NAMES = ("synthsr_small", "seg_small")


def fixture(name: str) -> tuple[Path, dict]:
    data = np.load(FIXTURES / f"{name}.npz")
    return FIXTURES / f"{name}.h5", {key: data[key] for key in data.files}


def keras_input(data: dict) -> torch.Tensor:
    return torch.from_numpy(data["input_ndhwc"]).permute(0, 4, 1, 2, 3).contiguous()


def keras_output(data: dict) -> torch.Tensor:
    return torch.from_numpy(data["output_ndhwc"]).permute(0, 4, 1, 2, 3)


@pytest.fixture()
def h5_copy(tmp_path: Path) -> Path:
    target = tmp_path / "SynthSR_small.h5"
    shutil.copyfile(FIXTURES / "synthsr_small.h5", target)
    return target


# --------------------------------------------------------------------------- Keras parity
def test_fixture_files_are_small_and_match_their_recorded_hashes():
    total = sum(p.stat().st_size for p in FIXTURES.iterdir())
    assert total < 1_000_000
    for name in NAMES:
        path, data = fixture(name)
        assert sha256_file(path) == str(data["h5_sha256"])


@pytest.mark.parametrize("name", NAMES)
def test_keras_parity(name):
    path, data = fixture(name)
    loaded = load_weights(path)
    x, expected = keras_input(data), keras_output(data)
    assert expected.abs().max() > 0.5  # a meaningful reference
    with torch.inference_mode():
        fast = loaded.model(x)
    assert (fast - expected).abs().max().item() <= 1e-4
    # The autograd path (used for training) gives the same numbers.
    slow = SynthSRUNet(loaded.config)
    slow.load_state_dict(loaded.model.state_dict())
    slow.eval()
    assert (slow(x).detach() - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_config_is_inferred_from_layer_shapes(name):
    path, data = fixture(name)
    config, state = read_keras_h5(path)
    assert config == UNetConfig(**json.loads(str(data["config"])))
    assert set(state) == set(keras_name_map(config))
    assert all(t.dtype == torch.float32 for t in state.values())


def test_kernels_are_transposed_from_dhwio(h5_copy: Path):
    _, state = read_keras_h5(h5_copy)
    with h5py.File(h5_copy, "r") as f:
        kernel = f["model_weights/unet_conv_downarm_1_0/unet_conv_downarm_1_0/kernel:0"][()]
        variance = f["model_weights/unet_bn_up_0/unet_bn_up_0/moving_variance:0"][()]
    assert kernel.shape == (3, 3, 3, 4, 8)
    weight = state["encoder.1.convs.0.weight"].numpy()
    assert weight.shape == (8, 4, 3, 3, 3)
    # out=5, in=2, (d, h, w) = (0, 1, 2)
    assert weight[5, 2, 0, 1, 2] == kernel[0, 1, 2, 2, 5]
    np.testing.assert_array_equal(state["decoder.0.norm.running_var"].numpy(), variance)


def test_output_activation_comes_from_model_config_or_channel_count(h5_copy: Path):
    assert read_keras_h5(h5_copy)[0].final_activation == "linear"  # model_config: Activation('linear')
    seg, _ = fixture("seg_small")
    assert read_keras_h5(seg)[0].final_activation == "softmax"  # weights only, 3 channels
    assert read_keras_h5(seg, final_activation="linear")[0].final_activation == "linear"
    with h5py.File(h5_copy, "r+") as f:
        tree = json.loads(f.attrs["model_config"])
        for layer in tree["config"]["layers"]:
            if layer["config"]["name"] == "unet_prediction":
                layer["config"]["activation"] = "softmax"
        f.attrs["model_config"] = json.dumps(tree)
    assert read_keras_h5(h5_copy)[0].final_activation == "softmax"


# --------------------------------------------------------------------------- bad files
def test_missing_layer_is_named(h5_copy: Path):
    with h5py.File(h5_copy, "r+") as f:
        del f["model_weights/unet_bn_up_1"]
    with pytest.raises(WeightFileError, match="missing layer.s. unet_bn_up_1 for") as info:
        read_keras_h5(h5_copy)
    assert info.value.path == h5_copy
    assert str(h5_copy) in str(info.value)


def test_missing_weight_inside_a_layer_is_named(h5_copy: Path):
    with h5py.File(h5_copy, "r+") as f:
        del f["model_weights/unet_bn_down_1/unet_bn_down_1/moving_variance:0"]
    with pytest.raises(WeightFileError, match=r"unet_bn_down_1 \(weights moving_variance\)"):
        read_keras_h5(h5_copy)


def test_missing_output_layer(h5_copy: Path):
    with h5py.File(h5_copy, "r+") as f:
        del f["model_weights/unet_likelihood"]
    with pytest.raises(WeightFileError, match="unet_likelihood"):
        load_weights(h5_copy)


def test_shape_mismatch_is_reported(h5_copy: Path):
    name = "model_weights/unet_conv_uparm_5_1/unet_conv_uparm_5_1/kernel:0"
    with h5py.File(h5_copy, "r+") as f:
        del f[name]
        f[name] = np.zeros((3, 3, 3, 7, 8), dtype=np.float32)
    with pytest.raises(WeightFileError, match=r"unet_conv_uparm_5_1.*\(3, 3, 3, 7, 8\), expected \(3, 3, 3, 8, 8\)"):
        read_keras_h5(h5_copy)


def test_non_finite_weights_are_rejected(h5_copy: Path):
    with h5py.File(h5_copy, "r+") as f:
        f["model_weights/unet_bn_down_2/unet_bn_down_2/moving_mean:0"][1] = np.nan
    with pytest.raises(WeightFileError, match="unet_bn_down_2.*NaN"):
        read_keras_h5(h5_copy)


def test_negative_moving_variance_is_rejected(h5_copy: Path):
    with h5py.File(h5_copy, "r+") as f:
        f["model_weights/unet_bn_up_2/unet_bn_up_2/moving_variance:0"][0] = -1.0
    with pytest.raises(WeightFileError, match="unet_bn_up_2.*negative"):
        read_keras_h5(h5_copy)


def test_not_a_synthsr_network(tmp_path: Path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["dense_1/dense_1/kernel:0"] = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(WeightFileError, match="not a SynthSR/SynthSeg U-Net.*dense_1"):
        read_keras_h5(path)


@pytest.mark.parametrize("content", [b"<html>404 Not Found</html>\n", b""])
def test_non_hdf5_file_is_rejected(tmp_path: Path, content: bytes):
    path = tmp_path / "SynthSR.h5"
    path.write_bytes(content)
    with pytest.raises(WeightFileError, match="not an HDF5 file"):
        read_keras_h5(path)
    with pytest.raises(WeightFileError, match="neither a Keras .h5"):
        load_weights(path)


def test_truncated_hdf5_file_is_rejected(tmp_path: Path):
    data = (FIXTURES / "synthsr_small.h5").read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=str(path.name)):
        load_weights(path)


def test_missing_file(tmp_path: Path):
    with pytest.raises(WeightFileError, match="does not exist"):
        load_weights(tmp_path / "nope.h5")
    with pytest.raises(WeightFileError, match="does not exist"):
        read_keras_h5(tmp_path / "nope.h5")


def test_extra_groups_are_ignored(h5_copy: Path):
    _, data = fixture("synthsr_small")
    with h5py.File(h5_copy, "r+") as f:
        # A second (segmentation) network with its own names, and optimizer state.
        f["model_weights/seg_unet_conv_downarm_0_0/seg_unet_conv_downarm_0_0/kernel:0"] = np.ones((3, 3, 3, 1, 5))
        f["model_weights/seg_likelihood/seg_likelihood/kernel:0"] = np.ones((1, 1, 1, 5, 7))
        f["optimizer_weights/Adam/unet_likelihood/kernel/m:0"] = np.ones((1, 1, 1, 4, 1))
        f["model_weights/unet_extra_head/unet_extra_head/bias:0"] = np.ones(3)
    loaded = load_weights(h5_copy)
    with torch.inference_mode():
        assert (loaded.model(keras_input(data)) - keras_output(data)).abs().max().item() <= 1e-4


def test_ambiguous_layer_is_an_error(h5_copy: Path):
    with h5py.File(h5_copy, "r+") as f:
        f["model_weights/other_model/unet_likelihood/kernel:0"] = np.ones((1, 1, 1, 4, 1), dtype=np.float32)
    with pytest.raises(WeightFileError, match="ambiguous"):
        read_keras_h5(h5_copy)


# --------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip(tmp_path: Path):
    path, data = fixture("seg_small")
    loaded = load_weights(path)
    out = tmp_path / "seg.safetensors"
    save_safetensors(loaded.model, out, {"license": "Apache-2.0", "citation": "Iglesias 2023"})
    assert [p.name for p in tmp_path.iterdir()] == ["seg.safetensors"]  # no temp file left
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # readable by every user, as a plain new file
    again = load_weights(out)
    assert isinstance(again, LoadedNetwork)
    assert again.config == loaded.config
    assert again.metadata == {"license": "Apache-2.0", "citation": "Iglesias 2023"}
    assert again.source_sha256 == sha256_file(out)
    assert not again.model.training
    state, state_again = loaded.model.state_dict(), again.model.state_dict()
    for key in keras_name_map(loaded.config):
        assert torch.equal(state[key], state_again[key]), key
    with torch.inference_mode():
        assert (again.model(keras_input(data)) - keras_output(data)).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("true", True), ("false", False), (" False ", False)])
def test_a_weight_file_says_whether_its_outputs_are_sharpened(tmp_path: Path, value, expected):
    path, _ = fixture("seg_small")
    out = tmp_path / "model.safetensors"
    save_safetensors(load_weights(path).model, out, {} if value is None else {SHARPEN_METADATA: value})
    assert load_weights(out).sharpen is expected
    assert recommended_sharpening({} if value is None else {SHARPEN_METADATA: value}) is expected
    assert recommended_sharpening(sharpening_metadata(expected)) is expected  # what exports write reads back


def test_a_bad_sharpening_value_is_named(tmp_path: Path):
    path, _ = fixture("seg_small")
    out = tmp_path / "model.safetensors"
    save_safetensors(load_weights(path).model, out, {SHARPEN_METADATA: "maybe"})
    with pytest.raises(WeightFileError, match=r"model\.safetensors: metadata 'synthsr_bids\.sharpen' must be 'true' or 'false', got 'maybe'"):
        load_weights(out)


def test_fp16_safetensors_are_cast_to_fp32(tmp_path: Path):
    path, data = fixture("synthsr_small")
    loaded = load_weights(path)
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_safetensors(loaded.model, full, {})
    save_safetensors(loaded.model, half, {}, dtype=torch.float16)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    with safetensors.safe_open(str(half), framework="pt") as f:
        assert f.get_tensor("head.weight").dtype == torch.float16
    again = load_weights(half)
    weight = again.model.state_dict()["encoder.1.convs.0.weight"]
    assert weight.dtype == torch.float32
    original = loaded.model.state_dict()["encoder.1.convs.0.weight"]
    assert torch.equal(weight, original.half().float())
    assert not torch.equal(weight, original)
    with torch.inference_mode():
        assert (again.model(keras_input(data)) - keras_output(data)).abs().max().item() < 5e-2


def test_save_safetensors_validates_metadata_and_leaves_nothing_behind(tmp_path: Path):
    model = SynthSRUNet(UNetConfig(n_levels=2, base_features=2))
    with pytest.raises(TypeError, match="str"):
        save_safetensors(model, tmp_path / "a.safetensors", {"epoch": 3})
    with pytest.raises(ValueError, match="reserved"):
        save_safetensors(model, tmp_path / "a.safetensors", {"synthsr_bids.unet_config": "{}"})
    with pytest.raises(FileNotFoundError, match="missing"):
        save_safetensors(model, tmp_path / "missing" / "a.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_foreign_or_inconsistent_safetensors_are_rejected(tmp_path: Path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"note": "not ours"})
    with pytest.raises(WeightFileError, match="not written by synthsr-bids"):
        load_weights(foreign)

    model = SynthSRUNet(UNetConfig(n_levels=2, base_features=2))
    good = tmp_path / "good.safetensors"
    save_safetensors(model, good, {})
    with safetensors.safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    meta["synthsr_bids.unet_config"] = json.dumps(UNetConfig(n_levels=2, base_features=3).to_dict())
    wrong = tmp_path / "wrong.safetensors"
    save_file(tensors, str(wrong), metadata=meta)
    with pytest.raises(WeightFileError, match="do not fit the stored configuration"):
        load_weights(wrong)


# --------------------------------------------------------------------------- cache
def test_h5_is_converted_once_and_cached(tmp_path: Path, h5_copy: Path, caplog):
    cache = tmp_path / "cache"
    sha = sha256_file(h5_copy)
    first = load_weights(h5_copy, cache_dir=cache)
    cached = cache / f"{sha}.safetensors"
    assert [p.name for p in cache.iterdir()] == [cached.name]
    assert first.source_sha256 == sha
    assert first.metadata["source_sha256"] == sha
    assert first.metadata["source_format"] == "keras-h5"
    before = cached.stat()

    # Replace the cache entry by a recognisably different network: a second load must return
    # it (proof that it reads the cache instead of converting the .h5 again).
    marked = SynthSRUNet(first.config)
    marked.load_state_dict(first.model.state_dict())
    with torch.no_grad():
        marked.head.bias.fill_(123.0)
    save_safetensors(marked, cached, first.metadata)
    marked_stat = cached.stat()
    second = load_weights(h5_copy, cache_dir=cache)
    assert second.model.head.bias.item() == 123.0
    assert second.source_sha256 == sha
    assert cached.stat().st_mtime_ns == marked_stat.st_mtime_ns and cached.stat().st_ino == marked_stat.st_ino
    assert before.st_ino != marked_stat.st_ino  # the marked file did replace the first one

    # A damaged cache entry is converted again, with a warning.
    cached.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="synthsr_bids.models.weights"):
        third = load_weights(h5_copy, cache_dir=cache)
    assert "converting" in caplog.text
    assert third.model.head.bias.item() == pytest.approx(first.model.head.bias.item())
    assert load_weights(cached).metadata["source_sha256"] == sha


def test_loaded_model_is_ready_for_inference(h5_copy: Path):
    loaded = load_weights(h5_copy)
    assert not loaded.model.training
    assert loaded.model.encoder[1].convs[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(not p.requires_grad for p in loaded.model.parameters())
