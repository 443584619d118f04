"""Vector quantization for FQGAN-style tokenizers.

Contents:

* ``nearest_code``: exact, memory-bounded nearest-neighbour search over a (possibly huge) codebook.
* ``straight_through``: the straight-through estimator as a ``jax.custom_vjp``.
* ``entropy_loss``: the LlamaGen/FQGAN codebook entropy penalty, chunked over the codebook.
* ``code_histogram`` / ``usage_stats``: codebook-usage metrics (spec large_codebooks.md §E.5.1).
* ``FactorizedQuantizer``: k independent l2-normalized sub-codebooks (spec fqgan.md §1.4), searched
  with one ``jax.vmap``.

Why chunking: at K = 262,144 codes the N x K distance matrix for a batch of N = 16,384 tokens is
16 GiB in float32 (spec large_codebooks.md §E.5.3). ``nearest_code`` and ``entropy_loss`` never
build a distance block larger than ``memory_budget_bytes``; they scan over codebook chunks (and, if
needed, over row blocks) instead.

All quantizer arithmetic runs in float32 at full matmul precision, whatever the model's compute
dtype: the official code runs the distance matmul under bf16 autocast (spec fqgan.md §7.2),
and bf16 quantizers are a reported source of NaNs and of argmin flips.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# A codebook chunk is never made smaller than this; below it we block over rows instead, because
# tiny chunks turn the scan into thousands of under-filled matmuls.
_MIN_CODE_CHUNK = 128
# Block sizes are rounded to a multiple of this so matmul tiles stay aligned.
_BLOCK_ALIGN = 8
_FLOAT32_BYTES = 4
# The entropy loss keeps about four score blocks alive at once in its backward pass (logits,
# probabilities and their cotangents; measured with memory_analysis), so it plans with a quarter of
# the budget to keep its whole footprint, not just one block, within memory_budget_bytes.
_ENTROPY_LIVE_BLOCKS = 4
# spec fqgan.md §1.4: LlamaGen's avg-entropy uses log(avg_p + 1e-5).
_AVG_ENTROPY_EPS = 1e-5
# F.normalize's default epsilon (LlamaGen normalizes with torch.nn.functional.normalize).
_NORMALIZE_EPS = 1e-12


# ------------------------------------------------------------------------------------------------
# Blocking plan shared by the search and the entropy loss.
# ------------------------------------------------------------------------------------------------


class _BlockPlan(NamedTuple):
    """Tiling of an N x K score matrix: row blocks of ``row_block`` by chunks of ``chunk`` codes."""

    row_block: int
    num_row_blocks: int
    chunk: int
    num_chunks: int

    @property
    def is_single_block(self) -> bool:
        return self.num_row_blocks == 1 and self.num_chunks == 1


def _split_evenly(total: int, max_block: int) -> tuple[int, int]:
    """Splits ``total`` into the fewest near-equal blocks of at most ``max_block`` (aligned)."""
    max_block = max(1, min(total, max_block))
    if total <= max_block:
        return total, 1
    if max_block >= _BLOCK_ALIGN:
        max_block -= max_block % _BLOCK_ALIGN
    num_blocks = -(-total // max_block)
    # Even blocks minimize padding; rounding up stays <= max_block because max_block is aligned.
    block = -(-total // num_blocks)
    if max_block >= _BLOCK_ALIGN:
        block = min(max_block, -(-block // _BLOCK_ALIGN) * _BLOCK_ALIGN)
    return block, -(-total // block)


def _plan_blocks(num_rows: int, codebook_size: int, memory_budget_bytes: int) -> _BlockPlan:
    """Chooses the tiling so one float32 score block fits ``memory_budget_bytes``.

    The floor is one row by ``min(K, _MIN_CODE_CHUNK)`` codes (512 bytes); budgets below that are
    rounded up to it.
    """
    max_elements = max(1, memory_budget_bytes // _FLOAT32_BYTES)
    if num_rows * codebook_size <= max_elements:
        return _BlockPlan(num_rows, 1, codebook_size, 1)
    min_chunk = min(codebook_size, _MIN_CODE_CHUNK)
    max_rows = num_rows if num_rows * min_chunk <= max_elements else max_elements // min_chunk
    row_block, num_row_blocks = _split_evenly(num_rows, max(1, max_rows))
    max_chunk = max(min_chunk, max_elements // row_block)
    chunk, num_chunks = _split_evenly(codebook_size, max_chunk)
    return _BlockPlan(row_block, num_row_blocks, chunk, num_chunks)


def _pad_leading(x: jax.Array, padded_size: int) -> jax.Array:
    """Zero-pads axis 0 of ``x`` to ``padded_size``; padded entries are masked by the callers."""
    pad = padded_size - x.shape[0]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def _chunk_codebook(codebook: jax.Array, plan: _BlockPlan) -> tuple[jax.Array, jax.Array]:
    """Returns codebook chunks [num_chunks, chunk, d] and each chunk's first code index."""
    padded = _pad_leading(codebook, plan.num_chunks * plan.chunk)
    chunks = padded.reshape(plan.num_chunks, plan.chunk, codebook.shape[-1])
    offsets = jnp.arange(plan.num_chunks, dtype=jnp.int32) * plan.chunk
    return chunks, offsets


