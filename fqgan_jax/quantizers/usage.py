"""Codebook-usage statistics (spec large_codebooks.md §E.5.1: report usage, perplexity and
concentration), for any quantizer whose codes are integers [..., k] in [0, K)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _row_weights(mask: jax.Array | None, batch_shape: tuple[int, ...]) -> jax.Array:
    """int32 weights of shape batch_shape from a mask over a leading prefix of it (None: all 1)."""
    if mask is None:
        return jnp.ones(batch_shape, jnp.int32)
    mask_shape = jnp.shape(mask)
    if mask_shape != batch_shape[: len(mask_shape)]:
        raise ValueError(
            f"mask shape {mask_shape} must be a leading part of the indices batch shape "
            f"{batch_shape}"
        )
    trailing_axes = (1,) * (len(batch_shape) - len(mask_shape))
    return jnp.broadcast_to(jnp.reshape(mask, mask_shape + trailing_axes), batch_shape).astype(
        jnp.int32
    )


def code_histogram(
    indices: jax.Array, codebook_size: int, *, mask: jax.Array | None = None
) -> jax.Array:
    """Counts code uses per sub-codebook: indices int [..., k] -> int32 [k, codebook_size].

    ``mask`` (bool) drops padded rows: either the full batch shape of ``indices`` (``[...]``) or a
    leading part of it, e.g. a per-image mask [B] for indices [B, h, w, k]. Out-of-range indices
    are dropped (scatter mode "drop").
    """
    indices = jnp.asarray(indices)
    num_codebooks = indices.shape[-1]
    weights = _row_weights(mask, indices.shape[:-1]).reshape(-1, 1)
    flat_indices = indices.reshape(-1, num_codebooks).astype(jnp.int32)
    weights = jnp.broadcast_to(weights, flat_indices.shape)
    codebook_ids = jnp.broadcast_to(jnp.arange(num_codebooks, dtype=jnp.int32), flat_indices.shape)
    counts = jnp.zeros((num_codebooks, codebook_size), jnp.int32)
    return counts.at[codebook_ids, flat_indices].add(weights, mode="drop")


def usage_stats(counts: jax.Array) -> dict[str, jax.Array]:
    """Usage metrics from counts [k, K] (any leading shape; codes on the last axis).

    usage: fraction of codes used at least once; perplexity: exp(entropy of counts / total), i.e.
    the effective number of codes (K when uniform, 1 when collapsed); top_code_share: the most used
    code's share of all assignments. Empty histograms give usage 0, perplexity 1, share 0.
    """
    counts = jnp.asarray(counts, jnp.float32)
    total = jnp.sum(counts, axis=-1, keepdims=True)
    probs = counts / jnp.maximum(total, 1.0)
    entropy = -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1)
    return {
        "usage": jnp.mean((counts > 0).astype(jnp.float32), axis=-1),
        "perplexity": jnp.exp(entropy),
        "top_code_share": jnp.max(probs, axis=-1),
    }
