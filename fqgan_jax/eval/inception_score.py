"""Inception Score, streamed: the standard 10-split protocol without keeping any softmax around.

IS = exp(E_x KL(p(y|x) || p(y))), with p(y) the mean of p(y|x) over a split; reported as the
mean and standard deviation over `splits` splits of the images in dataset order, split i holding
images [i N // splits, (i + 1) N // splits) as in improved-gan's `get_inception_score` (and
torch-fidelity). p(y|x) is the softmax of the FID Inception's *unbiased* logits (pool3 times the
`softmax/logits/MatMul` weights, no bias), as improved-gan and the ADM evaluator compute it.

Per split the KL mean is  mean_x sum_y p log p  -  sum_y pbar log pbar,  so accumulating
sum_x p(y|x) [splits, C] and sum_x sum_y p log p [splits] is enough; each image finds its split
from its dataset index.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fqgan_jax.eval import fid

DEFAULT_SPLITS = 10


class ScoreSums(NamedTuple):
    """Per-split sums; every field replicated on the mesh."""
    count: jax.Array  # int32 [splits]
    probs: jax.Array  # float32 [2, splits, C]: compensated sum of p(y|x)
    neg_entropy: jax.Array  # float32 [2, splits]: compensated sum of sum_y p log p


def init_sums(num_classes: int, splits: int = DEFAULT_SPLITS) -> ScoreSums:
    return ScoreSums(count=jnp.zeros((splits,), jnp.int32),
                     probs=jnp.zeros((2, splits, num_classes), jnp.float32),
                     neg_entropy=jnp.zeros((2, splits), jnp.float32))


def split_starts(num_images: int, splits: int) -> np.ndarray:
    """First dataset index of splits 1 .. splits - 1 (improved-gan's i * N // splits)."""
    return np.array([i * num_images // splits for i in range(1, splits)], np.int32)


def update_sums(sums: ScoreSums, logits: jax.Array, mask: jax.Array, index: jax.Array,
                starts: jax.Array) -> ScoreSums:
    """Adds images `logits` [B, C] with dataset `index` [B] where `mask` [B]; `starts` comes
    from `split_starts` for the number of images the eval covers."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    splits = sums.count.shape[0]
    which = jnp.sum(index[:, None] >= starts[None, :], axis=1)  # [B] in [0, splits)
    onehot = jax.nn.one_hot(which, splits, dtype=jnp.float32) * mask.astype(jnp.float32)[:, None]
    hp = jax.lax.Precision.HIGHEST
    return ScoreSums(
        count=sums.count + jnp.sum(onehot, 0).astype(jnp.int32),
        probs=fid.compensated_add(sums.probs, jnp.einsum("bs,bc->sc", onehot, p, precision=hp)),
        neg_entropy=fid.compensated_add(
            sums.neg_entropy, jnp.einsum("bs,b->s", onehot, jnp.sum(p * log_p, -1),
                                         precision=hp)))


def score(sums: ScoreSums) -> tuple[float, float]:
    """(mean, std) of the per-split scores, in float64 on the host; empty splits are left out."""
    count = fid.host_value(sums.count).astype(np.float64)
    probs = fid.host_value(sums.probs).astype(np.float64).sum(0)
    neg_entropy = fid.host_value(sums.neg_entropy).astype(np.float64).sum(0)
    keep = count > 0
    if not keep.any():
        raise fid.FIDError("The Inception Score needs at least one image.")
    mean_p = probs[keep] / count[keep, None]
    log_mean_p = np.log(np.where(mean_p > 0, mean_p, 1.0))
    kl = neg_entropy[keep] / count[keep] - np.sum(mean_p * log_mean_p, axis=1)
    scores = np.exp(kl)
    return float(np.mean(scores)), float(np.std(scores))


def reference_score(probs: np.ndarray, splits: int = DEFAULT_SPLITS) -> tuple[float, float]:
    """improved-gan's one-shot formula on a full [N, C] softmax (for tests and offline use)."""
    scores = []
    for i in range(splits):
        part = probs[i * len(probs) // splits:(i + 1) * len(probs) // splits]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))
