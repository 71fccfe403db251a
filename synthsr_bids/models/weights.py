"""Read SynthSR weights: legacy Keras ``.h5`` files and our own ``.safetensors`` files.

Keras 2 stores every layer's weights as HDF5 datasets ``<layer>/<layer>/<param>:0`` (kernel,
bias, gamma, beta, moving_mean, moving_variance). A file written by ``model.save`` nests them
under ``model_weights/``; one written by ``model.save_weights`` has them at the root. Both are
read here with h5py, by layer name, never by executing anything stored in the file.

A converted network is stored as safetensors with its :class:`UNetConfig` as JSON in the
metadata. :func:`load_weights` converts a ``.h5`` file once and caches the result under
``<cache_dir>/<sha256 of the .h5>.safetensors``.

Model files are untrusted input: nothing is unpickled, shapes are checked against the
configuration inferred from the file, and values must be finite.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor

from synthsr_bids import __version__
from synthsr_bids.hashing import sha256_file
from synthsr_bids.models.network import SynthSRUNet, UNetConfig

__all__ = [
    "STATUS_METADATA",
    "PREVIEW_STATUS",
    "SHARPEN_METADATA",
    "recommended_sharpening",
    "sharpening_metadata",
    "WeightFileError",
    "LoadedNetwork",
    "read_keras_h5",
    "save_safetensors",
    "load_weights",
    "keras_name_map",
    "sha256_file",
]

LOGGER = logging.getLogger(__name__)

#: Metadata keys written by :func:`save_safetensors` itself.
FORMAT_KEY = "synthsr_bids.format"
FORMAT_VALUE = "synthsr-unet/1"
CONFIG_KEY = "synthsr_bids.unet_config"
_RESERVED = (FORMAT_KEY, CONFIG_KEY)
#: Free metadata key (and value) marking a model as a preview, i.e. an early training
#: checkpoint: every output made with it says so (see ``python -m synthsr_bids.training ship``).
STATUS_METADATA = "synthsr_bids.status"
PREVIEW_STATUS = "preview"
#: Free metadata key: whether this model's outputs should be unsharp-masked ("true"/"false").
#: Written by ``python -m synthsr_bids.training ship`` ([regression].output_sharpening); files
#: without it (the official Keras models) get mri_synthsr's post-processing, i.e. sharpening.
SHARPEN_METADATA = "synthsr_bids.sharpen"
_BOOLEAN_TEXT = {"true": True, "false": False}

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_BN_PARAMS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
_CONV_PARAMS = {"weight": "kernel", "bias": "bias"}


class WeightFileError(Exception):
    """A weight file is missing, unreadable or does not hold the expected network."""

    def __init__(self, path: os.PathLike[str] | str, message: str) -> None:
        self.path = Path(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


@dataclass(frozen=True)
class LoadedNetwork:
    """A network ready for inference (eval mode, ``channels_last_3d``, on the CPU)."""

    model: SynthSRUNet
    config: UNetConfig
    source_sha256: str
    metadata: dict[str, str]

    @property
    def sharpen(self) -> bool:
        """Whether the model's outputs should be sharpened (see :func:`recommended_sharpening`)."""
        return recommended_sharpening(self.metadata)


def sharpening_metadata(sharpen: bool) -> dict[str, str]:
    """The metadata entry that makes a weight file ask for (or against) sharpening; read back by
    :func:`recommended_sharpening`."""
    return {SHARPEN_METADATA: "true" if sharpen else "false"}


def recommended_sharpening(metadata: Mapping[str, str]) -> bool:
    """The post-processing a weight file asks for: its ``synthsr_bids.sharpen`` metadata, else True.

    Raises:
        ValueError: the value is neither ``true`` nor ``false``.
    """
    text = metadata.get(SHARPEN_METADATA)
    if text is None:
        return True
    try:
        return _BOOLEAN_TEXT[text.strip().lower()]
    except KeyError:
        raise ValueError(f"metadata {SHARPEN_METADATA!r} must be 'true' or 'false', got {text!r}") from None


# ---------------------------------------------------------------------------- Keras naming
def keras_name_map(config: UNetConfig) -> dict[str, tuple[str, str]]:
    """Map every :class:`SynthSRUNet` state-dict key to its Keras ``(layer name, weight name)``.

    ``num_batches_tracked`` buffers have no Keras counterpart and are not listed.
    """
    names: dict[str, tuple[str, str]] = {}

    def block(prefix: str, conv_layer: str, norm_layer: str) -> None:
        for i in range(config.convs_per_level):
            for param, keras_param in _CONV_PARAMS.items():
                names[f"{prefix}.convs.{i}.{param}"] = (f"{conv_layer}_{i}", keras_param)
        for param, keras_param in _BN_PARAMS.items():
            names[f"{prefix}.norm.{param}"] = (norm_layer, keras_param)

    n = config.n_levels
    for level in range(n):
        block(f"encoder.{level}", f"unet_conv_downarm_{level}", f"unet_bn_down_{level}")
    for step in range(n - 1):
        block(f"decoder.{step}", f"unet_conv_uparm_{n + step}", f"unet_bn_up_{step}")
    for param, keras_param in _CONV_PARAMS.items():
        names[f"head.{param}"] = ("unet_likelihood", keras_param)
    return names


