"""Generator loss terms of the tokenizer (spec fqgan.md §4.1).

Each term is a small pure function; `generator_loss` weights and sums them. Later terms (LPIPS,
GAN, representation learning) slot in as further entries of the same dict of named terms.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections

from fqgan_jax.quantize import QuantizerOutput


def reconstruction_loss(images: jax.Array, recon: jax.Array, kind: str) -> jax.Array:
    """Mean pixel loss on [-1, 1] images: "l2" (official) or "l1"."""
    diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
    return jnp.mean(jnp.square(diff)) if kind == "l2" else jnp.mean(jnp.abs(diff))


def disentangle_loss(codes: jax.Array) -> jax.Array:
    """Mean over sub-codebook pairs of mean_i (â_i · b̂_i)² (spec fqgan.md §2).

    `codes` is [..., k, d], the straight-through outputs, so the gradient reaches the encoder
    branches and not the codebooks. Dual has one pair; Triple averages its three pairs. k = 1
    has no pair and gives 0.
    """
    num_codebooks = codes.shape[-2]
    if num_codebooks < 2:
        return jnp.zeros((), jnp.float32)
    flat = codes.reshape(-1, num_codebooks, codes.shape[-1]).astype(jnp.float32)
    unit = flat * jax.lax.rsqrt(jnp.maximum(jnp.sum(flat**2, -1, keepdims=True), 1e-24))
    pairs = list(itertools.combinations(range(num_codebooks), 2))
    terms = [jnp.mean(jnp.sum(unit[:, a] * unit[:, b], -1) ** 2) for a, b in pairs]
    return sum(terms) / len(pairs)


def generator_loss(images: jax.Array, recon: jax.Array, quantized: QuantizerOutput,
                   loss_config: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
    """Weighted total and the unweighted terms, for logging."""
    terms = {
        "reconstruction": reconstruction_loss(images, recon, loss_config.reconstruction),
        "codebook": quantized.codebook_loss,
        "commitment": quantized.commitment_loss,
        "entropy": quantized.entropy_loss,
        "disentangle": disentangle_loss(quantized.codes),
    }
    weights = {
        "reconstruction": loss_config.reconstruction_weight,
        "codebook": loss_config.codebook_weight,
        "commitment": loss_config.codebook_weight * loss_config.commitment_beta,
        "entropy": loss_config.entropy_weight,
        "disentangle": loss_config.disentangle_weight,
    }
    total = sum(weights[name] * value for name, value in terms.items())
    return total, terms
