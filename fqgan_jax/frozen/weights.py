"""Weights of the frozen pretrained networks (LPIPS, the FID InceptionV3, the CLIP and DINOv2
teachers): every way they reach disk or memory goes through this one module.

The `.npz` format. LPIPS and the FID Inception are converted once from their official PyTorch
files (`python -m fqgan_jax.tools.convert`) into one `.npz`, so that training needs neither torch
nor the original package: one float32 array per parameter, keyed by its '/'-joined nnx path
(`vgg/28/kernel`), and a JSON `__meta__` entry {"kind": ..., "format_version": 1}. The kind stops
a file converted for one network from being loaded into another whose parameters happen to share
some names. `load` checks every key and shape against the model before anything compiles.

Official checkpoints, read without transformers or a hub: a PyTorch `.pth`/`.bin` state dict
(`read_torch_state_dict`) or training checkpoint (`read_torch_checkpoint`: FQGAN's {"model",
"discriminator", "args", ...}), a `.safetensors` file (parsed here: an 8-byte header length, a
JSON header, raw little-endian buffers, so bfloat16 loads too), and Hugging Face snapshot
directories (config.json + model.safetensors, a sharded index, or pytorch_model.bin), from which
the teachers load directly. Both PyTorch readers go through `_torch_load`, the one torch.load of
the package: weights_only=True, so unpickling builds tensors and plain containers only, plus an
allow-list of exactly the objects a training checkpoint needs (argparse.Namespace); a file that
needs anything else is refused with a message that says how to re-save it.

The torch -> Flax fill. `fill_params` puts a torch state dict into a network's shape-only
parameters through the network's own key table, transposing kernels (`torch_to_flax`), and reports
every missing, unexpected, doubled and wrong-shape key at once.

Every failure is a `PretrainedError` that names the file, what is wrong, and how to get a good one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fqgan_jax.atomic_file import atomic_write

FORMAT_VERSION = 1
META_KEY = "__meta__"
MAX_LISTED = 5  # offending keys named in an error message; the rest are counted


class PretrainedError(ValueError):
    """A pretrained-weights file that is missing or does not fit the network."""


def default_path(filename: str) -> str:
    """$FQGAN_JAX_WEIGHTS_DIR/filename, else ~/.cache/fqgan_jax/filename."""
    directory = os.environ.get("FQGAN_JAX_WEIGHTS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fqgan_jax")
    return os.path.join(directory, filename)


def path_key(path: tuple) -> str:
    """("vgg", 28, "kernel") -> "vgg/28/kernel", the npz key of one parameter."""
    return "/".join(str(part) for part in path)


def listing(items: list[str]) -> str:
    """The first few items, then how many more: keeps messages short for a wholly wrong file."""
    shown = ", ".join(items[:MAX_LISTED])
    rest = len(items) - MAX_LISTED
    return f"{shown} and {rest} more" if rest > 0 else shown


# The .npz format.


def _flat(state: nnx.State) -> dict[str, object]:
    return {path_key(path): leaf for path, leaf in nnx.to_flat_state(state)}


def _value(leaf):
    """The array (or ShapeDtypeStruct) of a state leaf, whether a Variable or a bare value."""
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def save(path: str, params: nnx.State, *, kind: str) -> None:
    """Writes `params` as float32 arrays to `path`, creating its folder."""
    arrays = {key: np.asarray(jax.device_get(_value(leaf)), np.float32)
              for key, leaf in _flat(params).items()}
    arrays[META_KEY] = np.array(json.dumps({"kind": kind, "format_version": FORMAT_VERSION}))
    # Atomic: an interrupted conversion leaves no truncated file for training to trip over.
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load(path: str, abstract: nnx.State, *, kind: str, how_to_make: str) -> nnx.State:
    """`abstract` (from nnx.eval_shape + nnx.split) filled with the arrays of `path`, each cast to
    its abstract leaf's dtype. Raises PretrainedError unless the file has exactly its keys and
    shapes and was written for `kind`; `how_to_make` (a sentence) ends every message."""
    if not os.path.isfile(path):
        raise PretrainedError(f"The {kind} weights file {path} does not exist. {how_to_make}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise PretrainedError(f"{path} is not a readable .npz file ({error}); expected {kind} "
                              f"weights. {how_to_make}") from error
    _check_meta(path, arrays.pop(META_KEY, None), kind, how_to_make)
    expected = _flat(abstract)
    _check_keys_and_shapes(path, arrays, {key: _value(leaf).shape
                                          for key, leaf in expected.items()}, kind, how_to_make)
    filled = []
    for path_parts, leaf in nnx.to_flat_state(abstract):
        array = jnp.asarray(arrays[path_key(path_parts)], _value(leaf).dtype)
        filled.append((path_parts, leaf.replace(array) if isinstance(leaf, nnx.Variable)
                       else array))
    return nnx.from_flat_state(filled)


def _check_meta(path: str, meta: np.ndarray | None, kind: str, how_to_make: str) -> None:
    if meta is None:
        raise PretrainedError(f"{path} is not an fqgan_jax weights file (it has no "
                              f"{META_KEY} entry); expected {kind} weights. {how_to_make}")
    try:
        text = meta.item()
        meta = json.loads(text.decode() if isinstance(text, bytes) else text)
        found_kind, version = meta["kind"], meta["format_version"]
    except (ValueError, KeyError, TypeError) as error:
        raise PretrainedError(f"{path} has an unreadable {META_KEY} entry ({error!r}). "
                              f"{how_to_make}") from error
    if found_kind != kind:
        raise PretrainedError(f"{path} holds {found_kind!r} weights, but {kind!r} weights are "
                              f"needed here. {how_to_make}")
    if version != FORMAT_VERSION:
        raise PretrainedError(f"{path} has format_version {version}; this fqgan_jax reads "
                              f"version {FORMAT_VERSION}. {how_to_make}")


def _check_keys_and_shapes(path: str, arrays: dict, shapes: dict, kind: str,
                           how_to_make: str) -> None:
    missing = [key for key in shapes if key not in arrays]
    unexpected = sorted(arrays.keys() - shapes.keys())
    wrong = [f"{key} (expected {tuple(shape)}, found {arrays[key].shape})"
             for key, shape in shapes.items()
             if key in arrays and arrays[key].shape != tuple(shape)]
    problems = []
    for name, keys in (("missing", missing), ("unexpected", unexpected),
                       ("with the wrong shape", wrong)):
        if keys:
            problems.append(f"{len(keys)} {'key' if len(keys) == 1 else 'keys'} {name}: "
                            f"{listing(keys)}")
    if problems:
        raise PretrainedError(f"{path} does not fit the {kind} model: {'; '.join(problems)}. "
                              f"Was it converted by another version of fqgan_jax? "
                              f"{how_to_make}")


# Official checkpoints: PyTorch state dicts, safetensors, Hugging Face snapshots.

_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_}


# What a training checkpoint may hold besides tensors and plain containers (dicts, lists, numbers,
# strings): the argparse Namespace of its run, which FQGAN and LlamaGen save as "args". Nothing
# else: unpickling any other global can run code (weights_only=True refuses it).
TRAINING_CHECKPOINT_GLOBALS = (argparse.Namespace,)


def read_torch_state_dict(path: str, *, flag: str = "") -> dict[str, np.ndarray]:
    """The arrays of a PyTorch state-dict file (.pth, .bin): floating tensors as float32, others
    (e.g. BatchNorm's num_batches_tracked) as they are. A training checkpoint's
    {"state_dict": ...} wrapper is unwrapped. `flag` (e.g. "--vgg16") starts every error message,
    so that a command-line user knows which argument to fix."""
    where = f"{flag}: " if flag else ""
    path = os.path.expanduser(path)  # `--vgg16=~/x.pth`: the shell leaves that ~ alone
    state = _torch_load(path, where)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not _is_tensor_dict(state):
        raise PretrainedError(
            f"{where}{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return _tensors_to_numpy(state)


def read_torch_checkpoint(path: str, *, flag: str = "") -> dict[str, object]:
    """The top-level dict of a PyTorch training checkpoint, e.g. FQGAN's {"model", "ema",
    "discriminator", "optimizer", "steps", "args"}, or a bare state dict. Every value that is a
    state dict of tensors comes back as {name: numpy array} (as `read_torch_state_dict`), a
    tensor as an array; other values (an optimizer state, the args Namespace) as loaded.

    Unpickled with weights_only=True plus exactly `TRAINING_CHECKPOINT_GLOBALS`: a file that
    needs any other Python object is refused with a PretrainedError that says how to re-save it.
    """
    where = f"{flag}: " if flag else ""
    path = os.path.expanduser(path)
    checkpoint = _torch_load(path, where, allowed_globals=TRAINING_CHECKPOINT_GLOBALS)
    if not isinstance(checkpoint, dict):
        raise PretrainedError(f"{where}{path} holds a {type(checkpoint).__name__}, not a "
                              "checkpoint dict or a state dict of tensors.")
    if _is_tensor_dict(checkpoint):
        return _tensors_to_numpy(checkpoint)
    return {key: _tensors_to_numpy(value) if _is_tensor_dict(value)
            else _to_numpy(value) if _is_tensor(value) else value
            for key, value in checkpoint.items()}


def _torch_load(path: str, where: str, allowed_globals: tuple = ()) -> object:
    """The one torch.load of fqgan_jax: weights_only=True (a .pth is a pickle, and unpickling an
    arbitrary one can run code), with `allowed_globals` the only Python objects let through."""
    if not os.path.isfile(path):
        raise PretrainedError(f"{where}{path} does not exist.")
    try:
        import torch  # noqa: PLC0415 (only PyTorch files need torch; training does not)
    except ImportError as error:
        raise PretrainedError(
            f"{where}reading {path}, a PyTorch file, needs torch: pip install torch. (Only "
            "PyTorch files need it: a converted .npz or a Hugging Face snapshot's "
            "model.safetensors loads without torch.)") from error
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises many kinds for a bad file)
        raise _load_error(path, where, error, allowed_globals) from error


def _load_error(path: str, where: str, error: Exception, allowed: tuple) -> PretrainedError:
    """What torch.load's failure means for the user: a refused object, a broken file, or other."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        allowed_names = "".join(f", {cls.__module__}.{cls.__qualname__}" for cls in allowed)
        return PretrainedError(
            f"{where}{path} was refused for safety: unpickling it needs the Python object "
            f"{refused.group(1)}, and a pickle's objects can run code when loaded (only "
            f"tensors, plain containers{allowed_names} are allowed). If you trust the file, "
            "re-save just its weights, e.g. python -c \"import torch; c = torch.load('IN', "
            "weights_only=False); torch.save({'model': c['model']}, 'OUT')\", and use OUT.")
    # Only the first sentence: torch's messages run to a page of advice.
    reason = re.split(r"(?<=\.)\s", (text.splitlines() or [""])[0])[0].rstrip(".")[:200]
    if isinstance(error, EOFError) or re.search(r"zip archive|EOF|corrupt", text):
        return PretrainedError(
            f"{where}{path} is truncated or corrupt ({type(error).__name__}: {reason}; "
            f"{os.path.getsize(path):,} bytes). Download or copy it again.")
    return PretrainedError(
        f"{where}PyTorch cannot read {path} ({type(error).__name__}: {reason}); is it a "
        "PyTorch state dict of tensors (.pth/.bin)?")


