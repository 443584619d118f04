"""Lloyd's k-means on device, for initializing VQGAN-LC's codebook (spec large_codebooks.md
§A.1.4, where the official clusters with kmeans_pytorch: Euclidean, random-sample init).

One iteration is an assignment pass and an update:

* assignment (`_chunk_stats`, jitted): each point's nearest center by the project's
  memory-bounded search (`pallas_search.search_function`: it never builds an N x K block larger
  than the budget, so K = 100,000 centers fit), then per-center sums and counts by
  `segment_sum`, the inertia, and the points farthest from their centers. With a mesh the points
  are split along N over its data axis (`shard_map`): each device does its rows and the sums,
  counts and inertia are `psum`-med, the farthest points gathered;
* update (`_update`, jitted): each center moves to the mean of its points. The sums are of
  offsets from the current center, so float32 keeps its precision when clusters sit far from
  the origin. An empty cluster is re-seeded, deterministically, at the farthest point of the
  pass not yet used (the i-th empty cluster in index order takes the i-th farthest point), as
  scikit-learn does.

Inertia (the sum of squared distances of points to their centers) never increases from one
iteration to the next: the mean minimizes each cluster's sum, a re-seeded center only adds an
option to the next assignment. The only randomness is the initialization, drawn from
`jax.random.key(seed)`, so results depend on the seed and the data only, not on the mesh (up to
float32 summation order):

* "kmeans++" (default): k-means++ D^2 seeding (Arthur & Vassilvitskii 2007) on a random sample
  of the points ("lite": max(4K, 16384) of them, so K = 100,000 stays affordable); it
  rarely puts two centers in one true cluster, where Lloyd cannot separate them again;
* "random": K distinct points drawn uniformly, kmeans_pytorch's init (the official recipe).

Points that fit the device stay there across iterations; larger sets (`chunk_rows` < N, e.g.
init_codebook's global clustering of 20M ImageNet features) are streamed from host memory (an
np.memmap works) in fixed-size chunks every iteration, so device memory is bounded by one chunk.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fqgan_jax.quantizers.pallas_search import search_function
from fqgan_jax.quantizers.search import DEFAULT_MEMORY_BUDGET_BYTES

DEFAULT_NUM_CANDIDATES = 1024  # farthest points kept per pass for re-seeding empty clusters


class KMeansResult(NamedTuple):
    centers: np.ndarray  # float32 [K, D]
    inertia: float  # sum of squared distances of the points to their nearest final center
    inertia_history: tuple[float, ...]  # the same at the assignment of each iteration
    num_iterations: int  # passes in inertia_history (fewer than asked once converged)
    num_reseeded: int  # empty clusters re-seeded over all iterations
    num_empty: int  # clusters with no point under the final centers


class _Stats(NamedTuple):
    """One assignment pass over some points (a pytree, summed over chunks and devices)."""
    sums: jax.Array  # float32 [K, D]: sums of (point - its center)
    counts: jax.Array  # float32 [K]
    inertia: jax.Array  # float32 scalar
    far_distances: jax.Array  # float32 [C]: the largest point-to-center distances, descending
    far_points: jax.Array  # float32 [C, D]: their points


def _local_stats(points, mask, centers, *, num_candidates: int,
                 memory_budget_bytes: int) -> _Stats:
    """The assignment pass over one device's points [n, D] (mask False: padding)."""
    points = points.astype(jnp.float32)
    search = search_function(None)
    nearest = search(points, centers, normalized=False, memory_budget_bytes=memory_budget_bytes)
    # Exact distances from the chosen centers (the search's are up to a per-row constant).
    distances = jnp.sum((points - centers[nearest]) ** 2, axis=-1)
    weights = mask.astype(jnp.float32)
    num_clusters = centers.shape[0]
    offsets = (points - centers[nearest]) * weights[:, None]
    sums = jax.ops.segment_sum(offsets, nearest, num_segments=num_clusters)
    counts = jax.ops.segment_sum(weights, nearest, num_segments=num_clusters)
    far, where = lax.top_k(jnp.where(mask, distances, -jnp.inf),
                           min(num_candidates, points.shape[0]))
    return _Stats(sums, counts, jnp.sum(distances * weights), far, points[where])


