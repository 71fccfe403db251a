"""The models shipped inside the package (``synthsr_bids/data/models``): present, intact, usable.

``python -m synthsr_bids.training ship`` puts them there; these tests hold every shipped
version to the registry's size/SHA-256 and to the contracts of the code that uses them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from synthsr_bids.inference.predict import SynthesisOptions, synthesize
from synthsr_bids.models.registry import DEFAULT_MODEL, REGISTRY, resolve_model
from synthsr_bids.models.weights import load_weights
from synthsr_bids.morphometry.segment import DEFAULT_SEGMENTATION_MODEL, segmenter_from_network


@pytest.mark.parametrize("name", [DEFAULT_MODEL, DEFAULT_SEGMENTATION_MODEL])
def test_default_models_are_shipped_intact_under_a_permissive_license(name: str, tmp_path: Path) -> None:
    spec = REGISTRY[name]
    resolved = resolve_model(name, cache_dir=tmp_path)  # checks the size and the SHA-256
    assert spec.bundled and spec.url is None and spec.license == "Apache-2.0"
    assert resolved.sha256 == spec.sha256 and resolved.path.stat().st_size == spec.size
    assert resolved.path.stat().st_size < 20 * 2**20  # weight files in git stay small


def test_bundled_synthesis_model_asks_for_no_sharpening(tmp_path: Path) -> None:
    """MODEL_CARD.md ("Post-processing") and the --help text say so; configs/default.toml decides it."""
    loaded = load_weights(resolve_model(DEFAULT_MODEL, cache_dir=tmp_path).path)
    assert loaded.metadata["synthsr_bids.sharpen"] == "false" and loaded.sharpen is False


def test_bundled_segmenter_meets_the_morphometry_contract(tmp_path: Path) -> None:
    loaded = load_weights(resolve_model(DEFAULT_SEGMENTATION_MODEL, cache_dir=tmp_path).path)
    segmenter = segmenter_from_network(loaded.model, loaded.metadata, name=DEFAULT_SEGMENTATION_MODEL, sha256="-")
    ids = set(segmenter.table.ids)
    assert {0, 2, 3, 4, 17, 41, 42, 43, 53} <= ids  # background, WM/cortex/ventricles/hippocampi on both sides
    assert segmenter.input_scale == pytest.approx(1 / 128)


def _two_tissue_phantom(shape=(64, 72, 64)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A FLAIR-like head: bright cortex-like shell, darker white-matter-like core (1 mm, RAS)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / (np.array(shape)[:, None, None, None] * 0.4)) ** 2).sum(0))
    brain, core = radius < 1.0, radius < 0.75
    flair = np.where(core, 60.0, np.where(brain, 90.0, 0.0))
    return flair, core, brain & ~core


def test_bundled_model_gives_a_t1_like_image_where_the_input_has_tissue() -> None:
    loaded = load_weights(resolve_model(DEFAULT_MODEL).path)
    assert loaded.config.in_channels == 1 and loaded.config.out_channels == 1
    flair, white, grey = _two_tissue_phantom()
    result = synthesize(flair, np.eye(4), loaded.model, SynthesisOptions(device="cpu", flip=False))
    out = result.data
    assert out.shape == flair.shape and np.isfinite(out).all()
    assert out[white | grey].mean() > 20 and out[flair == 0].mean() < out[white | grey].mean() / 3
    # T1 contrast, the FLAIR's inverted: white matter brighter than grey (a copy of the input would fail)
    assert out[white].mean() > 1.05 * out[grey].mean()
