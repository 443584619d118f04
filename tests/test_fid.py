"""FID and Inception Score: parity with pytorch-fid and improved-gan, streaming on a sharded mesh
equal to the one-shot float64 computation, and the reference-statistics file errors."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from torch_reference import import_torchvision

from fqgan_jax.eval import fid, inception_score


def feature_sets(n=600, dim=48, seed=0):
    """Two correlated, offset feature sets, like pool3 (non-negative, mean far from 0)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    a = np.abs(rng.normal(size=(n, dim)) @ mix) + 3.0
    b = np.abs(rng.normal(size=(n, dim)) @ (mix + 0.1 * rng.normal(size=(dim, dim)))) + 3.2
    return a, b


@pytest.mark.parametrize("method", fid.METHODS)
def test_frechet_distance_equals_pytorch_fid(method):
    import_torchvision()
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = feature_sets()
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    ours = fid.frechet_distance(*stats[0], *stats[1], method=method)
    theirs = calculate_frechet_distance(*stats[0], *stats[1])
    assert ours > 0.1
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert fid.frechet_distance(*stats[0], *stats[0], method=method) == pytest.approx(0, abs=1e-6)


def test_eigh_handles_fewer_images_than_features():
    a, b = feature_sets(n=10, dim=48)  # rank-9 covariances
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    eigh = fid.frechet_distance(*stats[0], *stats[1], method="eigh")
    np.testing.assert_allclose(eigh, fid.frechet_distance(*stats[0], *stats[1]), rtol=1e-4)
    assert abs(fid.frechet_distance(*stats[0], *stats[0], method="eigh")) < 1e-5


@functools.lru_cache
def sharded_updates(mesh_devices: int):
    """Jitted moment and IS updates over a batch split across `mesh_devices` devices."""
    mesh = jax.make_mesh((mesh_devices,), ("data",), devices=jax.devices()[:mesh_devices])
    batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    moments = jax.jit(fid.update_moments, in_shardings=(rep, batch, batch), out_shardings=rep)
    sums = jax.jit(inception_score.update_sums, in_shardings=(rep, batch, batch, batch, rep),
                   out_shardings=rep)
    return moments, sums


def padded_batches(n, batch_size, order_seed=None):
    """(rows, mask) of each batch over range(n); last batch padded; optionally shuffled."""
    batches = [np.arange(start, start + batch_size) for start in range(0, n, batch_size)]
    if order_seed is not None:
        np.random.default_rng(order_seed).shuffle(batches)
    return [(np.minimum(rows, n - 1), rows < n) for rows in batches]


def test_streamed_moments_on_8_devices_equal_one_shot_float64():
    update, _ = sharded_updates(8)
    a, b = feature_sets(n=1000)
    stats = []
    for features in (a, b):
        moments = fid.init_moments(features.shape[1])
        for rows, mask in padded_batches(len(features), 64):
            moments = update(moments, features[rows].astype(np.float32), mask)
        stats.append(fid.gaussian(moments))
    for (mu, sigma), features in zip(stats, (a, b)):
        exact = np.cov(np.float32(features).astype(np.float64), rowvar=False)
        np.testing.assert_allclose(mu, np.float32(features).astype(np.float64).mean(0),
                                   rtol=1e-6)
        np.testing.assert_allclose(sigma, exact, rtol=0, atol=1e-6 * np.abs(exact).max())
    one_shot = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    np.testing.assert_allclose(fid.frechet_distance(*stats[0], *stats[1]),
                               fid.frechet_distance(*one_shot[0], *one_shot[1]), rtol=1e-5)


def test_compensated_sum_keeps_what_float32_drops():
    add = jax.jit(fid.compensated_add)
    tiny = np.float32(1e-8)  # below half an ulp of 1.0 in float32
    acc = add(jax.numpy.zeros((2,), np.float32), np.float32(1.0))
    for _ in range(2000):
        acc = add(acc, tiny)
    assert float(acc[0]) == 1.0  # the plain float32 sum lost every one of them
    total = np.float64(acc[0]) + np.float64(acc[1])
    assert total == pytest.approx(1.0 + 2000 * np.float64(tiny), rel=1e-9)


def test_streamed_inception_score_equals_improved_gan_in_any_batch_order():
    _, update = sharded_updates(8)
    rng = np.random.default_rng(0)
    n, classes, splits = 203, 17, 10
    logits = (rng.normal(size=(n, classes)) * 2).astype(np.float32)
    probs = np.exp(logits.astype(np.float64))
    probs /= probs.sum(1, keepdims=True)
    starts = inception_score.split_starts(n, splits)
    sums = inception_score.init_sums(classes, splits)
    for rows, mask in padded_batches(n, 16, order_seed=1):
        sums = update(sums, logits[rows], mask, rows.astype(np.int32), starts)
    assert list(np.asarray(sums.count)) == [(i + 1) * n // splits - i * n // splits
                                            for i in range(splits)]
    mean, std = inception_score.score(sums)
    ref_mean, ref_std = inception_score.reference_score(probs, splits)
    assert mean > 1.5
    np.testing.assert_allclose([mean, std], [ref_mean, ref_std], rtol=1e-5)


def test_reference_stats_files(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4)
    fid.save_stats(str(tmp_path / "pytorch_fid.npz"), mu, sigma)
    np.testing.assert_array_equal(fid.load_stats(str(tmp_path / "pytorch_fid.npz"), 4)[1], sigma)
    adm = tmp_path / "adm.npz"  # an ADM reference batch: images and spatial stats beside mu/sigma
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu,
             sigma_s=sigma)
    np.testing.assert_array_equal(fid.load_stats(str(adm), 4)[0], mu)

    def error(path, dim=4):
        with pytest.raises(fid.FIDError) as info:
            fid.load_stats(str(path), dim)
        return str(info.value)

    assert "does not exist" in error(tmp_path / "missing.npz")
    assert "--save-stats" in error(tmp_path / "missing.npz")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert "holds images (arr_0)" in error(tmp_path / "images.npz")
    assert "pool3 has 2048" in error(tmp_path / "pytorch_fid.npz", dim=2048)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "not a readable .npz" in error(tmp_path / "junk.npz")
    np.savez(tmp_path / "nan.npz", mu=mu * np.nan, sigma=sigma)
    assert "non-finite" in error(tmp_path / "nan.npz")