def _farthest(distances, points, num_candidates: int):
    """The `num_candidates` largest distances (descending) and their points."""
    far, where = lax.top_k(distances, min(num_candidates, distances.shape[0]))
    return far, points[where]


@functools.partial(jax.jit, static_argnames=("mesh", "axis", "num_candidates",
                                             "memory_budget_bytes"))
def _chunk_stats(points, mask, centers, *, mesh, axis: str, num_candidates: int,
                 memory_budget_bytes: int) -> _Stats:
    """The assignment pass over one chunk; with a mesh, over its rows split along `axis`."""
    local = functools.partial(_local_stats, num_candidates=num_candidates,
                              memory_budget_bytes=memory_budget_bytes)
    if mesh is None:
        return local(points, mask, centers)

    def per_device(points, mask, centers):
        stats = local(points, mask, centers)
        # The per-cluster sums are where the devices meet: one all-reduce each.
        far, far_points = _farthest(lax.all_gather(stats.far_distances, axis, tiled=True),
                                    lax.all_gather(stats.far_points, axis, tiled=True),
                                    num_candidates)
        return _Stats(lax.psum(stats.sums, axis), lax.psum(stats.counts, axis),
                      lax.psum(stats.inertia, axis), far, far_points)

    # check_vma=False: the search's scan carries per-device constants (as search.py).
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(axis), P(axis), P()),
                         out_specs=P(), check_vma=False)(points, mask, centers)


@functools.partial(jax.jit, static_argnames=("num_candidates",))
def _merge(a: _Stats, b: _Stats, *, num_candidates: int) -> _Stats:
    """The stats of two chunks' points together."""
    far, far_points = _farthest(jnp.concatenate([a.far_distances, b.far_distances]),
                                jnp.concatenate([a.far_points, b.far_points]), num_candidates)
    return _Stats(a.sums + b.sums, a.counts + b.counts, a.inertia + b.inertia, far, far_points)


@jax.jit
def _update(centers, stats: _Stats):
    """(new centers, clusters re-seeded): means of the assigned
    points; the i-th empty cluster (index order) takes the i-th farthest point, if it has one
    that is not already at its center (distance 0 would leave the cluster empty again)."""
    empty = stats.counts == 0
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, stats.far_distances.shape[0] - 1)
    available = jnp.cumsum(empty) <= stats.far_distances.shape[0]
    reseed = empty & available & (stats.far_distances[rank] > 0)
    means = centers + stats.sums / jnp.maximum(stats.counts, 1.0)[:, None]
    new = jnp.where(empty[:, None], jnp.where(reseed[:, None], stats.far_points[rank], centers),
                    means)
    return new, jnp.sum(reseed)


# ------------------------------------------------------------------------------------------------
# The host loop: chunks, initialization, iterations.