def _is_tensor(value) -> bool:
    import torch  # noqa: PLC0415 (already imported by _torch_load, which alone calls this)

    return torch.is_tensor(value)


def _is_tensor_dict(value) -> bool:
    return isinstance(value, dict) and all(_is_tensor(v) for v in value.values())


def _to_numpy(tensor) -> np.ndarray:
    """A floating tensor as float32 (bfloat16 has no numpy dtype), others as they are."""
    return (tensor.detach().float() if tensor.is_floating_point() else tensor.detach()).numpy()


def _tensors_to_numpy(state: dict) -> dict[str, np.ndarray]:
    return {key: _to_numpy(value) for key, value in state.items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The arrays of a .safetensors file: floating ones (bfloat16 included) as float32."""
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
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise PretrainedError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
        start, end = entry["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
        array = array.reshape(entry["shape"])
        # bfloat16 is not a numpy floating type, hence its own test; copy() frees the file buffer.
        state[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) \
            or array.dtype == ml_dtypes.bfloat16 else array.copy()
    return state


def weights_file(path: str) -> str:
    """The weights file of a Hugging Face snapshot directory, or `path` itself if it is a file."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in _HF_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise PretrainedError(
            f"{path} holds none of {', '.join(_HF_WEIGHT_FILES)}. Point to a Hugging Face "
            "snapshot directory (e.g. the output of `huggingface-cli download openai/clip-vit-"
            "large-patch14`) or to its weights file.")
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
    """{name: float32 (or integer) array} of every tensor in a snapshot or weights file."""
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
    return read_torch_state_dict(path)


