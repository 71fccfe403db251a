"""Exact reorientation to RAS and back (permutations and flips only)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from synthsr_bids.preprocessing.orientation import axcodes, reorient_to_ras, undo_reorientation

PERMUTATIONS = list(itertools.permutations(range(3)))
SIGNS = list(itertools.product((1.0, -1.0), repeat=3))
SIZES = np.array([1.5, 0.8, 2.0])


def _affine(perm, signs, sizes=SIZES, translation=(-12.0, 30.0, 7.5)) -> np.ndarray:
    """Voxel axis ``i`` runs along world axis ``perm[i]`` with direction ``signs[i]``."""
    affine = np.eye(4)
    affine[:3, :3] = 0.0
    for voxel_axis, world_axis in enumerate(perm):
        affine[world_axis, voxel_axis] = signs[voxel_axis] * sizes[voxel_axis]
    affine[:3, 3] = translation
    return affine


def _affine_from_codes(codes: str) -> np.ndarray:
    world = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    perm = [world[c][0] for c in codes]
    signs = [world[c][1] for c in codes]
    return _affine(perm, signs)


def _index_map(affine_from: np.ndarray, affine_to: np.ndarray, index) -> tuple[int, ...]:
    """Voxel of ``affine_to`` at the world point of voxel ``index`` of ``affine_from``."""
    world = affine_from @ np.array([*index, 1.0])
    other = np.linalg.solve(affine_to, world)[:3]
    rounded = np.rint(other)
    np.testing.assert_allclose(other, rounded, atol=1e-9)
    return tuple(int(v) for v in rounded)


@pytest.mark.parametrize(("perm", "signs"), list(itertools.product(PERMUTATIONS, SIGNS)))
def test_all_48_axis_permutations_and_flips_end_in_ras_and_round_trip_exactly(perm, signs):
    rng = np.random.default_rng(abs(hash((perm, signs))) % 2**32)
    data = rng.random((3, 4, 5))
    affine = _affine(perm, signs)
    ras, ras_affine, info = reorient_to_ras(data, affine)

    assert aff2axcodes(ras_affine) == ("R", "A", "S")
    # The RAS affine is diagonal with positive voxel sizes: no interpolation happened.
    np.testing.assert_allclose(np.abs(ras_affine[:3, :3]), np.diag(np.diag(np.abs(ras_affine[:3, :3]))), atol=0)
    assert np.all(np.diag(ras_affine[:3, :3]) > 0)
    # Every voxel keeps its value at the same world point.
    for index in [(0, 0, 0), (2, 3, 4), (1, 0, 3), (2, 1, 0)]:
        assert ras[_index_map(affine, ras_affine, index)] == data[index]
    assert sorted(ras.shape) == sorted(data.shape)
    back = undo_reorientation(ras, info)
    np.testing.assert_array_equal(back, data)
    assert info.input_shape == (3, 4, 5)
    assert info.is_identity == (perm == (0, 1, 2) and signs == (1.0, 1.0, 1.0))


@pytest.mark.parametrize("codes", ["LAS", "LIA", "PSR", "RAS", "ILP"])
def test_common_orientations_end_in_ras(codes):
    affine = _affine_from_codes(codes)
    assert axcodes(affine) == tuple(codes)
    data = np.arange(60, dtype=float).reshape(3, 4, 5)
    ras, ras_affine, info = reorient_to_ras(data, affine)
    assert axcodes(ras_affine) == ("R", "A", "S")
    assert info.input_axcodes == tuple(codes)
    # The voxel that is most left-posterior-inferior in the input is RAS voxel (0, 0, 0).
    world = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1).reshape(-1, 3)
    world = world @ affine[:3, :3].T
    lpi = np.lexsort((world[:, 2], world[:, 1], world[:, 0]))[0]
    assert ras[0, 0, 0] == data.reshape(-1)[lpi]
    np.testing.assert_array_equal(undo_reorientation(ras, info), data)


def test_channels_ride_along():
    affine = _affine_from_codes("PSR")
    data = np.random.default_rng(5).random((3, 4, 5, 2))
    ras, _, info = reorient_to_ras(data, affine)
    assert ras.shape == (5, 3, 4, 2)
    for c in range(2):
        single, _, _ = reorient_to_ras(data[..., c], affine)
        np.testing.assert_array_equal(ras[..., c], single)
    np.testing.assert_array_equal(undo_reorientation(ras, info), data)


def test_oblique_image_goes_to_the_closest_axes():
    angle = np.radians(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.array([[0, 0, -1.0], [1.0, 0, 0], [0, 1.0, 0]])  # ~ A S L
    data = np.random.default_rng(6).random((4, 5, 6))
    ras, ras_affine, info = reorient_to_ras(data, affine)
    assert ras.shape == (6, 4, 5)
    assert axcodes(ras_affine) == ("R", "A", "S")
    np.testing.assert_array_equal(undo_reorientation(ras, info), data)
    # World coordinates are preserved voxel by voxel.
    np.testing.assert_allclose(ras_affine @ [5, 0, 0, 1], affine @ [0, 0, 0, 1])


def test_undo_rejects_an_array_from_another_grid():
    _, _, info = reorient_to_ras(np.zeros((3, 4, 5)), _affine_from_codes("LIA"))
    with pytest.raises(ValueError, match="does not come from"):
        undo_reorientation(np.zeros((3, 4, 5)), info)


def test_degenerate_affine_is_rejected():
    affine = np.eye(4)
    affine[:3, 2] = 0.0
    with pytest.raises(ValueError, match="header"):
        reorient_to_ras(np.zeros((2, 2, 2)), affine)
