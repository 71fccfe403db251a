"""Reference tf.keras definition of the SynthSR U-Net, and the Keras parity fixture writer.

This script needs TensorFlow with Keras 2 (``tf.keras`` saving the legacy ``.h5`` layout
``<layer>/<layer>/kernel:0``). TensorFlow is NOT a dependency of synthsr-bids: install it in a
separate environment outside the repository, for example::

    python -m venv /work/tfenv
    /work/tfenv/bin/pip install "tensorflow-cpu==2.15.1" "numpy<2" h5py
    /work/tfenv/bin/python tools/keras_unet.py --out-dir tests/data/keras_parity

(TensorFlow >= 2.16 ships Keras 3; there, install ``tf-keras`` and set ``TF_USE_LEGACY_KERAS=1``.)

The network follows the ``unet`` of SynthSR's ``ext/neuron/models.py`` (layer names included):
per encoder level, ``convs_per_level`` Conv3D(3, 'same', activation='elu'), one
BatchNormalization, then MaxPooling3D(2) except at the bottom; per decoder step,
UpSampling3D(2), concatenate ``[skip, upsampled]``, the convolutions and one BatchNormalization;
then a 1x1x1 ``unet_likelihood`` convolution and ``unet_prediction`` (linear or softmax).
``build_keras_unet`` is importable, e.g. by a benchmark comparing against the PyTorch port.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

LOGGER = logging.getLogger("keras_unet")

#: The fixtures committed in tests/data/keras_parity/ (small widths, same layer names).
FIXTURES = {
    # A SynthSR-like regression net, saved as a full model (weights under model_weights/).
    "synthsr_small": dict(
        config=dict(in_channels=1, out_channels=1, n_levels=4, base_features=4, feat_mult=2,
                    convs_per_level=2, final_activation="linear"),
        input_shape=(1, 24, 32, 16),
        save="model",
    ),
    # A two-channel segmentation net with other widths, saved with save_weights (root layout).
    "seg_small": dict(
        config=dict(in_channels=2, out_channels=3, n_levels=3, base_features=3, feat_mult=3,
                    convs_per_level=1, final_activation="softmax"),
        input_shape=(1, 12, 8, 16),
        save="weights",
    ),
}


def build_keras_unet(
    *,
    in_channels: int = 1,
    out_channels: int = 1,
    n_levels: int = 5,
    base_features: int = 24,
    feat_mult: int = 2,
    convs_per_level: int = 2,
    final_activation: str = "linear",
    input_shape: tuple[int | None, int | None, int | None] = (None, None, None),
):
    """The SynthSR U-Net as a ``tf.keras`` functional model (channels last, layer names of neuron)."""
    import tensorflow as tf

    layers = tf.keras.layers
    inputs = layers.Input(shape=(*input_shape, in_channels), name="unet_input")
    x = inputs
    skips = []
    for level in range(n_levels):
        features = base_features * feat_mult**level
        for i in range(convs_per_level):
            x = layers.Conv3D(features, 3, padding="same", activation="elu",
                              name=f"unet_conv_downarm_{level}_{i}")(x)
        skips.append(x)
        x = layers.BatchNormalization(axis=-1, name=f"unet_bn_down_{level}")(x)
        if level < n_levels - 1:
            x = layers.MaxPooling3D(pool_size=2, padding="same", name=f"unet_maxpool_{level}")(x)
    for step in range(n_levels - 1):
        level = n_levels - 2 - step
        features = base_features * feat_mult**level
        x = layers.UpSampling3D(size=2, name=f"unet_up_{n_levels + step}")(x)
        x = layers.concatenate([skips[level], x], axis=-1, name=f"unet_merge_{n_levels + step}")
        for i in range(convs_per_level):
            x = layers.Conv3D(features, 3, padding="same", activation="elu",
                              name=f"unet_conv_uparm_{n_levels + step}_{i}")(x)
        x = layers.BatchNormalization(axis=-1, name=f"unet_bn_up_{step}")(x)
    x = layers.Conv3D(out_channels, 1, activation=None, name="unet_likelihood")(x)
    if final_activation == "softmax":
        x = layers.Softmax(axis=-1, name="unet_prediction")(x)
    elif final_activation == "linear":
        x = layers.Activation("linear", name="unet_prediction")(x)
    else:
        raise ValueError(f"final_activation must be 'linear' or 'softmax', got {final_activation!r}")
    return tf.keras.Model(inputs=inputs, outputs=x, name="unet")


def randomize_weights(model, rng: np.random.Generator) -> None:
    """He-scaled kernels, non-zero biases and non-trivial BatchNorm parameters and statistics."""
    import tensorflow as tf

    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv3D):
            kernel, bias = layer.get_weights()
            fan_in = int(np.prod(kernel.shape[:-1]))
            kernel = rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape)
            bias = rng.normal(0.0, 0.1, bias.shape)
            layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        elif isinstance(layer, tf.keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape
            gamma = rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n, p=[0.2, 0.8])
            beta = rng.normal(0.0, 0.3, n)
            mean = rng.normal(0.0, 0.5, n)
            var = rng.uniform(0.3, 2.0, n)
            layer.set_weights([a.astype(np.float32) for a in (gamma, beta, mean, var)])


def write_fixture(name: str, spec: dict, out_dir: Path, seed: int) -> dict:
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    tf.keras.utils.set_random_seed(seed)
    cfg = spec["config"]
    model = build_keras_unet(**cfg)
    randomize_weights(model, rng)
    n, d, h, w = spec["input_shape"]
    x = rng.normal(0.0, 1.0, (n, d, h, w, cfg["in_channels"])).astype(np.float32)
    y = model(x, training=False).numpy().astype(np.float32)
    h5_path = out_dir / f"{name}.h5"
    if spec["save"] == "model":
        model.save(str(h5_path), save_format="h5", include_optimizer=False)
    else:
        model.save_weights(str(h5_path), save_format="h5")
    np.savez_compressed(
        out_dir / f"{name}.npz",
        input_ndhwc=x,
        output_ndhwc=y,
        config=np.array(json.dumps(cfg, sort_keys=True)),
        tensorflow_version=np.array(tf.__version__),
        h5_sha256=np.array(hashlib.sha256(h5_path.read_bytes()).hexdigest()),
    )
    LOGGER.info("%s: output range [%.3f, %.3f], %d bytes of weights", name, y.min(), y.max(), h5_path.stat().st_size)
    return {"name": name, "tensorflow": tf.__version__, **cfg}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/keras_parity")
    parser.add_argument("--seed", type=int, default=20210712)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for offset, (name, spec) in enumerate(FIXTURES.items()):
        write_fixture(name, spec, args.out_dir, args.seed + offset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
