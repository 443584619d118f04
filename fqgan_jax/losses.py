"""Generator loss terms of the tokenizer (spec fqgan.md §4.1).

Each term is a small pure function; `generator_loss` weights and sums them. The GAN term, whose
weight depends on the step, and the teachers' InfoNCE (`semantic_loss`) are added by the train
step.
"""

from __future__ import annotations

import itertools
from typing import Callable

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


def _info_nce_logits(predicted, teacher, num_groups, temperature):
    """[G, b, b] logits p_i · t_j / τ within each group, l2-normalized as torch F.normalize."""
    def unit(x):
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    batch, dim = predicted.shape
    if batch % num_groups:
        raise ValueError(f"InfoNCE: batch {batch} does not split into {num_groups} groups.")
    p = unit(predicted).reshape(num_groups, batch // num_groups, dim)
    t = jax.lax.stop_gradient(unit(teacher)).reshape(num_groups, batch // num_groups, dim)
    return jnp.einsum("gid,gjd->gij", p, t) / temperature


def info_nce_loss(predicted: jax.Array, teacher: jax.Array, *, num_groups: int = 1,
                  temperature: float = 1.0) -> jax.Array:
    """Prediction -> teacher InfoNCE on CLS vectors (spec fqgan.md §3.3).

    -mean_i log softmax_j(p_i · t_j / τ)_i with p, t l2-normalized (torch F.normalize, eps 1e-12)
    and the teacher a constant. The batch [B, D] splits into `num_groups` contiguous groups that
    are each other's negatives only: the official loss uses each GPU's local batch, so with the
    batch sharded over the data axis, num_groups = the number of shards reproduces it; 1 uses the
    whole global batch. Temperature 1 is the official value.
    """
    logits = _info_nce_logits(predicted, teacher, num_groups, temperature)
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1), axis1=-2, axis2=-1))


def info_nce_top1(predicted: jax.Array, teacher: jax.Array, *, num_groups: int = 1) -> jax.Array:
    """Share of predictions whose nearest teacher feature (among the same negatives) is their
    own image's: how well a head has learned to point at its teacher."""
    logits = _info_nce_logits(predicted, teacher, num_groups, 1.0)
    hits = jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[-1])
    return jnp.mean(hits.astype(jnp.float32))


def semantic_loss(predictions: dict, teacher_features: dict,
                  loss_config: ml_collections.ConfigDict, *,
                  num_groups: int) -> tuple[jax.Array, dict]:
    """semantic_weight x the sum over taught branches of InfoNCE (spec §3.3: Triple adds its two
    teachers' losses), and {"semantic_<branch>": InfoNCE, "semantic_top1_<branch>": top-1}."""
    terms, total = {}, jnp.zeros((), jnp.float32)
    for branch, predicted in predictions.items():
        loss = info_nce_loss(predicted, teacher_features[branch], num_groups=num_groups,
                             temperature=loss_config.infonce_temperature)
        terms[f"semantic_{branch}"] = loss
        terms[f"semantic_top1_{branch}"] = info_nce_top1(
            predicted, teacher_features[branch], num_groups=num_groups)
        total = total + loss_config.semantic_weight * loss
    return total, terms


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
                   perceptual_fn: Callable | None = None) -> tuple[jax.Array, dict]:
    """Weighted total and the unweighted terms, for logging. The GAN term is the step's."""
    nll, terms = nll_loss(images, recon, loss_config, perceptual_fn)
    vq_terms = {
        "codebook": quantized.codebook_loss,
        "commitment": quantized.commitment_loss,
        "entropy": quantized.entropy_loss,
        "disentangle": disentangle_loss(quantized.codes),
    }
    weights = {
        "codebook": loss_config.codebook_weight,
        "commitment": loss_config.codebook_weight * loss_config.commitment_beta,
        "entropy": loss_config.entropy_weight,
        "disentangle": loss_config.disentangle_weight,
    }
    total = nll + sum(weights[name] * value for name, value in vq_terms.items())
    return total, {**terms, **vq_terms}