def _check_rows_and_codebook(z: jax.Array, codebook: jax.Array, name: str) -> None:
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{name} expects z [N, d] and codebook [K, d] with the same d; got z{z.shape} "
            f"and codebook{codebook.shape}. Use jax.vmap for a stack of sub-codebooks."
        )


def _dot_rows(z: jax.Array, codes: jax.Array) -> jax.Array:
    """z [N, d] . codes [C, d]^T in true float32 (no TF32/bf16 passes on accelerators)."""
    return jnp.matmul(z, codes.T, precision=lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------
# Nearest-code search.
# ------------------------------------------------------------------------------------------------


def _code_distances(z: jax.Array, codes: jax.Array, normalized: bool) -> jax.Array:
    """Distance up to a per-row constant: |c|^2 - 2 z.c, or -z.c for unit-norm z and codes."""
    dots = _dot_rows(z, codes)
    if normalized:
        return -dots
    return jnp.sum(codes * codes, axis=-1) - 2.0 * dots


def _search_code_chunks(
    z: jax.Array, chunks: jax.Array, offsets: jax.Array, codebook_size: int, normalized: bool
) -> tuple[jax.Array, jax.Array]:
    """Scans code chunks keeping a running (min distance, argmin) per row; returns both."""

    def scan_chunk(carry, chunk_and_offset):
        best_distance, best_index = carry
        chunk, offset = chunk_and_offset
        distances = _code_distances(z, chunk, normalized)
        is_real_code = offset + jnp.arange(chunk.shape[0]) < codebook_size
        distances = jnp.where(is_real_code, distances, jnp.inf)
        chunk_min = jnp.min(distances, axis=-1)
        chunk_argmin = jnp.argmin(distances, axis=-1).astype(jnp.int32) + offset
        # Strict '<' keeps the earlier chunk on ties, so ties resolve to the lowest index overall.
        improved = chunk_min < best_distance
        best_distance = jnp.where(improved, chunk_min, best_distance)
        best_index = jnp.where(improved, chunk_argmin, best_index)
        return (best_distance, best_index), None

    num_rows = z.shape[0]
    init = (jnp.full((num_rows,), jnp.inf, jnp.float32), jnp.zeros((num_rows,), jnp.int32))
    best, _ = lax.scan(scan_chunk, init, (chunks, offsets))
    return best


def nearest_code(
    z: jax.Array,
    codebook: jax.Array,
    *,
    normalized: bool = False,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
    """Exact nearest code by squared L2 distance: z [N, d], codebook [K, d] -> int32 [N].

    Ties resolve to the lowest index (torch.argmin's rule, spec fqgan.md §1.4). With
    ``normalized=True`` the rows of ``z`` and ``codebook`` must be unit-norm; the search then
    maximizes the dot product, which is the same ordering without the norm terms.

    No float32 block larger than ``memory_budget_bytes`` is built: above it the codebook is
    scanned in chunks, and rows are blocked with ``lax.map`` when even a minimal chunk is too big.
    Works under jit, vmap (over sub-codebooks) and with ``z`` sharded along N.
    """
    return nearest_code_and_distance(z, codebook, normalized=normalized,
                                     memory_budget_bytes=memory_budget_bytes)[0]


def nearest_code_and_distance(
    z: jax.Array,
    codebook: jax.Array,
    *,
    normalized: bool = False,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> tuple[jax.Array, jax.Array]:
    """`nearest_code`'s (int32 [N] index, float32 [N] distance up to a per-row constant): the
    distance lets searches over disjoint codebook shards be merged (codebook_sharding.py)."""
    _check_rows_and_codebook(z, codebook, "nearest_code")
    # Indices are not differentiable; cutting the tangents keeps autodiff out of the scan.
    z = lax.stop_gradient(jnp.asarray(z, jnp.float32))
    codebook = lax.stop_gradient(jnp.asarray(codebook, jnp.float32))
    num_rows, codebook_size = z.shape[0], codebook.shape[0]
    plan = _plan_blocks(num_rows, codebook_size, memory_budget_bytes)
    if plan.is_single_block:
        distances = _code_distances(z, codebook, normalized)
        return jnp.argmin(distances, axis=-1).astype(jnp.int32), jnp.min(distances, axis=-1)

    chunks, offsets = _chunk_codebook(codebook, plan)
    search_rows = functools.partial(
        _search_code_chunks, chunks=chunks, offsets=offsets,
        codebook_size=codebook_size, normalized=normalized,
    )
    if plan.num_row_blocks == 1:
        distance, index = search_rows(z)
        return index, distance
    padded_rows = _pad_leading(z, plan.num_row_blocks * plan.row_block)
    row_blocks = padded_rows.reshape(plan.num_row_blocks, plan.row_block, z.shape[1])
    distance, index = lax.map(search_rows, row_blocks)
    return index.reshape(-1)[:num_rows], distance.reshape(-1)[:num_rows]


# ------------------------------------------------------------------------------------------------
# Straight-through estimator.
# ------------------------------------------------------------------------------------------------


@jax.custom_vjp
def straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
    """Returns ``q``; in the backward pass the cotangent goes to ``z`` unchanged and ``q`` gets 0.

    Equivalent to ``z + stop_gradient(q - z)`` but without the rounding of the add/subtract, so the
    forward value is exactly ``q``. ``z`` and ``q`` must have the same shape.
    """
    _check_same_shape(z, q)
    return q


def _check_same_shape(z: jax.Array, q: jax.Array) -> None:
    if jnp.shape(z) != jnp.shape(q):
        raise ValueError(
            f"straight_through needs equal shapes; got {jnp.shape(z)} and {jnp.shape(q)}"
        )


def _straight_through_fwd(z, q):
    _check_same_shape(z, q)
    # A scalar residual carries z's dtype so the cotangent can be cast back to it.
    return q, jnp.zeros((), jnp.result_type(z))


def _straight_through_bwd(z_dtype_witness, output_cotangent):
    z_cotangent = output_cotangent.astype(z_dtype_witness.dtype)
    return z_cotangent, jnp.zeros_like(output_cotangent)


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


# ------------------------------------------------------------------------------------------------
# Entropy loss (LlamaGen `compute_entropy_loss`, spec fqgan.md §1.4).
# ------------------------------------------------------------------------------------------------


def _affinity_logits(z: jax.Array, codes: jax.Array, temperature: float) -> jax.Array:
    """-|z - c|^2 / T for every (row, code), expanded as |z|^2 + |c|^2 - 2 z.c like LlamaGen."""
    squared_distance = (
        jnp.sum(z * z, axis=-1, keepdims=True)
        + jnp.sum(codes * codes, axis=-1)
        - 2.0 * _dot_rows(z, codes)
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


def _entropy_loss_chunked(z, codebook, temperature, plan: _BlockPlan) -> jax.Array:
    num_rows, codebook_size = z.shape[0], codebook.shape[0]
    chunks, offsets = _chunk_codebook(codebook, plan)
    block_sums = functools.partial(
        _entropy_sums, chunks=chunks, offsets=offsets,
        codebook_size=codebook_size, temperature=temperature,
    )
    if plan.num_row_blocks == 1:
        entropy_sum, prob_sums = block_sums(z, jnp.ones((num_rows,), jnp.float32))
    else:
        padded_rows = plan.num_row_blocks * plan.row_block
        row_blocks = _pad_leading(z, padded_rows).reshape(plan.num_row_blocks, plan.row_block, -1)
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
    _check_rows_and_codebook(z, codebook, "entropy_loss")
    z = jnp.asarray(z, jnp.float32)
    codebook = jnp.asarray(codebook, jnp.float32)
    block_budget = memory_budget_bytes // _ENTROPY_LIVE_BLOCKS
    plan = _plan_blocks(z.shape[0], codebook.shape[0], block_budget)
    if plan.is_single_block:
        return _entropy_loss_direct(z, codebook, temperature)
    return _entropy_loss_chunked(z, codebook, temperature, plan)


# ------------------------------------------------------------------------------------------------
# Usage statistics (spec large_codebooks.md §E.5.1: report usage, perplexity and concentration).
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# The FQGAN factorized quantizer.
# ------------------------------------------------------------------------------------------------


def l2_normalized(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(|x|, 1e-12), matching torch.nn.functional.normalize used by LlamaGen."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _NORMALIZE_EPS)


class QuantizerOutput(NamedTuple):
    """Result of ``FactorizedQuantizer.__call__``; all losses are unweighted scalars."""

    codes: jax.Array  # [..., k, d] float32, straight-through output (value = selected code vector)
    indices: jax.Array  # int32 [..., k]
    codebook_loss: jax.Array  # sum over sub-codebooks of mean((q - sg(z))**2)
    commitment_loss: jax.Array  # sum over sub-codebooks of mean((sg(q) - z)**2); unweighted
    entropy_loss: jax.Array  # sum over sub-codebooks of entropy_loss(...), 0.0 when not requested


class FactorizedQuantizer(nnx.Module):
    """k independent sub-codebooks searched in parallel (spec fqgan.md §1.4; LlamaGen when k = 1).

    Each sub-codebook quantizes its own d-dim slice z[..., j, :]. No EMA and no dead-code restarts:
    the codebook learns only through ``codebook_loss`` (and ``entropy_loss`` when requested); the
    straight-through output passes the decoder's gradient to z and none to the codebook.
    """

    def __init__(
        self,
        *,
        num_codebooks: int,
        codebook_size: int,
        code_dim: int,
        l2_normalize: bool = True,
        entropy_temperature: float = 0.01,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        shard_axis: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_codebooks = num_codebooks
        # With a mesh set (jax.set_mesh) whose `shard_axis` has > 1 device, the search runs on
        # codebook rows split over that axis (codebook_sharding.py); otherwise whole per device.
        self.shard_axis = shard_axis
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.l2_normalize = l2_normalize
        self.entropy_temperature = entropy_temperature
        self.memory_budget_bytes = memory_budget_bytes
        # spec fqgan.md §1.4: nn.Embedding init uniform(-1/K, 1/K), then l2-normalized row-wise.
        bound = 1.0 / codebook_size
        shape = (num_codebooks, codebook_size, code_dim)
        init = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        self.codebook = nnx.Param(l2_normalized(init) if l2_normalize else init)

    def _search_codebook(self) -> jax.Array:
        """The codebook as searched: rows re-normalized at use time (spec fqgan.md §7.2)."""
        codebook = jnp.asarray(self.codebook[...], jnp.float32)
        return l2_normalized(codebook) if self.l2_normalize else codebook

    def __call__(self, z: jax.Array, *, with_entropy: bool = False) -> QuantizerOutput:
        """Quantizes z [..., k, d] (any float dtype; computed in float32)."""
        expected = (self.num_codebooks, self.code_dim)
        if tuple(z.shape[-2:]) != expected:
            raise ValueError(f"FactorizedQuantizer expects z [..., {expected[0]}, {expected[1]}]; "
                             f"got {tuple(z.shape)}")
        batch_shape = z.shape[:-2]
        z = jnp.asarray(z, jnp.float32).reshape(-1, *expected)
        if self.l2_normalize:
            z = l2_normalized(z)
        codebook = self._search_codebook()
        # One search per sub-codebook in a single vmap; the budget is shared between them because
        # vmap runs all k chunk searches side by side.
        search = functools.partial(
            self._search_function(), normalized=self.l2_normalize,
            memory_budget_bytes=max(1, self.memory_budget_bytes // self.num_codebooks),
        )
        indices = jax.vmap(search, in_axes=(1, 0), out_axes=1)(z, codebook)
        quantized = codebook[jnp.arange(self.num_codebooks), indices]
        codes = straight_through(z, quantized)
        # spec fqgan.md §1.4: mean over tokens and channels per sub-codebook, summed over k.
        codebook_loss = jnp.sum(jnp.mean((quantized - lax.stop_gradient(z)) ** 2, axis=(0, 2)))
        commitment_loss = jnp.sum(jnp.mean((lax.stop_gradient(quantized) - z) ** 2, axis=(0, 2)))
        entropy = self._entropy(z, codebook) if with_entropy else jnp.zeros((), jnp.float32)
        return QuantizerOutput(
            codes=codes.reshape(*batch_shape, *expected),
            indices=indices.reshape(*batch_shape, self.num_codebooks),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            entropy_loss=entropy,
        )

    def _search_function(self):
        from fqgan_jax import codebook_sharding  # noqa: PLC0415 (it imports this module)

        if self.shard_axis and codebook_sharding.context_axis_size(self.shard_axis) > 1:
            return functools.partial(codebook_sharding.sharded_nearest_code, axis=self.shard_axis)
        return nearest_code

    def _entropy(self, z: jax.Array, codebook: jax.Array) -> jax.Array:
        loss = functools.partial(
            entropy_loss, temperature=self.entropy_temperature,
            memory_budget_bytes=max(1, self.memory_budget_bytes // self.num_codebooks),
        )
        return jnp.sum(jax.vmap(loss, in_axes=(1, 0))(z, codebook))

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors: indices int [..., k] -> float32 [..., k, d], normalized if l2_normalize."""
        indices = jnp.asarray(indices, jnp.int32)
        if indices.shape[-1:] != (self.num_codebooks,):
            raise ValueError(
                f"lookup expects indices [..., {self.num_codebooks}]; got {indices.shape}"
            )
        return self._search_codebook()[jnp.arange(self.num_codebooks), indices]
