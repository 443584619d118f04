"""Open-MAGVIT2's lookup-free quantizer (LFQ, spec large_codebooks.md §C), with its entropy
penalty computed exactly without the tokens x 2^b tensor the official code builds.

Each of the b = code_dim latent channels is one bit: +1 if x > 0 else -1, so the implicit codebook
is {-1, +1}^b (codebook_size = 2^b, one codebook) and the "nearest code" costs nothing. The index
is little-endian, sum_i [x_i > 0] 2^i with channel 0 the least significant bit (§C.1, §C.6: the
older repository's reversed mask broke AR decoding, spec §E.3).

The only 2^b-sized term is the entropy penalty of §C.2: p = softmax over all codes of 2<x, c>/τ,
loss = w_s H_s - w_b H_b with H_s the mean per-token entropy of p and H_b the entropy of the
token-mean p̄. Because the codes are ±1 vectors, p factorizes into b independent bits, bit i being
+1 with probability σ(4 x_i / τ) (§C.2 [derived]; the tests check it against the brute-force
softmax), so
* H_s = sum over bits of the Bernoulli entropy: O(b) per token;
* p̄ is exact from per-token distributions over groups of `entropy_group_bits` bits (products of
  per-bit probabilities, summed as logs), combined across groups by one (2^g x N)(N x 2^g) matmul
  for two groups (18 = 9 + 9), and for more groups by a scan over the top group's values.
  Memory is linear in the tokens times 2^g, never N x 2^b; only the final p̄ [2^b] is
  materialized.

The official p̄ averages each GPU's own tokens (no all-reduce, §C.2): batch_entropy_scope="shard"
reproduces it, "global" averages the whole step's tokens.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from fqgan_jax.quantizers.interface import QuantizerOutput, health_stats
from fqgan_jax.quantizers.straight_through import straight_through

# spec §C.2: the official codebook entropy uses log(p̄ + 1e-5).
_BATCH_ENTROPY_EPS = 1e-5
# int32 indices: 2^30 codes is already far beyond any histogram a run could hold.
_MAX_BITS = 30
# spec §C.4: Open-MAGVIT2's AR model splits each 18-bit code into 6 low bits, then 12 high bits.
AR_SUB_TOKEN_BITS = (6, 12)


# ------------------------------------------------------------------------------------------------
# Bits <-> indices (little-endian: bit 0 is the least significant, spec §C.1).


def bits_to_indices(bits: jax.Array) -> jax.Array:
    """Bits [..., b] (bool, or any number with "set" meaning > 0) -> int32 [...] codes."""
    bits = jnp.asarray(bits)
    set_bits = bits if bits.dtype == jnp.bool_ else bits > 0
    weights = jnp.left_shift(1, jnp.arange(bits.shape[-1], dtype=jnp.int32))
    return jnp.sum(jnp.where(set_bits, weights, 0), axis=-1, dtype=jnp.int32)


def indices_to_bits(indices: jax.Array, num_bits: int) -> jax.Array:
    """Int codes [...] -> bool bits [..., num_bits], bit i = (index >> i) & 1."""
    shifts = jnp.arange(num_bits, dtype=jnp.int32)
    return (jnp.right_shift(jnp.asarray(indices, jnp.int32)[..., None], shifts) & 1) == 1


def split_indices(indices: jax.Array, bits: Sequence[int] = AR_SUB_TOKEN_BITS
                  ) -> tuple[jax.Array, ...]:
    """Codes -> sub-tokens of `bits` bits each, lowest bits first (spec §C.4's [6, 12])."""
    indices = jnp.asarray(indices, jnp.int32)
    offsets = [0, *itertools.accumulate(bits)][:-1]
    return tuple(jnp.right_shift(indices, offset) & ((1 << width) - 1)
                 for offset, width in zip(offsets, bits))


def merge_indices(parts: Sequence[jax.Array], bits: Sequence[int] = AR_SUB_TOKEN_BITS
                  ) -> jax.Array:
    """The inverse of `split_indices`: sub-tokens (lowest bits first) -> int32 codes."""
    if len(parts) != len(bits):
        raise ValueError(f"merge_indices: {len(parts)} parts for {len(bits)} bit widths.")
    merged, offset = jnp.zeros(jnp.shape(parts[0]), jnp.int32), 0
    for part, width in zip(parts, bits):
        merged = merged | jnp.left_shift(jnp.asarray(part, jnp.int32), offset)
        offset += width
    return merged


# ------------------------------------------------------------------------------------------------
# The factorized entropy (spec §C.2 [derived]).


def _bit_log_probs(x: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """log P(bit = -1), log P(bit = +1) per channel: softmax over codes of 2<x,c>/τ gives
    P(+1) = e^{2x/τ} / (e^{2x/τ} + e^{-2x/τ}) = σ(4x/τ). log-sigmoids stay finite at any x."""
    logits = 4.0 * x / temperature
    return jax.nn.log_sigmoid(-logits), jax.nn.log_sigmoid(logits)


def sample_entropy(x: jax.Array, temperature: float) -> jax.Array:
    """Mean over tokens of the entropy of p (x [N, b]): the sum of the b bit entropies.

    Written as -(p0 log p0 + p1 log p1) rather than softplus(l) - l σ(l), which cancels at the
    |l| ~ 400 that τ = 0.01 gives."""
    log_p0, log_p1 = _bit_log_probs(x, temperature)
    bit_entropy = -(jnp.exp(log_p0) * log_p0 + jnp.exp(log_p1) * log_p1)
    return jnp.mean(jnp.sum(bit_entropy, axis=-1))


def group_distributions(x: jax.Array, temperature: float, group_bits: int) -> list[jax.Array]:
    """Per-token distributions [N, 2^g] over consecutive groups of `group_bits` bits (the last
    group holds the remainder), each little-endian within its group.

    log P[n, m] = sum over the group's bits of log P(bit value in m), as two matmuls against the
    constant bit table. Every summand is a log-probability (<= 0), so nothing cancels and exp()
    is accurate to a few float32 ulps where P matters (unlike sum log P(-1) + l @ bits, whose
    terms reach ±400 per bit at τ = 0.01)."""
    log_p0, log_p1 = _bit_log_probs(x, temperature)
    groups = []
    for start in range(0, x.shape[-1], group_bits):
        stop = min(start + group_bits, x.shape[-1])
        bits = _bit_table(stop - start)
        log_probs = (_exact_matmul(log_p0[:, start:stop], 1.0 - bits.T)
                     + _exact_matmul(log_p1[:, start:stop], bits.T))
        groups.append(jnp.exp(log_probs))
    return groups


def _bit_table(num_bits: int) -> np.ndarray:
    """float32 [2^num_bits, num_bits]: row m holds the bits of m, little-endian (a constant)."""
    return ((np.arange(2**num_bits)[:, None] >> np.arange(num_bits)) & 1).astype(np.float32)


def _exact_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    # HIGHEST: the GPU/TPU default (TF32/bf16 passes) would round at ~1e-3.
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def _weighted_joint_sum(weights: jax.Array, groups: list[jax.Array]) -> jax.Array:
    """sum_n weights[n] (groups[0][n] ⊗ ... ⊗ groups[-1][n]), flat and little-endian: [2^b].

    Two groups are one matmul. With more, it scans over the values of the top (most
    significant) group, folding each into the weights; the checkpointed body keeps only the
    weights column as residual, so the backward pass stays linear in N x 2^g too."""
    if len(groups) == 1:
        return _exact_matmul(weights, groups[0])
    if len(groups) == 2:
        low, high = groups
        joint = _exact_matmul((high * weights[:, None]).T, low)
        return joint.reshape(-1)  # [high value, low value] -> index high * 2^g_low + low

    rest, top = groups[:-1], groups[-1]

    @jax.checkpoint
    def one_top_value(top_column):
        return _weighted_joint_sum(weights * top_column, rest)

    return lax.map(one_top_value, top.T).reshape(-1)


def mean_distribution(x: jax.Array, temperature: float, group_bits: int) -> jax.Array:
    """p̄ [2^b]: the token-mean of the softmax over all 2^b codes, for x [N, b], exactly."""
    groups = group_distributions(x, temperature, group_bits)
    return _weighted_joint_sum(jnp.full((x.shape[0],), 1.0 / x.shape[0], jnp.float32), groups)


def batch_entropy(x: jax.Array, temperature: float, group_bits: int) -> jax.Array:
    """H(p̄) with the official log(p̄ + 1e-5) (spec §C.2), for x [N, b]."""
    mean_probs = mean_distribution(x, temperature, group_bits)
    return -jnp.sum(mean_probs * jnp.log(mean_probs + _BATCH_ENTROPY_EPS))


def entropy_terms(x: jax.Array, *, temperature: float, group_bits: int, num_groups: int = 1
                  ) -> tuple[jax.Array, jax.Array]:
    """(H_s, H_b) of tokens x [N, b] (float32).

    H_b is computed over `num_groups` contiguous equal groups of tokens and averaged, as
    InfoNCE's negatives (objectives/infonce.py): with the tokens sharded over devices, the number
    of shards reproduces the official per-GPU p̄; 1 is the whole batch."""
    x = jnp.asarray(x, jnp.float32)
    num_tokens, num_bits = x.shape
    if num_tokens % num_groups:
        raise ValueError(f"LFQ batch entropy: {num_tokens} tokens do not split into "
                         f"{num_groups} shards.")
    per_group = x.reshape(num_groups, num_tokens // num_groups, num_bits)
    group_entropy = jax.vmap(lambda t: batch_entropy(t, temperature, group_bits))(per_group)
    return sample_entropy(x, temperature), jnp.mean(group_entropy)


def data_shard_count() -> int:
    """The number of shards the batch is split into while tracing: the size of the mesh set by
    `jax.set_mesh` (the trainer splits the batch over all its axes, sharding.batch_sharding, and
    traces its step under it), 1 when none is set."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else math.prod(dict(mesh.shape).values())


# ------------------------------------------------------------------------------------------------
# The quantizer.


class LookupFreeQuantizer(nnx.Module):
    """Open-MAGVIT2's LFQ (spec §C.1-C.2): z [..., 1, b] -> sign bits, no parameters.

    Loss terms (unweighted): "commitment" mean((z - sg(q))^2) over elements; "entropy"
    sample_entropy_weight H_s - batch_entropy_weight H_b when `with_entropy`, else 0.

    batch_entropy_scope "shard" computes H_b per data shard and averages it: the shard count is
    read from the mesh the call is traced under (`data_shard_count`), because the quantizer's
    interface takes only z and the trainer traces its step under its mesh, whose devices split
    the batch (the same mesh-at-trace-time lookup as the sharded codebook search). Outside a mesh,
    or on one device, "shard" and "global" are identical.
    """

    def __init__(self, *, code_dim: int, codebook_size: int, num_codebooks: int = 1,
                 entropy_temperature: float = 0.01, sample_entropy_weight: float = 1.0,
                 batch_entropy_weight: float = 1.0, entropy_group_bits: int = 9,
                 batch_entropy_scope: str = "shard"):
        if num_codebooks != 1:
            raise ValueError(f"LFQ quantizes one latent (num_codebooks = 1, z [..., 1, b]); "
                             f"got num_codebooks={num_codebooks}.")
        if not 1 <= code_dim <= _MAX_BITS or codebook_size != 2**code_dim:
            raise ValueError(f"LFQ's codes are code_dim sign bits, so codebook_size must be "
                             f"2**code_dim with 1 <= code_dim <= {_MAX_BITS}; got code_dim="
                             f"{code_dim} and codebook_size={codebook_size}.")
        if entropy_group_bits < 1 or batch_entropy_scope not in ("shard", "global"):
            raise ValueError(f"LFQ needs entropy_group_bits >= 1 and batch_entropy_scope "
                             f"'shard' or 'global'; got {entropy_group_bits}, "
                             f"{batch_entropy_scope!r}.")
        self.num_codebooks = 1
        self.code_dim = code_dim
        self.codebook_size = codebook_size
        self.entropy_temperature = entropy_temperature
        self.sample_entropy_weight = sample_entropy_weight
        self.batch_entropy_weight = batch_entropy_weight
        self.entropy_group_bits = entropy_group_bits
        self.batch_entropy_scope = batch_entropy_scope

    @classmethod
    def from_config(cls, model_config, *, num_codebooks: int, shard_axis: str | None,
                    rngs: nnx.Rngs) -> "LookupFreeQuantizer":
        del shard_axis, rngs  # no codebook to shard, no parameters to draw
        lfq = model_config.lfq
        return cls(code_dim=model_config.code_dim, codebook_size=model_config.codebook_size,
                   num_codebooks=num_codebooks, entropy_temperature=lfq.entropy_temperature,
                   sample_entropy_weight=lfq.sample_entropy_weight,
                   batch_entropy_weight=lfq.batch_entropy_weight,
                   entropy_group_bits=lfq.entropy_group_bits,
                   batch_entropy_scope=lfq.batch_entropy_scope)

    @staticmethod
    def initial_values(model_config) -> dict:
        return {}  # nothing to load: the codebook is implicit

    def __call__(self, z: jax.Array, *, with_entropy: bool = False) -> QuantizerOutput:
        """Quantizes z [..., 1, b] (any float dtype; computed in float32)."""
        if tuple(z.shape[-2:]) != (1, self.code_dim):
            raise ValueError(f"LookupFreeQuantizer expects z [..., 1, {self.code_dim}]; got "
                             f"{tuple(z.shape)}")
        z = jnp.asarray(z, jnp.float32)
        positive = z > 0
        # spec §C.1: +1 if x > 0 else -1 (0 maps to -1), straight-through to z.
        signs = jnp.where(positive, 1.0, -1.0).astype(jnp.float32)
        indices = bits_to_indices(positive)
        commitment = jnp.mean((z - lax.stop_gradient(signs)) ** 2)
        entropy = self._entropy(z) if with_entropy else jnp.zeros((), jnp.float32)
        return QuantizerOutput(
            quantized=straight_through(z, signs),
            indices=indices,
            losses={"commitment": commitment, "entropy": entropy},
            stats=health_stats(indices, self.codebook_size),
        )

    def _entropy(self, z: jax.Array) -> jax.Array:
        num_groups = data_shard_count() if self.batch_entropy_scope == "shard" else 1
        sample, batch = entropy_terms(
            z.reshape(-1, self.code_dim), temperature=self.entropy_temperature,
            group_bits=self.entropy_group_bits, num_groups=num_groups)
        return self.sample_entropy_weight * sample - self.batch_entropy_weight * batch

    @staticmethod
    def loss_weights(loss_config) -> dict[str, float]:
        """Open-MAGVIT2: commitment 0.25 and entropy 0.1 (spec §C.3; configs/lfq.py)."""
        return {"commitment": loss_config.commitment_beta,
                "entropy": loss_config.entropy_weight}

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Int codes [..., 1] -> their ±1 vectors [..., 1, b], float32, same bit order."""
        indices = jnp.asarray(indices, jnp.int32)
        if indices.shape[-1:] != (1,):
            raise ValueError(f"lookup expects indices [..., 1]; got {indices.shape}")
        return jnp.where(indices_to_bits(indices, self.code_dim), 1.0, -1.0).astype(jnp.float32)
