"""Generator loss terms of the tokenizer (spec fqgan.md §4.1).

Each term is a small pure function; `generator_loss` weights and sums them. The GAN term, whose
weight depends on the step (adversarial.py), and the teachers' InfoNCE (infonce.py) are added by
the train step.
"""

from __future__ import annotations

import itertools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from fqgan_jax.quantizers.interface import QuantizerOutput


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


def nll_loss(images: jax.Array, recon: jax.Array, loss_config: ml_collections.ConfigDict,
             perceptual_fn: Callable | None = None) -> tuple[jax.Array, dict]:
    """taming's `nll_loss`: weighted pixel (+ perceptual) loss, and the unweighted terms.

    `perceptual_fn(images, recon)` is the batch-mean LPIPS, or None when it is off.
    """
    terms = {"reconstruction": reconstruction_loss(images, recon, loss_config.reconstruction)}
    value = loss_config.reconstruction_weight * terms["reconstruction"]
    if perceptual_fn is not None:
        terms["perceptual"] = perceptual_fn(images, recon)
        value = value + loss_config.perceptual_weight * terms["perceptual"]
    return value, terms


def generator_loss(images: jax.Array, recon: jax.Array, quantized: QuantizerOutput,
                   loss_config: ml_collections.ConfigDict,
                   perceptual_fn: Callable | None = None, *,
                   quantizer_weights: dict[str, float]) -> tuple[jax.Array, dict]:
    """Weighted total and the unweighted terms, for logging. The GAN term is the step's.

    `quantizer_weights` weighs the quantizer's own loss terms (its `loss_weights(loss_config)`,
    quantizers/interface.py); the disentanglement term applies to any factorized quantizer.
    """
    nll, terms = nll_loss(images, recon, loss_config, perceptual_fn)
    vq_terms = {**quantized.losses, "disentangle": disentangle_loss(quantized.quantized)}
    weights = {**quantizer_weights, "disentangle": loss_config.disentangle_weight}
    total = nll + sum(weights[name] * value for name, value in vq_terms.items())
    return total, {**terms, **vq_terms}
