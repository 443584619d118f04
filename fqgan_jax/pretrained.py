"""The weights-file format of the frozen pretrained networks (LPIPS now; DINOv2, CLIP, InceptionV3
later).

Their weights are converted once from the official PyTorch files (`python -m
fqgan_jax.tools.convert`) into one `.npz`, so that training needs neither torch nor the network:
one float32 array per parameter, keyed by its '/'-joined nnx path (`vgg/28/kernel`), and a JSON
`__meta__` entry {"kind": ..., "format_version": 1}. The kind stops a file converted for one
network from being loaded into another whose parameters happen to share some names. Loading
checks every key and shape against the model before anything compiles, and every failure is a
`PretrainedError` that names the file, what is wrong, and how to make a good one.
"""

from __future__ import annotations

import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def torch_layout_to_flax(array: np.ndarray) -> np.ndarray:
    """A torch weight in Flax's layout: conv OIHW -> HWIO, linear [out, in] -> [in, out]."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array.T if array.ndim == 2 else array


def map_state_dict(state: dict, key_to_path) -> tuple[dict[tuple, tuple[str, np.ndarray]],
                                                       list[str]]:
    """({our path: (torch key, float32 array)}, unknown keys) of a torch state dict, through a
    network's `official_key_to_path` (None: not used, dropped; ValueError: unknown). A path that
    two keys map to is an error naming both."""
    mapped, unknown = {}, []
    for key, array in state.items():
        try:
            path = key_to_path(key)
        except ValueError:
            unknown.append(key)
            continue
        if path is None:
            continue
        if path in mapped:
            raise PretrainedError(f"Two arrays for {path_key(path)}: {mapped[path][0]} and {key}.")
        mapped[path] = (key, np.asarray(array, np.float32))
    return mapped, unknown


def _flat(state: nnx.State) -> dict[str, object]:
    return {path_key(path): leaf for path, leaf in nnx.to_flat_state(state)}


def _value(leaf):
    """The array (or ShapeDtypeStruct) of a state leaf, whether a Variable or a bare value."""
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def save(path: str, params: nnx.State, *, kind: str) -> None:
    """Writes `params` as float32 arrays to `path`, atomically: a crash leaves no partial file."""
    arrays = {key: np.asarray(jax.device_get(_value(leaf)), np.float32)
              for key, leaf in _flat(params).items()}
    arrays[META_KEY] = np.array(json.dumps({"kind": kind, "format_version": FORMAT_VERSION}))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Beside the target (os.replace is atomic within one filesystem), with the umask's mode.
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


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
