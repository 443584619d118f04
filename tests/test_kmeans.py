"""k-means on device (fqgan_jax/quantizers/kmeans.py), which initializes VQGAN-LC's codebook:
it finds well-separated clusters, its inertia never rises, a mesh or streamed chunks give the
single-device result, and empty clusters are re-seeded deterministically."""

import jax
import numpy as np
import pytest

from fqgan_jax.quantizers import kmeans


def blobs(num_blobs=6, dim=8, per_blob=60, spread=0.05, seed=0):
    """(points [N, D] float32, true centers [B, D], blob of each point), centers far apart
    and far from the origin (sums of raw coordinates would lose float32 precision)."""
    rng = np.random.default_rng(seed)
    centers = (rng.normal(size=(num_blobs, dim)) * 10 + 40).astype(np.float32)
    labels = np.repeat(np.arange(num_blobs), per_blob)
    points = centers[labels] + spread * rng.normal(size=(len(labels), dim))
    order = rng.permutation(len(labels))
    return points[order].astype(np.float32), centers, labels[order]


def test_recovers_well_separated_blobs():
    points, centers, labels = blobs()
    result = kmeans.kmeans(points, len(centers), num_iterations=20, seed=3)
    distance = ((result.centers[:, None] - centers[None]) ** 2).sum(-1)
    match = distance.argmin(axis=1)
    assert sorted(match) == list(range(len(centers)))  # one found center per blob
    for found, true in enumerate(match):  # each the mean of its blob's points
        np.testing.assert_allclose(result.centers[found], points[labels == true].mean(0),
                                   atol=1e-4)
    assert result.num_empty == 0 and result.num_iterations < 20  # converged: centers fixed
    np.testing.assert_allclose(result.inertia, result.inertia_history[-1], rtol=1e-6)


def test_inertia_never_increases():
    """Random-sample init (the official) on overlapping data takes many iterations."""
    rng = np.random.default_rng(1)
    points = (rng.normal(size=(600, 5)) + rng.integers(0, 3, (600, 1))).astype(np.float32)
    result = kmeans.kmeans(points, 24, num_iterations=15, seed=0, init="random")
    history = np.array(result.inertia_history + (result.inertia,))
    assert len(history) > 5
    assert np.all(np.diff(history) <= 1e-5 * history[:-1]), history


def test_a_mesh_and_streamed_chunks_give_the_single_device_result():
    points, centers, _ = blobs(num_blobs=5, per_blob=83, spread=1.0, seed=2)  # N = 415
    single = kmeans.kmeans(points, 7, num_iterations=8, seed=5)
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    for chunk_rows in (None, 100):  # resident, and streamed in 5 chunks of padded rows
        sharded = kmeans.kmeans(points, 7, num_iterations=8, seed=5, mesh=mesh,
                                chunk_rows=chunk_rows)
        np.testing.assert_allclose(sharded.centers, single.centers, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sharded.inertia_history, single.inertia_history, rtol=1e-5)
        assert sharded.num_iterations == single.num_iterations


def test_empty_clusters_take_the_farthest_points_in_order():
    rng = np.random.default_rng(3)
    points = np.concatenate([rng.normal(size=(50, 2)), [[20.0, 0.0]]]).astype(np.float32)
    start = np.array([[0, 0], [100, 100], [200, 200]], np.float32)  # 1 and 2 get no point
    first = kmeans.kmeans(points, 3, num_iterations=1, init=start)
    assert first.num_reseeded == 2
    np.testing.assert_array_equal(first.centers[1], [20.0, 0.0])  # the farthest point
    distances = ((points - start[0]) ** 2).sum(-1)
    np.testing.assert_array_equal(first.centers[2], points[np.argsort(-distances)[1]])
    again = kmeans.kmeans(points, 3, num_iterations=1, init=start)
    np.testing.assert_array_equal(again.centers, first.centers)  # deterministic
    assert kmeans.kmeans(points, 3, num_iterations=10, init=start).num_empty == 0


def test_fewer_distinct_points_than_clusters():
    points = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    result = kmeans.kmeans(points, 5, num_iterations=5, seed=0)
    assert np.all(np.isfinite(result.centers)) and result.inertia == 0
    assert result.num_empty == 2
    with pytest.raises(ValueError, match="5 clusters needs at least that many points; got 3"):
        kmeans.kmeans(points[:3], 5)


def test_bucket_sizes_pad_by_at_most_an_eighth():
    for rows in (1, 7, 100, 12_345, 20_800, 1_000_003):
        size = kmeans.bucket_size(rows)
        assert rows <= size <= rows * 9 / 8 + 1
    assert len({kmeans.bucket_size(n) for n in range(11_712, 20_801)}) <= 12
