"""Representation learning's loss: InfoNCE from each taught branch's prediction head to its frozen
teacher's CLS feature (spec fqgan.md §3.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


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
