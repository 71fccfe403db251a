"""The synthesis pipeline (synthesize) with small real networks whose output is known analytically."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from synthsr_bids.inference import engine
from synthsr_bids.inference.device import Attempt, DeviceError, attempt_plan, resolve_device
from synthsr_bids.inference.predict import (
    SynthesisOptions,
    fov_crop_box,
    prepare_input,
    resample_to_grid,
    run_network,
    synthesize,
)
from synthsr_bids.models.network import SynthSRUNet, UNetConfig
from synthsr_bids.preprocessing.intensity import BoundingBox
from synthsr_bids.preprocessing.resample import resample_to_isotropic

torch.set_num_threads(1)


class Pointwise(nn.Module):
    """f(x) = sum_c w_c x_c: a 1x1x1 convolution, equivariant to every flip."""

    def __init__(self, weights=(0.4,)) -> None:
        super().__init__()
        self.conv = nn.Conv3d(len(weights), 1, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(weights, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ShiftLeft(nn.Module):
    """f(x)[i] = s x[i - 1] along the first spatial axis (RAS x): not left-right symmetric."""

    def __init__(self, scale: float = 0.4) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=(3, 1, 1), padding=(1, 0, 0), bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([scale, 0.0, 0.0]).view(1, 1, 3, 1, 1))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class OutOfMemoryOnce(Pointwise):
    """Raises the CUDA out-of-memory error on its first call (fault injection), then works."""

    def __init__(self) -> None:
        super().__init__()
        self.failures_left = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failures_left:
            self.failures_left -= 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def _unit_cube(seed: int = 0, n: int = 32) -> np.ndarray:
    """Random values in [0, 1] with both ends present, so min-max normalisation is the identity."""
    data = np.random.default_rng(seed).random((n, n, n))
    data[0, 0, 0], data[-1, -1, -1] = 0.0, 1.0
    return data


PLAIN = SynthesisOptions(sharpen=False)


def test_pointwise_model_gives_the_analytic_output_on_a_ras_1mm_grid():
    data = _unit_cube()
    result = synthesize(data, np.eye(4), Pointwise((0.8,)), PLAIN)
    expected = np.clip(255 * 0.8 * data, 0, 128)  # both passes agree for a pointwise model
    assert result.data.dtype == np.float32
    assert result.data.shape == data.shape
    np.testing.assert_allclose(result.data, expected, atol=1e-4)
    assert result.data.max() == pytest.approx(128.0)  # 204 x is clipped at 128
    np.testing.assert_array_equal(result.affine, np.eye(4))
    assert result.device == "cpu"
    assert {"resample", "reorient", "normalise", "network", "flip", "postprocess"} <= set(result.timings)
    assert all(v >= 0 for v in result.timings.values())

    sharp = synthesize(data, np.eye(4), Pointwise((0.8,)), SynthesisOptions())
    np.testing.assert_allclose(sharp.data, expected + (expected - gaussian_filter(expected, 1.5)), atol=1e-3)


def test_anisotropic_las_input_normalises_over_the_padded_volume():
    # 2 mm along the second axis, L-A-S voxel order, intensities in [10, 20]: the volume needs
    # padding, so (as upstream) the padding zeros set the minimum: x = value / 20.
    rng = np.random.default_rng(1)
    data = 10.0 + 10.0 * rng.random((20, 9, 17))
    data[3, 4, 5] = 20.0
    affine = np.diag([-1.0, 2.0, 1.0, 1.0])
    affine[:3, 3] = (40.0, -30.0, 12.0)
    result = synthesize(data, affine, Pointwise((0.4,)), PLAIN)
    resampled = resample_to_isotropic(data, affine)
    assert result.data.shape == resampled.data.shape == (20, 18, 17)
    np.testing.assert_allclose(result.affine, resampled.affine)
    expected = np.clip(255 * 0.4 * resampled.data / resampled.data.max(), 0, 128)
    np.testing.assert_allclose(result.data, expected, atol=1e-4)


def test_flip_averaging_with_an_asymmetric_model():
    data = _unit_cube(2)
    shifted_left = np.zeros_like(data)  # x[i - 1]
    shifted_left[1:] = data[:-1]
    shifted_right = np.zeros_like(data)  # x[i + 1]
    shifted_right[:-1] = data[1:]
    model = ShiftLeft(0.4)

    flipped = synthesize(data, np.eye(4), model, PLAIN)
    expected = 0.5 * np.clip(102 * shifted_left, 0, 128) + 0.5 * np.clip(102 * shifted_right, 0, 128)
    np.testing.assert_allclose(flipped.data, expected, atol=1e-4)

    single = synthesize(data, np.eye(4), model, SynthesisOptions(flip=False, sharpen=False))
    np.testing.assert_allclose(single.data, np.clip(102 * shifted_left, 0, 128), atol=1e-4)
    assert "flip" not in single.timings


def test_flip_is_along_the_left_right_axis_whatever_the_voxel_order():
    # The same head stored P-S-R: voxel axis 2 is left-right. psr[i, j, k] = ras[k, n-1-i, j].
    ras = _unit_cube(3)
    n = ras.shape[0]
    psr = np.transpose(ras[:, ::-1, :], (1, 2, 0)).copy()
    affine = np.zeros((4, 4))
    affine[1, 0], affine[2, 1], affine[0, 2], affine[3, 3] = -1.0, 1.0, 1.0, 1.0
    affine[1, 3] = n - 1.0
    # Check the construction: voxel (i, j, k) of psr is world (k, n-1-i, j), i.e. RAS voxel (k, n-1-i, j).
    assert psr[2, 5, 7] == ras[7, n - 1 - 2, 5]
    np.testing.assert_allclose(affine @ [2, 5, 7, 1], [7, n - 1 - 2, 5, 1])

    result = synthesize(psr, affine, ShiftLeft(0.4), SynthesisOptions(flip=False, sharpen=False))
    expected_ras = np.zeros_like(ras)
    expected_ras[1:] = 102 * ras[:-1]
    expected_psr = np.transpose(expected_ras[:, ::-1, :], (1, 2, 0))
    np.testing.assert_allclose(result.data, expected_psr, atol=1e-4)
    np.testing.assert_allclose(result.affine, affine)


def test_ct_clips_before_normalising():
    data = np.linspace(-100.0, 200.0, 32**3).reshape(32, 32, 32)
    result = synthesize(data, np.eye(4), Pointwise((0.4,)), SynthesisOptions(ct=True, sharpen=False))
    expected = np.clip(102 * np.clip(data, 0, 80) / 80.0, 0, 128)
    np.testing.assert_allclose(result.data, expected, atol=1e-4)


def test_two_channel_model_gets_each_channel_normalised_on_its_own():
    data = np.stack([_unit_cube(5) * 300.0, _unit_cube(6) * 2.0 - 1.0], axis=-1)
    model = Pointwise((0.2, 0.3))
    result = synthesize(data, np.eye(4), model, PLAIN)
    x0 = data[..., 0] / 300.0
    x1 = (data[..., 1] + 1.0) / 2.0
    np.testing.assert_allclose(result.data, np.clip(255 * (0.2 * x0 + 0.3 * x1), 0, 128), atol=1e-4)

    net = SynthSRUNet(UNetConfig(n_levels=2, base_features=2)).to_inference()
    with pytest.raises(ValueError, match="takes 1 input channel"):
        synthesize(data, np.eye(4), net, PLAIN)


def test_large_field_of_view_is_cropped_to_the_head_and_put_back_with_zeros():
    data = np.full((40, 40, 300), 0.02)
    data[10:30, 12:28, 200:240] = 1.0  # the "head"
    data[5, 5, 20] = 0.0
    options = SynthesisOptions(sharpen=False, max_fov_mm=64)
    result = synthesize(data, np.eye(4), Pointwise((0.4,)), options)
    assert result.data.shape == data.shape
    # head box z 200-240 plus a 10 mm margin: 190-250; x and y (40 <= 64) are kept whole.
    inside = np.zeros(data.shape, dtype=bool)
    inside[:, :, 190:250] = True
    np.testing.assert_allclose(result.data[inside], np.clip(102 * data[inside], 0, 128), atol=1e-4)
    assert np.all(result.data[~inside] == 0)
    assert any("exceeds 64 mm" in note for note in result.notes)


def test_fov_box_keeps_the_superior_end_of_a_long_head_box():
    volume = np.zeros((50, 300, 300))
    volume[10:40, 20:280, 30:290] = 1.0
    box = fov_crop_box(volume, max_fov_mm=128)
    assert box is not None
    assert box.start[0] == 0 and box.stop[0] == 50  # short axis untouched
    assert box.stop[1] - box.start[1] == 128 and box.start[1] == (10 + 290 - 128) // 2  # centred
    assert box.stop[2] == 300 and box.start[2] == 300 - 128  # S-I: superior end kept
    assert fov_crop_box(np.zeros((30, 30, 30)), max_fov_mm=64) is None


def test_background_crop_box_is_aligned_and_exact_for_a_pointwise_model():
    data = np.zeros((96, 96, 96))
    data[40:60, 35:50, 50:70] = _unit_cube(7, 20)[:, :15, :20] + 0.5
    prepared = prepare_input(data, crop_background=True, background_margin=8)
    box = prepared.network_box
    # padded to 96^3 (no padding): 40-60 -> 32-68 -> 32-80; 35-50 -> 27-58 -> 16-64; 50-70 -> 42-78 -> 32-80
    assert box == BoundingBox((32, 16, 32), (80, 64, 80))
    assert box == box.align(16, prepared.padded_shape)
    assert prepared.array.shape == (1, *box.shape)
    np.testing.assert_allclose(prepared.array[0], box.crop(data) / data.max(), atol=1e-7)
    assert prepare_input(data, crop_background=False).network_box is None

    # End to end with the default margin (32) on a larger field of view: same result as
    # uncropped for a model whose background response is 0.
    big = np.zeros((160, 128, 144))
    big[60:90, 50:80, 40:75] = _unit_cube(8, 35)[:30, :30, :35] + 0.5
    assert prepare_input(big, crop_background=True).network_box is not None
    model = Pointwise((0.4,))
    cropped = synthesize(big, np.eye(4), model, SynthesisOptions(crop_background=True))
    full = synthesize(big, np.eye(4), model, SynthesisOptions(crop_background=False))
    np.testing.assert_allclose(cropped.data, full.data, atol=1e-4)
    assert cropped.data.max() > 50


def test_out_of_memory_moves_on_to_the_next_attempt_with_a_note():
    batch = _unit_cube(8, 16)[None].astype(np.float32)
    notes: list[str] = []
    model = OutOfMemoryOnce()
    prediction, used = run_network(
        model, batch, attempts=(Attempt("cpu", True), Attempt("cpu", False)), flip=True, notes=notes
    )
    assert used == Attempt("cpu", False)
    np.testing.assert_allclose(prediction, np.clip(102 * batch[0], 0, 128), atol=1e-4)
    assert len(notes) == 1 and "out of memory" in notes[0] and "redone on cpu (float32)" in notes[0]
    # Out of memory on the last attempt is not swallowed.
    with pytest.raises(torch.OutOfMemoryError):
        run_network(OutOfMemoryOnce(), batch, attempts=(Attempt("cpu", False),), notes=[])


def test_attempt_plan_falls_back_from_gpu_to_cpu_float32():
    assert attempt_plan("cuda:1", half=True) == (Attempt("cuda:1", True), Attempt("cpu", False))
    assert attempt_plan("cuda:0", half=False) == (Attempt("cuda:0", False), Attempt("cpu", False))
    assert attempt_plan("cpu", half=True) == (Attempt("cpu", False),)


def test_half_on_cpu_is_ignored_with_a_note():
    data = _unit_cube(9)
    result = synthesize(data, np.eye(4), Pointwise((0.4,)), SynthesisOptions(half=True, sharpen=False))
    np.testing.assert_allclose(result.data, 102 * data, atol=1e-4)
    assert any("half precision" in note for note in result.notes)


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("AUTO") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cpu"):
            resolve_device("cuda:0")
        with pytest.raises(DeviceError):
            synthesize(_unit_cube(), np.eye(4), Pointwise(), SynthesisOptions(device="cuda"))


def test_native_grid_resampling_gives_back_the_input_grid(tmp_path):
    # 1.1 x 2.5 x 1 mm, L-A-S, a ramp along the 2.5 mm axis plus a constant.
    shape = (12, 10, 8)
    ramp = 5.0 + np.arange(shape[1], dtype=float)
    data = np.broadcast_to(ramp[None, :, None], shape).copy()
    affine = np.diag([-1.1, 2.5, 1.0, 1.0])
    result = synthesize(data, affine, Pointwise((0.4,)), PLAIN)
    path = tmp_path / "synth.nii.gz"
    nib.save(nib.Nifti1Image(result.data, result.affine), path)
    img = nib.load(path)
    native = resample_to_grid(np.asarray(img.dataobj), img.affine, shape, affine, order=1)
    assert native.shape == shape
    # The output is 102 * value / max (padding puts the minimum at 0); exact at interior voxels.
    np.testing.assert_allclose(native[:, 1:-1, :], (102 * data / data.max())[:, 1:-1, :], atol=1e-3)


def test_invalid_inputs_are_refused_with_clear_messages():
    # (A constant image that needs padding is not constant once padded, as upstream.)
    with pytest.raises(ValueError, match="constant"):
        synthesize(np.full((32, 32, 32), 3.0), np.eye(4), Pointwise(), PLAIN)
    with pytest.raises(ValueError, match="NaN"):
        synthesize(np.full((8, 8, 8), np.nan), np.eye(4), Pointwise(), PLAIN)
    with pytest.raises(ValueError, match="3D"):
        synthesize(np.zeros((8, 8)), np.eye(4), Pointwise(), PLAIN)
    with pytest.raises(ValueError, match="max_fov_mm"):
        SynthesisOptions(max_fov_mm=10)


def _random_unet(config: UNetConfig, seed: int) -> SynthSRUNet:
    torch.manual_seed(seed)
    net = SynthSRUNet(config)
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(-1.5, 1.5, generator=generator)  # some negative scales
            module.bias.data.uniform_(-0.2, 0.2, generator=generator)
    return net.to_inference()


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (UNetConfig(n_levels=3, base_features=4), (16, 24, 8)),
        (UNetConfig(n_levels=4, base_features=3, convs_per_level=1), (16, 8, 32)),
        (UNetConfig(n_levels=1, base_features=3), (4, 6, 2)),
        (UNetConfig(n_levels=2, base_features=3, convs_per_level=3), (32, 8, 8)),
        (
            UNetConfig(n_levels=3, base_features=4, in_channels=2, out_channels=3, final_activation="softmax"),
            (8, 16, 24),
        ),
    ],
)
def test_fast_engine_equals_the_network(config, shape):
    net = _random_unet(config, seed=sum(shape))
    x = torch.rand(1, config.in_channels, *shape, generator=torch.Generator().manual_seed(1))
    assert engine.supports_fast_forward(net)
    with torch.inference_mode():
        reference = net(x)
        fast = engine.fast_forward(net, x)
        again = engine.fast_forward(net, x)  # cached phase weights give the same result
    assert fast.shape == reference.shape
    np.testing.assert_allclose(fast.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again.numpy(), fast.numpy())
    # Slab sizes (one row, a few rows, everything at once) must not change the result.
    old = engine.SLAB_BYTES
    try:
        for slab_bytes in (1, 3000, 20000):
            engine.SLAB_BYTES = slab_bytes
            with torch.inference_mode():
                sliced = engine.fast_forward(net, x)
            np.testing.assert_allclose(sliced.numpy(), fast.numpy(), rtol=1e-6, atol=1e-6)
    finally:
        engine.SLAB_BYTES = old

    # A workspace that pools every buffer, shared by successive passes, changes nothing.
    workspace = engine.Workspace(min_bytes=0)
    other = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        first = engine.fast_forward(net, x, workspace=workspace)
        allocated = workspace.allocated_bytes
        second = engine.fast_forward(net, other, workspace=workspace)
        third = engine.fast_forward(net, x, workspace=workspace)
        expected_other = net(other)
    assert allocated > 0 and workspace.allocated_bytes == allocated  # buffers were reused, not added
    np.testing.assert_array_equal(first.numpy(), fast.numpy())
    np.testing.assert_array_equal(third.numpy(), first.numpy())
    np.testing.assert_allclose(second.numpy(), expected_other.numpy(), rtol=1e-5, atol=1e-5)


def test_engine_forward_equals_the_autograd_module_and_leaves_the_input_untouched():
    config = UNetConfig(in_channels=1, n_levels=4, base_features=3, convs_per_level=2)
    net = _random_unet(config, seed=3)
    x = torch.randn(1, 1, 16, 8, 24, generator=torch.Generator().manual_seed(4))
    x_before = x.clone()
    with torch.enable_grad():
        reference = net(x)  # the plain module
    with torch.inference_mode():
        out = engine.forward(net, x)
    assert torch.equal(x, x_before)
    assert out.shape == (1, 1, 16, 8, 24) and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), reference.numpy(), rtol=1e-5, atol=1e-5)
    assert (reference.abs() > 1e-2).float().mean() > 0.5  # the comparison is not between zeros


def test_engine_falls_back_to_the_module_for_other_models():
    model = ShiftLeft(0.5)
    assert not engine.supports_fast_forward(model)
    x = torch.rand(1, 1, 4, 4, 4)
    with torch.inference_mode():
        np.testing.assert_array_equal(engine.forward(model, x).numpy(), model(x).numpy())


def test_synthesize_with_a_small_synthsr_unet_matches_a_direct_forward():
    net = _random_unet(UNetConfig(n_levels=3, base_features=4), seed=11)
    data = _unit_cube(12, 32)
    result = synthesize(data, np.eye(4), net, PLAIN)
    x = torch.from_numpy(data.astype(np.float32))[None, None]
    with torch.no_grad():
        p1 = net(x)[0, 0].numpy()
        p2 = torch.flip(net(torch.flip(x, dims=(2,))), dims=(2,))[0, 0].numpy()
    expected = 0.5 * np.clip(255 * p1, 0, 128) + 0.5 * np.clip(255 * p2, 0, 128)
    np.testing.assert_allclose(result.data, expected, atol=255 * 1e-5)
