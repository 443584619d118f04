"""Pixel values between the data and the models: uint8 [0, 255] images <-> float [-1, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def images_to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float inputs are taken as already normalized."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def to_uint8(images: jax.Array, *, legacy_offset: bool = False) -> jax.Array:
    """Maps float images in [-1, 1] to uint8 in [0, 255] (any shape, elementwise).

    Default: ``round(127.5 * (x + 1))`` (round half to even) clipped to [0, 255]; this inverts
    ``u / 127.5 - 1`` exactly for every uint8 ``u``.

    ``legacy_offset=True`` is the official FQGAN / LlamaGen / DiT conversion
    ``uint8(clamp(127.5 * x + 128, 0, 255))`` with truncation (spec §5.1), for reproducing
    published numbers. Since ``floor(v + 0.5)`` is round-half-up, the "+128" is not a half-level
    bias: the two modes differ only where ``127.5 * (x + 1)`` is (within float32 rounding) an exact
    half level, by one level (~1e-5 of uniform random inputs). Inside a jitted program XLA may fuse
    the multiply-add into one FMA, so at those ties the result can also differ by one level from
    torch's two separately rounded ops. NaN inputs give unspecified values.
    """
    x = jnp.asarray(images, jnp.float32)
    if legacy_offset:
        # torch's float->uint8 cast truncates; after the clamp all values are >= 0, so floor.
        scaled = jnp.floor(jnp.clip(127.5 * x + 128.0, 0.0, 255.0))
    else:
        scaled = jnp.clip(jnp.round(127.5 * (x + 1.0)), 0.0, 255.0)
    return scaled.astype(jnp.uint8)