def _torch_shape_to_keras(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Conv kernels are (out, in, kd, kh, kw) in torch and (kd, kh, kw, in, out) in Keras."""
    if len(shape) == 5:
        return (shape[2], shape[3], shape[4], shape[1], shape[0])
    return shape


class _H5Index:
    """Datasets of a Keras weight group, found by (layer name, weight name)."""

    def __init__(self, group: h5py.Group) -> None:
        self._group = group
        self._primary: dict[tuple[str, str], list[str]] = {}
        self._alias: dict[tuple[str, str], list[str]] = {}
        group.visititems(self._visit)

    def _visit(self, name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split("/")
        if len(parts) < 2:
            return
        param = parts[-1].split(":")[0]
        # ``layer/layer/kernel:0`` (plain), ``model/layer/kernel:0`` (nested model).
        self._primary.setdefault((parts[-2], param), []).append(name)
        if len(parts) == 3 and parts[0] != parts[-2]:
            # ``layer/layer_1/kernel:0``: Keras names the group after the layer.
            self._alias.setdefault((parts[0], param), []).append(name)

    def has(self, layer: str, param: str) -> bool:
        return (layer, param) in self._primary or (layer, param) in self._alias

    def locate(self, layer: str, param: str) -> list[str]:
        return self._primary.get((layer, param)) or self._alias.get((layer, param)) or []

    def layers(self) -> set[str]:
        return {layer for layer, _ in self._primary} | {layer for layer, _ in self._alias}

    def shape(self, path: os.PathLike[str] | str, layer: str, param: str) -> tuple[int, ...]:
        return tuple(self._group[self._single(path, layer, param)].shape)

    def read(self, path: os.PathLike[str] | str, layer: str, param: str) -> np.ndarray:
        return np.asarray(self._group[self._single(path, layer, param)][()])

    def _single(self, path: os.PathLike[str] | str, layer: str, param: str) -> str:
        found = self.locate(layer, param)
        if not found:
            raise WeightFileError(path, f"no weight '{param}' for layer '{layer}'")
        if len(found) > 1:
            raise WeightFileError(
                path, f"weight '{param}' of layer '{layer}' is ambiguous: found at {sorted(found)}"
            )
        return found[0]


def _open_hdf5(path: Path) -> h5py.File:
    if not path.is_file():
        raise WeightFileError(path, "file does not exist")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:  # pragma: no cover - unreadable file (permissions)
        raise WeightFileError(path, f"cannot be read ({exc})") from exc
    if not is_hdf5:
        raise WeightFileError(
            path, "is not an HDF5 file; expected a Keras .h5 model/weights file (e.g. SynthSR_v10_210712.h5)"
        )
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise WeightFileError(path, f"is a damaged or truncated HDF5 file ({exc}); download it again") from exc


def _final_activation_from_model_config(handle: h5py.File) -> str | None:
    """``linear``/``softmax`` from the ``unet_prediction`` layer of a full-model file, if any."""
    raw = handle.attrs.get("model_config")
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        tree = json.loads(raw)
    except (TypeError, ValueError):
        return None
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            config = node.get("config")
            if isinstance(config, dict) and config.get("name") == "unet_prediction":
                kind = node.get("class_name")
                if kind == "Activation":
                    activation = config.get("activation")
                    return activation if activation in ("linear", "softmax") else None
                if kind in ("Softmax", "Lambda"):
                    # neuron's unet uses a Lambda softmax and Activation('linear') otherwise.
                    return "softmax"
                return None
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _infer_config(path: Path, index: _H5Index, final_activation: str | None, from_file: str | None) -> UNetConfig:
    first = ("unet_conv_downarm_0_0", "kernel")
    if not index.has(*first):
        found = sorted(index.layers())
        shown = ", ".join(found[:8]) + (" ..." if len(found) > 8 else "")
        raise WeightFileError(
            path,
            "no layer 'unet_conv_downarm_0_0' with a kernel: this is not a SynthSR/SynthSeg U-Net weight "
            f"file (layers found: {shown or 'none'})",
        )
    n_levels = 0
    while index.has(f"unet_conv_downarm_{n_levels}_0", "kernel"):
        n_levels += 1
    convs = 0
    while index.has(f"unet_conv_downarm_0_{convs}", "kernel"):
        convs += 1
    kernel = index.shape(path, *first)
    if len(kernel) != 5 or kernel[:3] != (3, 3, 3):
        raise WeightFileError(
            path, f"layer 'unet_conv_downarm_0_0' has a kernel of shape {kernel}, expected (3, 3, 3, C_in, F)"
        )
    in_channels, base = kernel[3], kernel[4]
    feat_mult = UNetConfig.feat_mult
    if n_levels > 1:
        second = index.shape(path, "unet_conv_downarm_1_0", "kernel")
        if len(second) != 5 or second[4] % base:
            raise WeightFileError(
                path,
                f"layer 'unet_conv_downarm_1_0' has a kernel of shape {second}: its feature count is not a "
                f"multiple of the {base} features of level 0",
            )
        feat_mult = second[4] // base
    if not index.has("unet_likelihood", "kernel"):
        raise WeightFileError(path, "no layer 'unet_likelihood' (the output convolution) in the file")
    head = index.shape(path, "unet_likelihood", "kernel")
    if len(head) != 5:
        raise WeightFileError(path, f"layer 'unet_likelihood' has a kernel of shape {head}, expected 5 dimensions")
    out_channels = head[4]
    activation = final_activation or from_file or ("linear" if out_channels == 1 else "softmax")
    if final_activation is None and from_file is None:
        LOGGER.info(
            "%s: no model configuration stored; assuming a %s output for %d output channel(s)",
            path, activation, out_channels,
        )
    try:
        return UNetConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            n_levels=n_levels,
            base_features=base,
            feat_mult=feat_mult,
            convs_per_level=convs,
            final_activation=activation,
        )
    except ValueError as exc:
        raise WeightFileError(path, f"inconsistent network configuration: {exc}") from exc


def read_keras_h5(path: Path, *, final_activation: str | None = None) -> tuple[UNetConfig, dict[str, Tensor]]:
    """Read a Keras 2 ``.h5`` SynthSR/SynthSeg U-Net into a :class:`SynthSRUNet` state dict.

    The configuration (levels, features, multiplier, convolutions per level, channels) is
    inferred from the layer shapes. The output activation cannot be seen in the weights: it is
    read from the stored model configuration when there is one, else taken as ``linear`` for
    one output channel and ``softmax`` otherwise; ``final_activation`` overrides both.

    Every layer the network needs must be present with the right shape; other groups (for
    example a second network stored in the same file) are ignored.

    Raises:
        WeightFileError: the file is missing, not HDF5, damaged, lacks a layer, or a shape or
            value does not fit.
    """
    path = Path(path)
    with _open_hdf5(path) as handle:
        try:
            root = handle["model_weights"] if "model_weights" in handle else handle
            if not isinstance(root, h5py.Group):
                raise WeightFileError(path, "'model_weights' is not an HDF5 group")
            index = _H5Index(root)
            config = _infer_config(path, index, final_activation, _final_activation_from_model_config(handle))
            with torch.device("meta"):
                expected = SynthSRUNet(config).state_dict()
            names = keras_name_map(config)
            missing: dict[str, list[str]] = {}
            for layer, param in names.values():
                if not index.has(layer, param):
                    missing.setdefault(layer, []).append(param)
            if missing:
                wanted: dict[str, list[str]] = {}
                for layer, param in names.values():
                    wanted.setdefault(layer, []).append(param)
                items = [
                    layer if len(params) == len(wanted[layer]) else f"{layer} (weights {', '.join(params)})"
                    for layer, params in sorted(missing.items())
                ]
                shown = ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
                raise WeightFileError(path, f"missing layer(s) {shown} for a U-Net with {config}")
            state: dict[str, Tensor] = {}
            for key, (layer, param) in names.items():
                want = _torch_shape_to_keras(tuple(expected[key].shape))
                got = index.shape(path, layer, param)
                if got != want:
                    raise WeightFileError(
                        path,
                        f"layer '{layer}' weight '{param}' has shape {got}, expected {want} for a U-Net with {config}",
                    )
                value = index.read(path, layer, param)
                if not np.issubdtype(value.dtype, np.floating):
                    raise WeightFileError(path, f"layer '{layer}' weight '{param}' has non-float dtype {value.dtype}")
                if not np.isfinite(value).all():
                    raise WeightFileError(path, f"layer '{layer}' weight '{param}' contains NaN or infinite values")
                if value.ndim == 5:
                    value = value.transpose(4, 3, 0, 1, 2)
                state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        except (OSError, KeyError, RuntimeError) as exc:
            raise WeightFileError(path, f"could not read the weights ({exc}); the file may be damaged") from exc
    negative = [key for key in state if key.endswith("running_var") and bool((state[key] < 0).any())]
    if negative:
        layer, _ = keras_name_map(config)[negative[0]]
        raise WeightFileError(path, f"layer '{layer}' has a negative BatchNorm moving variance")
    LOGGER.debug("%s: read %d tensors for %s", path, len(state), config)
    return config, state


# ---------------------------------------------------------------------------- safetensors
def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
        if key in _RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved for synthsr-bids")
        out[key] = value
    return out


def _default_file_mode() -> int:
    """``0o666`` minus the process umask: the mode ``open(path, "w")`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(
    model: SynthSRUNet,
    path: Path,
    metadata: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` (its config in the metadata) to ``path`` atomically (temp file + rename).

    ``dtype=torch.float16`` halves the file; :func:`load_weights` casts back to float32.
    ``num_batches_tracked`` counters are not stored.
    """
    path = Path(path)
    meta = _check_metadata(metadata)
    meta[FORMAT_KEY] = FORMAT_VALUE
    meta[CONFIG_KEY] = json.dumps(model.config.to_dict(), sort_keys=True)
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # safetensors creates its file owner-only (0600); a model is for every user of the
        # installation (e.g. a container run under another UID): the usual mode under the umask.
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_safetensors(path: Path) -> tuple[SynthSRUNet, dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise WeightFileError(path, f"is not a valid safetensors file ({exc})") from exc
    if CONFIG_KEY not in metadata:
        raise WeightFileError(
            path, f"has no '{CONFIG_KEY}' metadata: it was not written by synthsr-bids (convert the .h5 file instead)"
        )
    try:
        config = UNetConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (ValueError, TypeError) as exc:
        raise WeightFileError(path, f"invalid '{CONFIG_KEY}' metadata ({exc})") from exc
    state: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise WeightFileError(path, f"tensor {key!r} has non-float dtype {value.dtype}")
        value = value.to(torch.float32)
        if not bool(torch.isfinite(value).all()):
            raise WeightFileError(path, f"tensor {key!r} contains NaN or infinite values")
        state[key] = value
    model = SynthSRUNet(config)
    try:
        model.load_for_inference(state)
    except (KeyError, ValueError) as exc:
        raise WeightFileError(path, f"tensors do not fit the stored configuration: {exc}") from exc
    try:
        recommended_sharpening(metadata)
    except ValueError as exc:
        raise WeightFileError(path, f"{exc}; export the file again with `python -m synthsr_bids.training export` "
                                    "([regression].output_sharpening) or fix the key") from exc
    return model, {k: v for k, v in metadata.items() if k not in _RESERVED}


# ---------------------------------------------------------------------------- loading
def _sniff(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:8] == _HDF5_SIGNATURE or h5py.is_hdf5(path):
        return "h5"
    size = path.stat().st_size
    if len(head) == 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    raise WeightFileError(
        path, "is neither a Keras .h5 (HDF5) file nor a .safetensors file; check that the download is complete"
    )


def load_weights(path: Path, *, cache_dir: Path | None = None) -> LoadedNetwork:
    """Load a SynthSR network from a Keras ``.h5`` or a synthsr-bids ``.safetensors`` file.

    The format is recognised from the content, not the suffix. A ``.h5`` file is converted;
    with ``cache_dir`` the conversion is saved as ``<cache_dir>/<sha256>.safetensors`` and
    reused by later calls (an unreadable cache entry is converted again). The returned model
    is on the CPU, in eval mode and ``channels_last_3d``; float16 files are cast to float32.

    Raises:
        WeightFileError: the file (or its content) is not usable.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(path, "file does not exist")
    kind = _sniff(path)
    source_sha256 = sha256_file(path)
    if kind == "safetensors":
        model, metadata = _read_safetensors(path)
        return LoadedNetwork(model=model, config=model.config, source_sha256=source_sha256, metadata=metadata)

    cached = Path(cache_dir) / f"{source_sha256}.safetensors" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            model, metadata = _read_safetensors(cached)
            if metadata.get("source_sha256") != source_sha256:
                raise WeightFileError(cached, "its source_sha256 metadata does not match the file name")
        except WeightFileError as exc:
            LOGGER.warning("ignoring the cached conversion (%s); converting %s again", exc, path)
        else:
            LOGGER.debug("%s: using the cached conversion %s", path, cached)
            return LoadedNetwork(model=model, config=model.config, source_sha256=source_sha256, metadata=metadata)

    config, state = read_keras_h5(path)
    model = SynthSRUNet(config).load_for_inference(state)
    metadata = {
        "source_sha256": source_sha256,
        "source_filename": path.name,
        "source_format": "keras-h5",
        "converted_by": f"synthsr-bids {__version__}",
    }
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(model, cached, metadata)
        LOGGER.info("%s: converted to %s", path, cached)
    return LoadedNetwork(model=model, config=config, source_sha256=source_sha256, metadata=metadata)
