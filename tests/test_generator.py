"""Tests of the SynthSR generative model on procedural phantoms (no shared data needed)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from synthsr_bids.training.generator import AcquisitionParams, GeneratorConfig, SynthGenerator
from synthsr_bids.training.labels import (
    LabelFileError,
    label_volume_from_array,
    load_contrast_priors,
    load_label_map,
    load_label_scheme,
    split_hemispheres,
)
from synthsr_bids.training.phantoms import head_phantom
from synthsr_bids.training.resolution import (
    AxisAcquisition,
    apply_along_axis,
    linear_upsampling_matrix,
    slice_sampling_matrix,
)
from synthsr_bids.training.spatial import gather_nearest, integrate_velocity

SHAPE = (40, 40, 40)
CROP = (32, 32, 32)


@pytest.fixture(scope="module")
def scheme():
    return load_label_scheme()


@pytest.fixture(scope="module")
def contrasts(scheme):
    return load_contrast_priors(n_classes=scheme.n_contrast_classes)


@pytest.fixture(scope="module")
def phantom(scheme):
    return label_volume_from_array(head_phantom(SHAPE), scheme, name="phantom")


# A configuration without any spatial randomness: the crop is the phantom's brain centre.
STILL = GeneratorConfig(crop_shape=CROP, scaling=(1.0, 1.0), rotation_deg=0.0, shear=0.0, translation_mm=0.0,
                        svf_std_max=0.0, flip_prob=0.0, skull_strip_prob=0.0, plaque_prob=0.0, stroke_prob=0.0,
                        tumour_prob=0.0)


def make(scheme, contrasts, volume, config, seed=0):
    return SynthGenerator([volume], scheme, contrasts, config, seed=seed)


def seg_value(scheme, label: int) -> int:
    return scheme.segmentation_labels.index(label)


def test_batch_shapes_types_and_ranges(scheme, contrasts, phantom):
    gen = make(scheme, contrasts, phantom, GeneratorConfig(crop_shape=CROP), seed=1)
    batch = gen.generate(2)
    for t in (batch.input, batch.target, batch.labels, batch.lesion_mask):
        assert t.shape == (2, 1, *CROP)
    assert batch.input.dtype == torch.float32 and batch.target.dtype == torch.float32
    assert batch.labels.dtype == torch.int64 and batch.lesion_mask.dtype == torch.bool
    assert float(batch.input.min()) >= 0.0 and float(batch.input.max()) <= 1.0 + 1e-6
    assert float(batch.input.max()) > 0.5  # min-max normalised, not all dark
    # target: FreeSurfer-like T1 / 255 -> white matter 110/255 is the brightest brain tissue
    assert 0.0 <= float(batch.target.min()) and float(batch.target.max()) <= 110.0 / 255.0 + 1e-6
    assert int(batch.labels.max()) < scheme.n_segmentation_labels
    assert len(batch.params) == 2


def test_still_generator_reproduces_the_phantom_anatomy(scheme, contrasts, phantom):
    batch = make(scheme, contrasts, phantom, STILL).generate(1)
    labels = batch.labels[0, 0]
    # white matter: target value 110/255 exactly in the deep white matter (blur 0.5 voxel)
    wm = labels == seg_value(scheme, 2)
    assert wm.sum() > 100
    core = torch.zeros_like(wm)
    core[8:-8, 8:-8, 8:-8] = True
    assert torch.allclose(batch.target[0, 0][wm & core].median(), torch.tensor(110.0 / 255.0), atol=1e-3)
    # left labels (2) lie at lower x than right labels (41) in RAS order
    xs = torch.arange(CROP[0]).view(-1, 1, 1).expand(CROP).float()
    assert xs[labels == seg_value(scheme, 2)].mean() < xs[labels == seg_value(scheme, 41)].mean() - 5


def test_same_seed_same_batch_other_seed_other_batch(scheme, contrasts, phantom):
    config = GeneratorConfig(crop_shape=CROP, plaque_prob=0.5, stroke_prob=0.5, tumour_prob=0.5)
    a = make(scheme, contrasts, phantom, config, seed=7).generate(2)
    b = make(scheme, contrasts, phantom, config, seed=7).generate(2)
    c = make(scheme, contrasts, phantom, config, seed=8).generate(2)
    assert torch.equal(a.input, b.input) and torch.equal(a.target, b.target)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.lesion_mask, b.lesion_mask)
    assert not torch.equal(a.input, c.input)


def test_generator_state_restores_the_stream(scheme, contrasts, phantom):
    gen = make(scheme, contrasts, phantom, GeneratorConfig(crop_shape=CROP), seed=3)
    gen.generate(1)
    state = gen.get_state()
    expected = gen.generate(1)
    gen.generate(1)
    gen.set_state(state)
    again = gen.generate(1)
    assert torch.equal(expected.input, again.input) and torch.equal(expected.labels, again.labels)


def test_flip_mirrors_the_crop_and_swaps_left_right_labels(scheme, contrasts, phantom):
    plain = make(scheme, contrasts, phantom, STILL, seed=5).generate(1)
    flipped = make(scheme, contrasts, phantom, dataclasses.replace(STILL, flip_prob=1.0), seed=5).generate(1)
    assert flipped.params[0].flipped and not plain.params[0].flipped
    swap = torch.from_numpy(scheme.segmentation_swap_lut())
    assert torch.equal(flipped.labels[0, 0], swap[plain.labels[0, 0].flip(0)])
    # the mirrored brain is still anatomically consistent: left labels on the low-x (left) side
    xs = torch.arange(CROP[0]).view(-1, 1, 1).expand(CROP).float()
    lab = flipped.labels[0, 0]
    assert xs[lab == seg_value(scheme, 2)].mean() < xs[lab == seg_value(scheme, 41)].mean() - 5
    # ... and what was the left white matter is now labelled right white matter
    was_left = plain.labels[0, 0].flip(0) == seg_value(scheme, 2)
    assert bool((lab[was_left] == seg_value(scheme, 41)).all())
    assert torch.allclose(flipped.target[0, 0], plain.target[0, 0].flip(0))


def test_skull_stripping_removes_extracerebral_tissue(scheme, contrasts, phantom):
    config = dataclasses.replace(STILL, crop_shape=(40, 40, 40), skull_strip_prob=1.0)
    batch = make(scheme, contrasts, phantom, config).generate(1)
    whole = make(scheme, contrasts, phantom, dataclasses.replace(config, skull_strip_prob=0.0)).generate(1)
    # the scalp (label 507) renders in the whole-head target but is background after stripping
    scalp = torch.from_numpy(np.isin(head_phantom(SHAPE), [507]))
    assert float(whole.target[0, 0][scalp].mean()) > 0.1
    assert float(batch.target[0, 0][scalp].max()) < 0.02  # only blur spill-over from the brain


def test_plaques_and_strokes_are_in_the_input_only(scheme, contrasts, phantom):
    config = dataclasses.replace(STILL, plaque_prob=1.0, stroke_prob=1.0, noise_max=0.0, bias_std_max=0.0,
                                 isotropic_prob=1.0, isotropic_spacing=(1.0, 1.0))
    healthy_config = dataclasses.replace(config, plaque_prob=0.0, stroke_prob=0.0)
    n_with_lesions = 0
    for seed in range(4):
        sick = make(scheme, contrasts, phantom, config, seed=seed).generate(1)
        healthy = make(scheme, contrasts, phantom, healthy_config, seed=seed).generate(1)
        assert set(sick.params[0].lesions) <= {"plaques", "stroke"}
        assert bool(sick.params[0].lesions) == bool(sick.lesion_mask.any())
        assert torch.equal(sick.target, healthy.target)  # the target keeps the healthy anatomy
        assert torch.equal(sick.labels, healthy.labels)
        mask = sick.lesion_mask[0, 0]
        if mask.sum() < 20:
            continue
        n_with_lesions += 1
        assert not healthy.lesion_mask.any()
        # the input changed inside the lesions (the min-max/gamma also moves the rest a little)
        diff = (sick.input - healthy.input).abs()[0, 0]
        assert float(diff[mask].mean()) > 3 * float(diff[~mask].mean())
    assert n_with_lesions >= 2


def test_plaques_are_not_recorded_where_there_is_no_white_matter(scheme, contrasts):
    no_wm = head_phantom(SHAPE)
    no_wm[np.isin(no_wm, [2, 41])] = 3  # white matter becomes cortex
    volume = label_volume_from_array(no_wm, scheme, name="no-wm")
    config = dataclasses.replace(STILL, plaque_prob=1.0)
    for seed in range(3):
        batch = make(scheme, contrasts, volume, config, seed=seed).generate(1)
        assert batch.params[0].lesions == ()
        assert not batch.lesion_mask.any()


def test_tumour_target_is_healthy_tissue_and_mass_effect_moves_anatomy(scheme, contrasts, phantom):
    config = dataclasses.replace(STILL, tumour_prob=1.0, target_blur=0.0)
    found = False
    for seed in range(6):
        batch = make(scheme, contrasts, phantom, config, seed=seed).generate(1)
        mask, labels, target = batch.lesion_mask[0, 0], batch.labels[0, 0], batch.target[0, 0]
        if mask.sum() < 20:
            continue
        found = True
        assert batch.params[0].lesions == ("tumour",)
        # without blur the target is the healthy T1 value of each voxel's label, tumour or not
        gen = make(scheme, contrasts, phantom, config)
        t1 = gen._target_table()
        expected = torch.zeros(scheme.n_segmentation_labels)
        seg = scheme.segmentation_lut()
        for label in np.unique(head_phantom(SHAPE)):
            if seg[scheme.index_of(int(label))] != 0:  # background and extra-cerebral tissues share 0
                expected[seg[scheme.index_of(int(label))]] = t1[scheme.index_of(int(label))]
        assert bool((labels[mask] != 0).all())
        assert torch.allclose(target[mask], expected[labels[mask]])
        brain = labels != 0
        assert torch.allclose(target[brain], expected[labels[brain]])
        still = make(scheme, contrasts, phantom, STILL, seed=seed).generate(1)
        assert not torch.equal(still.labels, batch.labels)  # mass effect displaced the anatomy
    assert found


def test_thick_slices_remove_high_frequencies_along_the_chosen_axis(scheme, contrasts, phantom):
    gen = make(scheme, contrasts, phantom, STILL)
    noise = torch.rand(CROP, generator=torch.Generator().manual_seed(0))
    for axis in range(3):
        axes = [AxisAcquisition(1.0, 1.0)] * 3
        axes[axis] = AxisAcquisition(spacing=6.0, thickness=5.0, phase=1.0)
        out = gen.acquire(noise, AcquisitionParams(axes=tuple(axes)))
        assert out.shape == noise.shape
        energy = [float((out.diff(dim=d) ** 2).mean()) for d in range(3)]
        others = [e for d, e in enumerate(energy) if d != axis]
        assert energy[axis] < 0.05 * min(others), energy


def test_full_generator_reduces_resolution_along_its_thick_axis(scheme, contrasts, phantom):
    config = dataclasses.replace(STILL, isotropic_prob=0.0, thick_axes_probs=(1.0, 0.0, 0.0), slice_spacing=(6.0, 6.0),
                                 oblique_prob=0.0, random_std=(20.0, 25.0), gamma_std=0.0, noise_max=0.0)
    for seed in range(3):
        batch = make(scheme, contrasts, phantom, config, seed=seed).generate(1)
        (axis,) = batch.params[0].acquisition.thick_axes
        x = batch.input[0, 0]
        energy = [float((x.diff(dim=d) ** 2).mean()) for d in range(3)]
        others = [e for d, e in enumerate(energy) if d != axis]
        assert energy[axis] < 0.3 * min(others), (axis, energy)


def test_oblique_acquisition_blurs_along_a_rotated_axis(scheme, contrasts, phantom):
    gen = make(scheme, contrasts, phantom, STILL)
    noise = torch.rand(CROP, generator=torch.Generator().manual_seed(1))
    axes = (AxisAcquisition(1.0, 1.0), AxisAcquisition(1.0, 1.0), AxisAcquisition(6.0, 5.0))
    straight = gen.acquire(noise, AcquisitionParams(axes=axes))
    tilted = gen.acquire(noise, AcquisitionParams(axes=axes, rotation_deg=(45.0, 0.0, 0.0)))
    assert torch.isfinite(tilted).all()
    # rotating the slice normal (axis 2) about axis 0 by 45 degrees spreads the blur onto axis 1
    e_straight = [float((straight.diff(dim=d) ** 2).mean()) for d in range(3)]
    e_tilted = [float((tilted.diff(dim=d) ** 2).mean()) for d in range(3)]
    assert e_tilted[1] < 0.5 * e_straight[1]
    assert e_tilted[2] > 2 * e_straight[2]


def test_resolution_matrices():
    acq = AxisAcquisition(spacing=4.0, thickness=3.0, phase=0.5)
    down = slice_sampling_matrix(20, acq)
    assert down.shape == (len(acq.positions(20)), 20)
    assert torch.allclose(down.sum(1), torch.ones(down.shape[0], dtype=down.dtype))
    # the slice profile peaks at the slice position
    assert [int(r.argmax()) for r in down] == [round(p) for p in acq.positions(20)]
    up = linear_upsampling_matrix(20, acq.positions(20))
    ramp = torch.tensor(acq.positions(20), dtype=torch.float64)
    rebuilt = up @ ramp
    inside = (torch.arange(20) >= 0.5) & (torch.arange(20) <= acq.positions(20)[-1])
    assert torch.allclose(rebuilt[inside], torch.arange(20, dtype=torch.float64)[inside])
    vol = torch.arange(2 * 20 * 3, dtype=torch.float32).view(2, 20, 3)
    assert torch.allclose(apply_along_axis(vol, torch.eye(20), 1), vol)


def test_velocity_integration_translation_and_inverse():
    const = torch.zeros(1, 3, 8, 8, 8)
    const[:, 1] = 2.5
    assert torch.allclose(integrate_velocity(const, spacing=4.0), const, atol=1e-5)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 3.0
    v = torch.nn.functional.interpolate(coarse, size=(17, 17, 17), mode="trilinear", align_corners=True)
    fwd, bwd = integrate_velocity(v, spacing=2.0), integrate_velocity(-v, spacing=2.0)
    assert float(fwd.abs().max()) > 5.0  # a real deformation, several mm
    # phi_v o phi_-v ~ identity: u_fwd(x + u_bwd(x)) + u_bwd(x) ~ 0 (inside, away from borders)
    from synthsr_bids.training.spatial import to_grid_sample

    axes = [torch.linspace(-1, 1, 17)] * 3
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    ident = torch.stack([w, h, d], -1)[None]
    grid = ident + to_grid_sample(bwd / 2.0, (17, 17, 17))
    comp = torch.nn.functional.grid_sample(fwd, grid, align_corners=True) + bwd
    assert float(comp[..., 4:-4, 4:-4, 4:-4].abs().max()) < 0.05 * float(fwd.abs().max())


def test_gather_nearest_matches_indexing_and_reads_zero_outside():
    vol = torch.arange(4 * 5 * 6, dtype=torch.uint8).view(4, 5, 6)
    coords = torch.tensor([[0.2, 1.4, 4.6], [3.0, 4.0, 5.0], [-1.0, 0.0, 0.0], [1.0, 5.2, 0.0]])
    out = gather_nearest(vol, coords)
    assert out.tolist() == [int(vol[0, 1, 5]), int(vol[3, 4, 5]), 0, 0]


def test_label_map_loading_reorients_to_ras_and_splits_hemispheres(tmp_path: Path, scheme):
    ras = head_phantom(SHAPE)
    # store it LIA, like SynthSeg's maps: voxel axes (L, I, A)
    lia = np.flip(np.transpose(ras, (0, 2, 1)), axis=(0, 1))
    affine = np.array([[-1, 0, 0, 20], [0, 0, 1, -20], [0, -1, 0, 20], [0, 0, 0, 1]], dtype=float)
    assert nib.aff2axcodes(affine) == ("L", "I", "A")
    path = tmp_path / "map.nii.gz"
    nib.save(nib.Nifti1Image(lia.astype(np.int32), affine), path)
    vol = load_label_map(path, scheme)
    labels = scheme.labels[vol.indices]
    xs = np.indices(labels.shape)[0]
    assert xs[labels == 2].mean() < xs[labels == 41].mean() - 5
    # a map using left labels on both sides (SynthSR's held-out maps) gets its right side back
    left_only = np.where(ras == 41, 2, np.where(ras == 42, 3, ras))
    split = split_hemispheres(left_only)
    assert np.array_equal(np.isin(split, [41, 42]), np.isin(ras, [41, 42]))


def test_unknown_labels_are_reported_with_the_file(tmp_path: Path, scheme):
    bad = head_phantom(SHAPE)
    bad[20, 20, 20] = 999
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(bad, np.eye(4)), path)
    with pytest.raises(LabelFileError, match=r"bad\.nii\.gz.*\[999\].*label_aliases"):
        load_label_map(path, scheme)
    aliased = load_label_map(path, scheme, aliases={999: 2})
    bad[20, 20, 20] = 2
    relabelled = tmp_path / "relabelled.nii.gz"
    nib.save(nib.Nifti1Image(bad, np.eye(4)), relabelled)
    # the alias makes the voxel the label it names, as if the file had said so
    expected = load_label_map(relabelled, scheme)
    assert np.array_equal(aliased.indices, expected.indices)
    assert aliased.brain_box == expected.brain_box


def test_a_full_size_sample_is_well_formed_and_its_speed_is_reported(scheme, contrasts):
    """A 96^3 training sample on one thread: checked values, and the seconds per sample printed
    (``pytest -s``; never asserted: tests do not assert on time, see benchmarks/)."""
    volume = label_volume_from_array(head_phantom((112, 112, 112)), scheme, name="big")
    gen = SynthGenerator([volume], scheme, contrasts, GeneratorConfig(crop_shape=(96, 96, 96)), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen.sample()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            image, target, labels, lesions, _params = gen.sample()
            times.append(time.perf_counter() - start)
            assert image.shape == target.shape == labels.shape == lesions.shape == (96, 96, 96)
            assert torch.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
            assert image.max() > 0.5  # min-max normalised, not blank
            # the synthetic T1: white matter (the brightest class) at 110/255, blurred: never above it
            assert 0.0 <= target.min() and target.max() <= 110.0 / 255.0 + 1e-6
            assert (target > 80.0 / 255.0).sum() > 1000
    finally:
        torch.set_num_threads(threads)
    print(f"\ngenerator: {sorted(times)[1]:.3f} s per 96^3 sample (median of 3, 1 thread)")


def _head_with_a_spinal_canal(scheme):
    """The phantom head on top of a long CSF column (label 24) running down into a 'neck', as the
    extra-cerebral CSF of many SynthSeg training maps does."""
    head = head_phantom((48, 48, 48))
    labels = np.zeros((48, 48, 120), dtype=np.int32)
    labels[:, :, 72:] = head
    labels[21:27, 21:27, 0:80] = 24
    return label_volume_from_array(labels, scheme, name="canal")


def test_tissue_box_leaves_out_the_csf_column(scheme):
    volume = _head_with_a_spinal_canal(scheme)
    (brain_low, brain_high), (tissue_low, tissue_high) = volume.brain_box, volume.tissue_box
    assert brain_high[2] - brain_low[2] > 100  # the head box runs down the canal
    assert brain_high[2] - tissue_high[2] <= 3 and tissue_high[2] - tissue_low[2] < 45  # the tissue box: the head
    centre, extent = volume.box_centre_extent("tissue")
    assert np.array_equal(extent, np.subtract(tissue_high, tissue_low))
    assert np.array_equal(volume.box_centre_extent("brain")[0], volume.brain_centre)


def test_tissue_crops_hold_more_brain_and_probability_zero_keeps_the_stream(scheme, contrasts):
    volume = _head_with_a_spinal_canal(scheme)
    tissue_channels = [i for i, v in enumerate(scheme.segmentation_labels) if v not in (0, 24)]

    def brain_fraction(prob: float, seed: int = 3) -> float:
        config = GeneratorConfig(crop_shape=(32, 32, 32), tissue_crop_prob=prob)
        gen = SynthGenerator([volume], scheme, contrasts, config, seed=seed)
        return float(np.mean([np.isin(gen.sample()[2].numpy(), tissue_channels).mean() for _ in range(12)]))

    assert brain_fraction(1.0) > 2 * brain_fraction(0.0)
    # probability 0 draws nothing extra: the same samples as before the option existed
    a = SynthGenerator([volume], scheme, contrasts, GeneratorConfig(crop_shape=(32, 32, 32)), seed=5).sample()
    b = SynthGenerator([volume], scheme, contrasts, GeneratorConfig(crop_shape=(32, 32, 32), tissue_crop_prob=0.0),
                       seed=5).sample()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
