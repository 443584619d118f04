"""Device mesh and shardings.

The mesh has a `data` and an `fsdp` axis (`config.mesh.shape`, -1 = the rest). The batch is split
over both, since FSDP is data parallelism too. Each train-state leaf (params, optimizer moments,
EMA, discriminator) goes by the first of `config.mesh.rules` whose regex matches its path, else by
the FSDP rule: its largest dimension that the `fsdp` axis divides is split over that axis, and
leaves under `config.mesh.fsdp_min_size` elements stay replicated. Optimizer moments have their
params' shapes, so they follow their params. The compiler gathers a sharded weight where a layer
uses it and reduce-scatters its gradient. One code path serves one CPU device, a GPU node and a
TPU pod: only the mesh changes. Meshes use `AxisType.Auto` so that the compiler propagates
shardings inside the step (spec jax_stack.md §2.2).
"""

from __future__ import annotations

import math
import re

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def mesh_shape(shape: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to the remaining devices and checks the product."""
    shape = tuple(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"config.mesh.shape={shape} may contain at most one -1.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"config.mesh.shape={shape} does not divide {num_devices} devices.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"config.mesh.shape={shape} needs {math.prod(shape)} devices, "
                         f"but {num_devices} are available. Use -1 for 'the rest'.")
    return shape


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config.shape, len(devices))
    axes = tuple(mesh_config.axes)
    if len(axes) != len(shape):
        raise ValueError(f"config.mesh.axes={axes} and config.mesh.shape={shape} differ in length.")
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all mesh axes."""
    return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def frozen_sharding(leaf, mesh: Mesh, shard: bool, min_size: int = 2**16) -> NamedSharding:
    """A frozen weight's sharding: replicated, or with `shard` its largest dimension that the
    device count divides split over all mesh axes (small weights stay replicated)."""
    shape = getattr(leaf, "shape", ())
    if not shard or math.prod(shape) < min_size:
        return replicated(mesh)
    dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d])
            if shape[d] % mesh.size == 0]
    if not dims:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[dims[0]] = mesh.axis_names
    return NamedSharding(mesh, P(*spec))


FSDP_AXIS = "fsdp"


def fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
    """The largest dimension that the `fsdp` axis divides, split over it; small leaves, leaves
    with no such dimension, and meshes without (or with a size-1) `fsdp` axis: replicated."""
    size = dict(mesh.shape).get(FSDP_AXIS, 1)
    if size == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % size == 0:
            return P(*[FSDP_AXIS if d == dim else None for d in range(len(shape))])
    return P()


def rule_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules, min_size: int) -> P:
    """The PartitionSpec of the leaf at '/'-joined `path`: the first matching rule's (a tuple of
    mesh axis names or None, one per dimension; () = replicated), else `fsdp_spec`."""
    for pattern, spec in rules:
        if re.fullmatch(pattern, path):
            spec = tuple(spec)
            if spec and len(spec) != len(shape):
                raise ValueError(f"config.mesh.rules: {pattern!r} gives {spec} for {path} of "
                                 f"shape {shape}; it needs one entry per dimension.")
            # An axis this mesh lacks (a checkpoint restored onto another mesh) replicates.
            return P(*[axis if axis in mesh.axis_names else None for axis in spec])
    return fsdp_spec(shape, mesh, min_size)


def state_shardings(abstract_state, mesh: Mesh, mesh_config=None):
    """A NamedSharding for every leaf of the train state, by `mesh_config.rules` and
    `mesh_config.fsdp_min_size` (see the module docstring)."""
    rules = tuple(mesh_config.rules) if mesh_config is not None else ()
    min_size = mesh_config.fsdp_min_size if mesh_config is not None else 2**14

    def leaf_sharding(path, leaf):
        name = "/".join(_key_name(k) for k in path)
        return NamedSharding(mesh, rule_spec(name, tuple(getattr(leaf, "shape", ())), mesh,
                                             rules, min_size))
    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def gather_to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (batch-sharded) global array on every host. A collective when the
    array spans hosts: every process must call it."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Host-local numpy arrays -> global jax.Arrays (each host passes its own slice)."""
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}


def under_mesh(fn, mesh: Mesh):
    """`fn` called with `mesh` set (jax.set_mesh): a jitted function traces under it, so layers
    that look the mesh up by axis name (the sharded codebook search) find it."""
    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)
    return call
