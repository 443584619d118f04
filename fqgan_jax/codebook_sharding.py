"""Nearest-code search over a codebook whose rows are split across devices (large K).

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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from fqgan_jax import quantize


def context_axis_size(axis: str) -> int:
    """The size of `axis` in the mesh set by `jax.set_mesh` (1 when none is set or it lacks it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return 1
    return dict(mesh.shape)[axis]


def sharded_nearest_code(z: jax.Array, codebook: jax.Array, *, axis: str = "fsdp",
                         normalized: bool = False,
                         memory_budget_bytes: int = quantize.DEFAULT_MEMORY_BUDGET_BYTES,
                         mesh=None) -> jax.Array:
    """`quantize.nearest_code` with `codebook` [K, d] split along K over mesh `axis` and z [N, d]
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
    index, distance = quantize.nearest_code_and_distance(
        group, codebook, normalized=normalized, memory_budget_bytes=memory_budget_bytes)
    shard = lax.axis_index(axis)
    index = index + shard * codebook.shape[0]
    best = lax.pmin(distance, axis)
    index = lax.pmin(jnp.where(distance == best, index, jnp.iinfo(jnp.int32).max), axis)
    return lax.dynamic_slice_in_dim(index, shard * z.shape[0], z.shape[0])
