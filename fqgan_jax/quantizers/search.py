"""Exact nearest-code search: memory-bounded on one device, and over a codebook split across
devices.

* `nearest_code`: z [N, d] against codebook [K, d] -> the lowest-index nearest code, a matmul plus
  an argmin that never builds a score block larger than `memory_budget_bytes`: above it the codebook
  is scanned in chunks (and rows blocked when even a minimal chunk is too big). At K = 262,144
  the N x K distance matrix of N = 16,384 tokens would be 16 GiB in float32 (spec
  large_codebooks.md §E.5.3).
* `plan_blocks`: that tiling, shared with the chunked entropy loss (entropy.py).
* `sharded_nearest_code`: the same search with the codebook's rows split over a mesh axis.
Nearest-code search over a codebook whose rows are split across devices (large K).

For K = 262,144 codes the codebook and its optimizer moments are worth sharding along K over the
mesh's `fsdp` axis (the FSDP rule does that, sharding.py). Gathering the whole codebook on every
device for the search would undo it, so the search runs where the rows are:

1. each device all-gathers the tokens of its `fsdp` group (they are batch-sharded over all axes),
2. searches them against its own K / F rows, chunked within the memory budget
   (`quantize.nearest_code_and_distance`), giving a local (distance, global index),
3. `pmin` over the `fsdp` axis picks the smallest distance, and a second `pmin` over the indices
   that reach it keeps the lowest index on ties (the unsharded search's rule),
4. each device keeps its own tokens' indices.

The result equals the unsharded search (tested at K = 65,536). The indices carry no gradient;
the codebook's gradient comes from the ordinary lookup `codebook[indices]`, which the compiler
partitions like any gather, so codebook gradients and usage counts are unchanged.

All search arithmetic runs in float32 at full matmul precision, whatever the model's compute dtype:
the official code runs the distance matmul under bf16 autocast (spec fqgan.md §7.2), and bf16
quantizers are a reported source of NaNs and of argmin flips.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fqgan_jax.sharding import FSDP_AXIS

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20

# A codebook chunk is never made smaller than this; below it we block over rows instead, because
# tiny chunks turn the scan into thousands of under-filled matmuls.
MIN_CODE_CHUNK = 128
# Block sizes are rounded to a multiple of this so matmul tiles stay aligned.
_BLOCK_ALIGN = 8
_FLOAT32_BYTES = 4

class BlockPlan(NamedTuple):
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


def plan_blocks(num_rows: int, codebook_size: int, memory_budget_bytes: int) -> BlockPlan:
    """Chooses the tiling so one float32 score block fits ``memory_budget_bytes``.

    The floor is one row by ``min(K, MIN_CODE_CHUNK)`` codes (512 bytes); budgets below that are
    rounded up to it.
    """
    max_elements = max(1, memory_budget_bytes // _FLOAT32_BYTES)
    if num_rows * codebook_size <= max_elements:
        return BlockPlan(num_rows, 1, codebook_size, 1)
    min_chunk = min(codebook_size, MIN_CODE_CHUNK)
    max_rows = num_rows if num_rows * min_chunk <= max_elements else max_elements // min_chunk
    row_block, num_row_blocks = _split_evenly(num_rows, max(1, max_rows))
    max_chunk = max(min_chunk, max_elements // row_block)
    chunk, num_chunks = _split_evenly(codebook_size, max_chunk)
    return BlockPlan(row_block, num_row_blocks, chunk, num_chunks)


def pad_leading(x: jax.Array, padded_size: int) -> jax.Array:
    """Zero-pads axis 0 of ``x`` to ``padded_size``; padded entries are masked by the callers."""
    pad = padded_size - x.shape[0]
    if pad == 0:
        return x
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))


def chunk_codebook(codebook: jax.Array, plan: BlockPlan) -> tuple[jax.Array, jax.Array]:
    """Returns codebook chunks [num_chunks, chunk, d] and each chunk's first code index."""
    padded = pad_leading(codebook, plan.num_chunks * plan.chunk)
    chunks = padded.reshape(plan.num_chunks, plan.chunk, codebook.shape[-1])
    offsets = jnp.arange(plan.num_chunks, dtype=jnp.int32) * plan.chunk
    return chunks, offsets


def check_rows_and_codebook(z: jax.Array, codebook: jax.Array, name: str) -> None:
    if z.ndim != 2 or codebook.ndim != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"{name} expects z [N, d] and codebook [K, d] with the same d; got z{z.shape} "
            f"and codebook{codebook.shape}. Use jax.vmap for a stack of sub-codebooks."
        )


