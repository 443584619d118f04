"""The LlamaGen/FQGAN codebook entropy penalty (spec fqgan.md §1.4), chunked over the codebook.

It shares the nearest-code search's tiling (`search.plan_blocks`), so at large K it never holds an
N x K block beyond the memory budget.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fqgan_jax.quantizers.search import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    BlockPlan,
    check_rows_and_codebook,
    chunk_codebook,
    dot_rows,
    pad_leading,
    plan_blocks,
)

# The entropy loss keeps about four score blocks alive at once in its backward pass (logits,
# probabilities and their cotangents; measured with memory_analysis), so it plans with a quarter of
# the budget to keep its whole footprint, not just one block, within memory_budget_bytes.
_ENTROPY_LIVE_BLOCKS = 4
# spec fqgan.md §1.4: LlamaGen's avg-entropy uses log(avg_p + 1e-5).
_AVG_ENTROPY_EPS = 1e-5


def _affinity_logits(z: jax.Array, codes: jax.Array, temperature: float) -> jax.Array:
    """-|z - c|^2 / T for every (row, code), expanded as |z|^2 + |c|^2 - 2 z.c like LlamaGen."""
    squared_distance = (
        jnp.sum(z * z, axis=-1, keepdims=True)
        + jnp.sum(codes * codes, axis=-1)
        - 2.0 * dot_rows(z, codes)
    )
    return -squared_distance / temperature


def _entropy_from_stats(sample_entropy: jax.Array, avg_probs: jax.Array) -> jax.Array:
    """spec fqgan.md §1.4: mean sample entropy minus entropy of the batch-average distribution."""
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + _AVG_ENTROPY_EPS))
    return sample_entropy - avg_entropy


def _entropy_loss_direct(z: jax.Array, codebook: jax.Array, temperature: float) -> jax.Array:
    """The whole N x K matrix at once; used when it fits the budget."""
    log_probs = jax.nn.log_softmax(_affinity_logits(z, codebook, temperature), axis=-1)
    probs = jnp.exp(log_probs)
    sample_entropy = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
    return _entropy_from_stats(sample_entropy, jnp.mean(probs, axis=0))


def _row_log_normalizer(z, chunks, offsets, codebook_size, temperature):
    """Pass 1: per-row (max logit m, log sum_j exp(logit_j - m)), accumulated chunk by chunk.

    Keeping the normalizer relative to the row max (online softmax) instead of as one logsumexp
    matters: log p = (logit - m) - log_sum then stays as accurate as log_softmax, whereas
    logit - logsumexp loses |logit| * eps to cancellation (logits reach hundreds at T = 0.01).
    """

    @jax.checkpoint  # recompute the N x C logits in the backward pass instead of storing them
    def scan_chunk(carry, chunk_and_offset):
        row_max, scaled_sum = carry
        chunk, offset = chunk_and_offset
        is_real_code = offset + jnp.arange(chunk.shape[0]) < codebook_size
        logits = jnp.where(is_real_code, _affinity_logits(z, chunk, temperature), -jnp.inf)
        # The max is only a numerical shift; the result does not depend on it mathematically.
        new_max = jnp.maximum(row_max, lax.stop_gradient(jnp.max(logits, axis=-1)))
        scaled_sum = scaled_sum * jnp.exp(row_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=-1
        )
        return (new_max, scaled_sum), None

    num_rows = z.shape[0]
    init = (jnp.full((num_rows,), -jnp.inf, jnp.float32), jnp.zeros((num_rows,), jnp.float32))
    (row_max, scaled_sum), _ = lax.scan(scan_chunk, init, (chunks, offsets))
    return row_max, jnp.log(scaled_sum)


def _entropy_sums(z, row_weights, chunks, offsets, codebook_size, temperature):
    """Pass 2: (sum_i w_i H(p_i), sum_i w_i p_i) over one row block, chunk by chunk."""
    row_max, log_sum = _row_log_normalizer(z, chunks, offsets, codebook_size, temperature)

    @jax.checkpoint
    def scan_chunk(entropy_sum, chunk_and_offset):
        chunk, offset = chunk_and_offset
        is_real_code = offset + jnp.arange(chunk.shape[0]) < codebook_size
        shifted = _affinity_logits(z, chunk, temperature) - row_max[:, None]
        # Padded codes get log p = 0 and then p = 0: finite values on both sides of the mask keep
        # the backward pass free of 0 * inf NaNs.
        log_probs = jnp.where(is_real_code, shifted - log_sum[:, None], 0.0)
        probs = jnp.where(is_real_code, jnp.exp(log_probs), 0.0) * row_weights[:, None]
        entropy_sum = entropy_sum - jnp.sum(probs * log_probs)
        return entropy_sum, jnp.sum(probs, axis=0)

    entropy_sum, prob_sums = lax.scan(scan_chunk, jnp.zeros((), jnp.float32), (chunks, offsets))
    return entropy_sum, prob_sums.reshape(-1)


def _entropy_loss_chunked(z, codebook, temperature, plan: BlockPlan) -> jax.Array:
    num_rows, codebook_size = z.shape[0], codebook.shape[0]
    chunks, offsets = chunk_codebook(codebook, plan)
    block_sums = functools.partial(
        _entropy_sums, chunks=chunks, offsets=offsets,
        codebook_size=codebook_size, temperature=temperature,
    )
    if plan.num_row_blocks == 1:
        entropy_sum, prob_sums = block_sums(z, jnp.ones((num_rows,), jnp.float32))
    else:
        padded_rows = plan.num_row_blocks * plan.row_block
        row_blocks = pad_leading(z, padded_rows).reshape(plan.num_row_blocks, plan.row_block, -1)
        row_weights = (jnp.arange(padded_rows) < num_rows).astype(jnp.float32)
        row_weights = row_weights.reshape(plan.num_row_blocks, plan.row_block)

        @jax.checkpoint
        def accumulate_block(totals, block):
            block_entropy, block_probs = block_sums(*block)
            return (totals[0] + block_entropy, totals[1] + block_probs), None

        init = (jnp.zeros((), jnp.float32), jnp.zeros((plan.num_chunks * plan.chunk,)))
        (entropy_sum, prob_sums), _ = lax.scan(accumulate_block, init, (row_blocks, row_weights))
    avg_probs = prob_sums[:codebook_size] / num_rows
    return _entropy_from_stats(entropy_sum / num_rows, avg_probs)


def entropy_loss(
    z: jax.Array,
    codebook: jax.Array,
    *,
    temperature: float = 0.01,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
    """LlamaGen/FQGAN entropy loss (spec fqgan.md §1.4) of z [N, d] against codebook [K, d].

    p_i = softmax(-|z_i - c|^2 / T) over the K codes; the loss is the mean per-row entropy minus the
    entropy of the batch-average p (with LlamaGen's log(p + 1e-5)). Minimizing it makes each
    assignment confident while spreading the batch over many codes. Differentiable w.r.t. both
    arguments. When the N x K computation (about four float32 N x K blocks live in the backward
    pass) would exceed ``memory_budget_bytes`` it runs two checkpointed passes over codebook chunks
    (row normalizers, then probabilities), so neither pass stores an N x K block.
    """
    check_rows_and_codebook(z, codebook, "entropy_loss")
    z = jnp.asarray(z, jnp.float32)
    codebook = jnp.asarray(codebook, jnp.float32)
    block_budget = memory_budget_bytes // _ENTROPY_LIVE_BLOCKS
    plan = plan_blocks(z.shape[0], codebook.shape[0], block_budget)
    if plan.is_single_block:
        return _entropy_loss_direct(z, codebook, temperature)
    return _entropy_loss_chunked(z, codebook, temperature, plan)
