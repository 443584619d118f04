"""Quantization against one codebook computed from parameters: what VQGAN-LC (Ĉ = projector(C))
and FVQ (Ĉ = VQBridge(C)) share once their Ĉ is built.

Each token takes its squared-Euclidean nearest row of Ĉ (float32 distances, the memory-bounded
search of `pallas_search`); z_q is gathered from Ĉ, so the codebook loss reaches whatever
computed Ĉ; the output is straight-through. Loss terms (unweighted; each quantizer weighs them
in its `loss_weights`): "codebook" mean((z_q - sg z)^2), "commitment" mean((sg z_q - z)^2),
"entropy" 0 (neither method has one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from fqgan_jax.quantizers.interface import QuantizerOutput, health_stats
from fqgan_jax.quantizers.pallas_search import search_function
from fqgan_jax.quantizers.straight_through import straight_through


def check_latents(z: jax.Array, code_dim: int, name: str) -> None:
    if tuple(z.shape[-2:]) != (1, code_dim):
        raise ValueError(f"{name} expects z [..., 1, {code_dim}]; got {tuple(z.shape)}")


def quantize(z: jax.Array, codebook: jax.Array, *, shard_axis: str | None,
             memory_budget_bytes: int) -> QuantizerOutput:
    """z float32 [N, d] against Ĉ [K, d] -> the output for latents [N, 1, d] (reshape after)."""
    indices = search_function(shard_axis)(z, codebook, normalized=False,
                                          memory_budget_bytes=memory_budget_bytes)
    quantized = codebook[indices]  # the gather is the codebook loss's path to Ĉ's parameters
    return QuantizerOutput(
        quantized=straight_through(z, quantized)[:, None],
        indices=indices[:, None],
        losses={"codebook": jnp.mean((quantized - lax.stop_gradient(z)) ** 2),
                "commitment": jnp.mean((lax.stop_gradient(quantized) - z) ** 2),
                "entropy": jnp.zeros((), jnp.float32)},
        stats=health_stats(indices[:, None], codebook.shape[0]))


def reshaped(output: QuantizerOutput, batch_shape: tuple) -> QuantizerOutput:
    """`quantize`'s flat output laid out as latents [*batch_shape, 1, d]."""
    return output._replace(
        quantized=output.quantized.reshape(*batch_shape, *output.quantized.shape[1:]),
        indices=output.indices.reshape(*batch_shape, 1))


def lookup(codebook: jax.Array, indices: jax.Array) -> jax.Array:
    """Rows of Ĉ: indices int [..., 1] -> float32 [..., 1, d]."""
    indices = jnp.asarray(indices, jnp.int32)
    if indices.shape[-1:] != (1,):
        raise ValueError(f"lookup expects indices [..., 1]; got {indices.shape}")
    return codebook[indices]