def dot_rows(z: jax.Array, codes: jax.Array) -> jax.Array:
    """z [N, d] . codes [C, d]^T in true float32 (no TF32/bf16 passes on accelerators)."""
    return jnp.matmul(z, codes.T, precision=lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------------
# Nearest-code search.
# ------------------------------------------------------------------------------------------------

def _code_distances(z: jax.Array, codes: jax.Array, normalized: bool) -> jax.Array:
    """Distance up to a per-row constant: |c|^2 - 2 z.c, or -z.c for unit-norm z and codes."""
    dots = dot_rows(z, codes)
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
    distance lets searches over disjoint codebook shards be merged (`sharded_nearest_code`)."""
    check_rows_and_codebook(z, codebook, "nearest_code")
    # Indices are not differentiable; cutting the tangents keeps autodiff out of the scan.
    z = lax.stop_gradient(jnp.asarray(z, jnp.float32))
    codebook = lax.stop_gradient(jnp.asarray(codebook, jnp.float32))
    num_rows, codebook_size = z.shape[0], codebook.shape[0]
    plan = plan_blocks(num_rows, codebook_size, memory_budget_bytes)
    if plan.is_single_block:
        distances = _code_distances(z, codebook, normalized)
        return jnp.argmin(distances, axis=-1).astype(jnp.int32), jnp.min(distances, axis=-1)

    chunks, offsets = chunk_codebook(codebook, plan)
    search_rows = functools.partial(
        _search_code_chunks, chunks=chunks, offsets=offsets,
        codebook_size=codebook_size, normalized=normalized,
    )
    if plan.num_row_blocks == 1:
        distance, index = search_rows(z)
        return index, distance
    padded_rows = pad_leading(z, plan.num_row_blocks * plan.row_block)
    row_blocks = padded_rows.reshape(plan.num_row_blocks, plan.row_block, z.shape[1])
    distance, index = lax.map(search_rows, row_blocks)
    return index.reshape(-1)[:num_rows], distance.reshape(-1)[:num_rows]


# ------------------------------------------------------------------------------------------------
# The search over a codebook whose rows are split across devices.
# ------------------------------------------------------------------------------------------------

def context_axis_size(axis: str) -> int:
    """The size of `axis` in the mesh set by `jax.set_mesh` (1 when none is set or it lacks it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return dict(mesh.shape)[axis]


def sharded_nearest_code(z: jax.Array, codebook: jax.Array, *, axis: str = FSDP_AXIS,
                         normalized: bool = False,
                         memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                         mesh=None) -> jax.Array:
    """`nearest_code` with `codebook` [K, d] split along K over mesh `axis` and z [N, d]
    split along N over all mesh axes (`mesh`, default: the one set by `jax.set_mesh`). K and N
    must divide evenly."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or axis not in mesh.axis_names:
        raise ValueError(f"sharded_nearest_code needs a mesh with a {axis!r} axis (pass mesh= "
                         "or call inside `with jax.set_mesh(mesh):`).")
    size = dict(mesh.shape)[axis]
    if codebook.shape[0] % size or z.shape[0] % mesh.size:
        raise ValueError(f"K = {codebook.shape[0]} must divide by the {axis} axis ({size}) and "
                         f"N = {z.shape[0]} by the device count ({mesh.size}).")
    rows = P(tuple(mesh.axis_names), None)
    # Lay the operands out as the search wants them (a no-op when they already are).
    z = lax.with_sharding_constraint(z, jax.NamedSharding(mesh, rows))
    codebook = lax.with_sharding_constraint(codebook, jax.NamedSharding(mesh, P(axis, None)))
    search = functools.partial(_local_search, axis=axis, normalized=normalized,
                               memory_budget_bytes=memory_budget_bytes)
    # check_vma=False: the chunked search's scan carries start as per-device constants.
    return jax.shard_map(search, mesh=mesh, in_specs=(rows, P(axis, None)),
                         out_specs=P(tuple(mesh.axis_names)), check_vma=False)(z, codebook)


def _local_search(z, codebook, *, axis, normalized, memory_budget_bytes):
    """Per device: z [n, d] (its tokens), codebook [K / F, d] (its rows) -> int32 [n]."""
    group = lax.all_gather(z, axis, tiled=True)  # [n * F, d]: the tokens of this fsdp group
    index, distance = nearest_code_and_distance(
        group, codebook, normalized=normalized, memory_budget_bytes=memory_budget_bytes)
    shard = lax.axis_index(axis)
    index = index + shard * codebook.shape[0]
    best = lax.pmin(distance, axis)
    index = lax.pmin(jnp.where(distance == best, index, jnp.iinfo(jnp.int32).max), axis)
    return lax.dynamic_slice_in_dim(index, shard * z.shape[0], z.shape[0])