def square_size(config: dict, name: str) -> int:
    """An int size field of a HF config, which transformers also allows as [n, n]."""
    value = config[name]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"config {name}={value}: only square sizes are supported.")
        value = value[0]
    return int(value)


# The torch -> Flax fill.


def torch_to_flax(path: tuple, array: np.ndarray) -> np.ndarray:
    """torch layout -> Flax layout for a `kernel`: Linear [out, in] -> [in, out], Conv OIHW ->
    HWIO; other leaves unchanged. By path, not by rank alone: a 2-D embedding table is stored
    the same way in both."""
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
                what: str, source: str = "The state dict", hint: str = "") -> nnx.State:
    """`abstract` (shape-only nnx.Param state) filled from a torch-layout state dict.

    `key_to_path(key)` gives a parameter path, None for a key to skip, or raises ValueError for
    a key it does not know; `path_to_key` is its inverse, to name missing parameters as the
    checkpoint would. Every parameter must get exactly one value of its shape. All problems
    (missing, unexpected, doubled and wrong-shape keys, in the checkpoint's names and layout)
    are reported at once, in one PretrainedError: "`source` does not fit the `what`: ... `hint`".
    """
    expected = dict(nnx.to_flat_state(abstract))
    values, claimed, problems = _sort_keys(state, expected, key_to_path)
    problems = {"missing": [path_to_key(path) for path in expected if path not in claimed],
                **problems}
    report = [f"{len(keys)} {name}: {listing(keys)}" for name, keys in problems.items() if keys]
    if report:
        raise PretrainedError(f"{source} does not fit the {what}: {'; '.join(report)}."
                              + (f" {hint}" if hint else ""))
    return nnx.from_flat_state(
        [(path, leaf.replace(jnp.asarray(values[path], _value(leaf).dtype)))
         for path, leaf in expected.items()])


