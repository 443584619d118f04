"""Reads Hugging Face checkpoints from disk: no hub, no transformers, torch only for `.bin`.

A checkpoint is given as a snapshot directory (config.json + model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin) or as one weights file with its config.json
beside it. `.safetensors` is parsed here (an 8-byte header length, a JSON header, raw
little-endian buffers), so bfloat16 tensors load too, as float32.
"""

from __future__ import annotations

import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fqgan_jax.pretrained import PretrainedError, listing

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def weights_file(path: str) -> str:
    """The weights file of a snapshot directory, or `path` itself if it is a file."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise PretrainedError(
            f"{path} holds none of {', '.join(_WEIGHT_FILES)}. Point to a Hugging Face snapshot "
            "directory (e.g. the output of `huggingface-cli download openai/clip-vit-large-"
            "patch14`) or to its weights file.")
    raise PretrainedError(f"{path} does not exist.")


def read_config(path: str) -> dict:
    """config.json of the snapshot (`path` may be the directory or its weights file)."""
    directory = path if os.path.isdir(path) else os.path.dirname(weights_file(path))
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise PretrainedError(f"No config.json next to the weights in {directory}; keep the "
                              "snapshot's config.json with its weights.")
    with open(config_path) as f:
        return json.load(f)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: float32 (or integer) array} of every tensor in the checkpoint."""
    path = weights_file(path)
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_safetensors(os.path.join(os.path.dirname(path), shard)))
        return state
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return _read_torch(path)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        (header_size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + header_size])
    except (struct.error, ValueError) as error:
        raise PretrainedError(f"{path} is not a safetensors file ({error}).") from error
    body = memoryview(data)[8 + header_size:]
    state = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise PretrainedError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
        start, end = entry["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=_DTYPES[entry["dtype"]])
        array = array.reshape(entry["shape"])
        state[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) \
            or array.dtype == ml_dtypes.bfloat16 else array.copy()
    return state


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415 (only for .bin/.pth files)
    except ImportError as error:
        raise PretrainedError(
            f"Reading {path} (a PyTorch file) needs torch: pip install torch. Or use the "
            "snapshot's model.safetensors, which needs nothing.") from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {name: value.float().numpy() if value.is_floating_point() else value.numpy()
            for name, value in state.items()}


def square_size(config: dict, name: str) -> int:
    """An int size field of a HF config, which transformers also allows as [n, n]."""
    value = config[name]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config {name}={value}: only square sizes are supported.")
        value = value[0]
    return int(value)


def torch_to_flax(path: tuple, array: np.ndarray) -> np.ndarray:
    """torch layout -> Flax layout for a `kernel`: Linear [out, in] -> [in, out], Conv OIHW ->
    HWIO; other leaves unchanged."""
    if path[-1] == "kernel" and array.ndim == 2:
        return array.T
    if path[-1] == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def torch_shape(path: tuple, flax_shape: tuple) -> tuple:
    """A parameter's shape in the checkpoint's (torch) layout: the inverse of torch_to_flax."""
    if path[-1] == "kernel" and len(flax_shape) == 2:
        return tuple(flax_shape[::-1])
    if path[-1] == "kernel" and len(flax_shape) == 4:
        height, width, in_channels, out_channels = flax_shape
        return (out_channels, in_channels, height, width)
    return tuple(flax_shape)


def fill_params(state: dict[str, np.ndarray], abstract: nnx.State, *, key_to_path, path_to_key,
                what: str, source: str = "The state dict") -> nnx.State:
    """`abstract` (shape-only nnx.Param state) filled from a torch-layout state dict.

    `key_to_path(key)` gives a parameter path, None for a key to skip, or raises ValueError for
    a key it does not know. Every parameter must get exactly one value of its shape; all
    problems (unexpected, doubled, wrong-shape and missing keys, in the checkpoint's names and
    layout) are reported at once in one PretrainedError that starts with `source` and names
    `what` the state dict was meant for.
    """
    expected = dict(nnx.to_flat_state(abstract))
    values, sources, unexpected, doubled, wrong_shape = {}, {}, [], [], []
    for key, array in state.items():
        try:
            path = key_to_path(key)
        except ValueError:
            path = ("?",)
        if path is None:
            continue
        if path not in expected:
            unexpected.append(key)
            continue
        if path in sources:
            doubled.append(f"{sources[path]} and {key}")
            continue
        sources[path] = key
        want = torch_shape(path, expected[path].get_value().shape)
        if tuple(np.shape(array)) != want:
            wrong_shape.append(f"{key} (expected {want}, found {tuple(np.shape(array))})")
            continue
        values[path] = torch_to_flax(path, np.asarray(array, np.float32))
    missing = [path_to_key(path) for path in expected if path not in sources]
    problems = [f"{len(keys)} {what_}: {listing(keys)}" for what_, keys in (
        ("missing", missing), ("unexpected", unexpected), ("doubled", doubled),
        ("with the wrong shape", wrong_shape)) if keys]
    if problems:
        raise PretrainedError(f"{source} does not fit the {what}: {'; '.join(problems)}.")
    return nnx.from_flat_state(
        [(path, leaf.replace(jnp.asarray(values[path], leaf.get_value().dtype)))
         for path, leaf in expected.items()])
