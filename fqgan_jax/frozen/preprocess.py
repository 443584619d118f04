"""The input pipeline the frozen teachers (CLIP, DINOv2) share: nearest resize and normalization.

Spec fqgan.md §3.1: the tokenizer image in [-1, 1] is mapped to [0, 1], resized to the teacher's
input size with `F.interpolate`'s default mode, "nearest", then normalized with the teacher's
mean/std. "nearest" is torch's legacy rule (not "nearest-exact", not `jax.image.resize`'s
half-pixel centres): source index = floor(dst * in / out). 256 -> 224 thus drops every 8th row
and column, and a resize that picks other rows would change every teacher feature, so it is
done here as an integer gather on indices computed exactly as torch computes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of torch's `nearest_idx` (aten/src/ATen/native/UpSample.h), bit for bit.

    torch special-cases equal sizes and exact doubling, and otherwise computes
    min(floor(dst * scale), in - 1) in float32 with scale = float(in) / out; the float32
    rounding is reproduced, since at some dst the exact quotient is an integer.
    """
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def resize_nearest_like_torch(images: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """[B, H, W, C] -> [B, size_h, size_w, C] as `F.interpolate(x, size, mode="nearest")`.

    `size` is an int (square output) or (height, width). The indices are static numpy
    arrays, so under jit this is two gathers; gradients flow to the selected pixels.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    rows = _torch_nearest_indices(images.shape[1], out_h)
    cols = _torch_nearest_indices(images.shape[2], out_w)
    return jnp.take(jnp.take(images, rows, axis=1), cols, axis=2)


def normalize(images01: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(x - mean) / std per channel (last axis), as torchvision's `Normalize`, for images in
    [0, 1]; computed in the images' dtype."""
    dtype = images01.dtype
    return (images01 - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)