def _sort_keys(state: dict, expected: dict, key_to_path) -> tuple[dict, dict, dict]:
    """Sorts each key of `state` into a value for its parameter (in Flax layout), skipped, or a
    problem. Returns ({path: array}, {path: the key that claimed it}, {problem: [keys]})."""
    values, claimed = {}, {}
    problems = {"unexpected": [], "doubled": [], "with the wrong shape": []}
    for key, array in state.items():
        try:
            path = key_to_path(key)
        except ValueError:  # not a key of this network at all
            problems["unexpected"].append(key)
            continue
        if path is None:
            continue
        if path not in expected:  # a key of the network, but of a part this build lacks
            problems["unexpected"].append(key)
        elif path in claimed:  # e.g. lpips's lin3.model.0 and lin3.model.1: which one is meant?
            problems["doubled"].append(f"{claimed[path]} and {key}")
        else:
            # Claimed even if misshapen, so a wrong-shape key is not also reported missing.
            claimed[path] = key
            want = torch_shape(path, _value(expected[path]).shape)
            if tuple(np.shape(array)) != want:
                problems["with the wrong shape"].append(
                    f"{key} (expected {want}, found {tuple(np.shape(array))})")
            else:
                values[path] = torch_to_flax(path, np.asarray(array, np.float32))
    return values, claimed, problems
