"""Device mesh and shardings.

The batch is sharded over every mesh axis; the train state is replicated. One code path serves one
CPU device, a GPU node and a TPU pod: only the mesh changes. Meshes use `AxisType.Auto` so that
the compiler propagates shardings inside the step (spec jax_stack.md §2.2).
"""

from __future__ import annotations

import math

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


def state_shardings(abstract_state, mesh: Mesh):
    """Shardings for every leaf of the train state: replicated (FSDP rules plug in here)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def to_global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
    """Host-local numpy arrays -> global jax.Arrays (each host passes its own slice)."""
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in local_batch.items()}