def bucket_size(num_rows: int) -> int:
    """`num_rows` rounded up so that nearby sizes share one compiled program (at most 1/8
    padding): per-class clustering sees ~1,000 different class sizes."""
    step = 1 << max(0, num_rows.bit_length() - 4)
    return -(-num_rows // step) * step


class _Chunks:
    """Fixed-shape, padded device chunks of host points [N, D]: resident when one chunk holds
    them all, else re-read (and re-sent) on every pass."""

    def __init__(self, features, chunk_rows: int | None, mesh, axis: str):
        self.features = features
        self.num_rows = len(features)
        shards = 1 if mesh is None else dict(mesh.shape)[axis]
        rows = self.num_rows if not chunk_rows else min(chunk_rows, self.num_rows)
        rows = bucket_size(rows)
        self.rows = -(-rows // shards) * shards
        self.sharding = None if mesh is None else NamedSharding(mesh, P(axis))
        self.resident = list(self._make()) if self.rows >= self.num_rows else None

    def __iter__(self):
        return iter(self.resident) if self.resident is not None else self._make()

    def _make(self):
        for start in range(0, self.num_rows, self.rows):
            block = np.asarray(self.features[start:start + self.rows])
            mask = np.zeros((self.rows,), bool)
            mask[:len(block)] = True
            padded = np.zeros((self.rows, block.shape[1]), block.dtype)
            padded[:len(block)] = block
            yield (jax.device_put(padded, self.sharding), jax.device_put(mask, self.sharding))


INITS = ("kmeans++", "random")


@functools.partial(jax.jit, static_argnames=("padded_rows", "num_samples"))
def _draw_rows(key: jax.Array, num_rows, *, padded_rows: int, num_samples: int) -> jax.Array:
    """`num_samples` distinct uniform indices below `num_rows` (traced, so all sizes in one
    bucket share a program: per-class clustering draws for ~1,000 class sizes)."""
    scores = jax.random.uniform(key, (padded_rows,))
    return lax.top_k(jnp.where(jnp.arange(padded_rows) < num_rows, scores, -1.0),
                     num_samples)[1]


def _sample_rows(features, num_samples: int, key: jax.Array) -> np.ndarray:
    """`num_samples` distinct rows of host `features`, in the drawn order, float32."""
    chosen = np.asarray(_draw_rows(key, len(features), padded_rows=bucket_size(len(features)),
                                   num_samples=num_samples))
    order = np.argsort(chosen)
    rows = np.empty((num_samples, np.shape(features)[1]), np.float32)
    rows[order] = np.asarray(features[chosen[order]], np.float32)  # sorted reads: memmaps
    return rows


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def kmeans_plus_plus(points: jax.Array, mask: jax.Array, key: jax.Array, num_clusters: int
                     ) -> jax.Array:
    """k-means++ seeding of points [M, D] (mask False: padding, never drawn): each next center
    is a point drawn with probability proportional to its squared distance to the nearest
    center so far (uniform once all are 0, i.e. fewer distinct points than centers)."""
    uniform = jnp.where(mask, 0.0, -jnp.inf)
    first_key, key = jax.random.split(key)
    first = points[jax.random.categorical(first_key, uniform)]
    centers = jnp.zeros((num_clusters, points.shape[1]), jnp.float32).at[0].set(first)
    nearest = jnp.where(mask, jnp.sum((points - first) ** 2, axis=-1), 0.0)

    def add_center(i, carry):
        centers, nearest, key = carry
        key, draw = jax.random.split(key)
        logits = jnp.where(jnp.any(nearest > 0), jnp.log(nearest), uniform)
        center = points[jax.random.categorical(draw, logits)]
        nearest = jnp.where(mask, jnp.minimum(nearest, jnp.sum((points - center) ** 2, -1)), 0.0)
        return centers.at[i].set(center), nearest, key

    return lax.fori_loop(1, num_clusters, add_center, (centers, nearest, key))[0]


def _seeding_sample(features, num_clusters: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(points, mask) that k-means++ seeds from: a random sample of max(4K, 16384) points, or
    all of them when there are fewer, zero-padded to a bucket size."""
    target = max(4 * num_clusters, 16384)
    if len(features) > target:
        return _sample_rows(features, target, key), np.ones((target,), bool)
    points = np.zeros((bucket_size(len(features)), np.shape(features)[1]), np.float32)
    points[:len(features)] = np.asarray(features, np.float32)
    return points, np.arange(len(points)) < len(features)


def initial_centers(features, num_clusters: int, key: jax.Array, init="kmeans++"
                    ) -> np.ndarray:
    """`num_clusters` float32 starting centers for host `features` [N, D] (module
    docstring), drawn with `key`; `init` may also be the centers themselves [K, D]."""
    if not isinstance(init, str):
        centers = np.asarray(init, np.float32)
        if centers.shape != (num_clusters, np.shape(features)[1]):
            raise ValueError(f"Initial centers of shape {centers.shape}; expected "
                             f"{(num_clusters, np.shape(features)[1])}.")
        return centers
    num_rows = len(features)
    if num_rows < num_clusters:
        raise ValueError(f"k-means with {num_clusters} clusters needs at least that many "
                         f"points; got {num_rows}.")
    if init not in INITS:
        raise ValueError(f"Unknown k-means init {init!r}; expected one of {INITS}.")
    sample_key, seed_key = jax.random.split(key)
    if init == "random":
        return _sample_rows(features, num_clusters, sample_key)
    points, mask = _seeding_sample(features, num_clusters, sample_key)
    return np.asarray(kmeans_plus_plus(points, mask, seed_key, num_clusters))


def assignment_pass(chunks, centers, *, mesh, axis, num_candidates, memory_budget_bytes
                    ) -> _Stats:
    """The stats of one pass over all chunks."""
    total = None
    for points, mask in chunks:
        stats = _chunk_stats(points, mask, centers, mesh=mesh, axis=axis,
                             num_candidates=num_candidates,
                             memory_budget_bytes=memory_budget_bytes)
        total = stats if total is None else _merge(total, stats, num_candidates=num_candidates)
    return total


def kmeans(features, num_clusters: int, *, num_iterations: int = 20, seed: int = 0,
           mesh: jax.sharding.Mesh | None = None, axis: str = "data",
           chunk_rows: int | None = None, tol: float = 1e-6, init="kmeans++",
           num_candidates: int = DEFAULT_NUM_CANDIDATES,
           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
           log_every: int = 0) -> KMeansResult:
    """Lloyd's k-means of host or device `features` [N, D] (any float dtype) into
    `num_clusters` centers, seeded by `init` ("kmeans++" | "random" | the centers [K, D]): at
    most `num_iterations` iterations, stopping early once an iteration lowers the inertia by
    no more than the fraction `tol` (Lloyd has then converged; float32 rounding keeps the
    centers wobbling in the last bit, so an exact fixed point is not waited for).
    With `mesh`, the rows are split over its `axis`; `chunk_rows` (default: all) bounds the
    rows on device at once. See the module docstring."""
    if num_iterations < 0:
        raise ValueError(f"num_iterations must be >= 0, got {num_iterations}.")
    if mesh is not None and axis not in mesh.axis_names:
        raise ValueError(f"k-means shards points over mesh axis {axis!r}, which the mesh "
                         f"{dict(mesh.shape)} lacks.")
    chunks = _Chunks(features, chunk_rows, mesh, axis)
    centers = jnp.asarray(initial_centers(features, num_clusters, jax.random.key(seed), init))
    replicated = None if mesh is None else NamedSharding(mesh, P())
    centers = jax.device_put(centers, replicated) if replicated is not None else centers
    run_pass = functools.partial(assignment_pass, chunks, mesh=mesh, axis=axis,
                                 num_candidates=num_candidates,
                                 memory_budget_bytes=memory_budget_bytes)
    history, reseeded, final, start = [], 0, None, time.time()
    for iteration in range(1, num_iterations + 1):
        stats = run_pass(centers)
        history.append(float(stats.inertia))
        if len(history) > 1 and history[-1] >= history[-2] * (1.0 - tol):
            final = stats  # converged: these centers are the result
            break
        centers, count = _update(centers, stats)
        reseeded += int(count)
        if log_every and (iteration % log_every == 0 or iteration == num_iterations):
            logging.info("k-means iteration %d/%d: inertia %.6g, %d re-seeded, %.1f s",
                         iteration, num_iterations, history[-1], int(count),
                         time.time() - start)
    final = final or run_pass(centers)
    return KMeansResult(centers=np.asarray(centers), inertia=float(final.inertia),
                        inertia_history=tuple(history), num_iterations=len(history),
                        num_reseeded=reseeded, num_empty=int(jnp.sum(final.counts == 0)))
