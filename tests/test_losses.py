"""Disentanglement and reconstruction losses against hand computations (spec fqgan.md §2)."""

import jax
import jax.numpy as jnp
import numpy as np

from fqgan_jax.objectives import infonce, losses


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_disentangle_dual_matches_formula():
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(2, 3, 3, 2, 8)).astype(np.float32)
    a, b = _unit(codes[..., 0, :]), _unit(codes[..., 1, :])
    expected = np.mean(np.sum(a * b, -1) ** 2)
    np.testing.assert_allclose(losses.disentangle_loss(jnp.asarray(codes)), expected, rtol=1e-5)


def test_disentangle_triple_averages_three_pairs():
    rng = np.random.default_rng(1)
    codes = rng.normal(size=(4, 3, 8)).astype(np.float32)
    units = [_unit(codes[:, i]) for i in range(3)]
    pair = lambda i, j: np.mean(np.sum(units[i] * units[j], -1) ** 2)  # noqa: E731
    expected = (pair(0, 1) + pair(0, 2) + pair(1, 2)) / 3
    np.testing.assert_allclose(losses.disentangle_loss(jnp.asarray(codes)), expected, rtol=1e-5)


def test_disentangle_extremes_and_single_codebook():
    e = np.eye(8, dtype=np.float32)
    orthogonal = jnp.asarray(np.stack([e[0], e[1]])[None])
    parallel = jnp.asarray(np.stack([e[0], 3 * e[0]])[None])
    assert float(losses.disentangle_loss(orthogonal)) == 0.0
    np.testing.assert_allclose(losses.disentangle_loss(parallel), 1.0, rtol=1e-6)
    assert float(losses.disentangle_loss(jnp.ones((5, 1, 8)))) == 0.0


def test_disentangle_gradient_pushes_codes_apart():
    codes = jnp.asarray([[[1.0, 0.2], [0.9, 0.5]]])
    grad = jax.grad(losses.disentangle_loss)(codes)
    stepped = codes - 0.1 * grad
    assert losses.disentangle_loss(stepped) < losses.disentangle_loss(codes)


def test_reconstruction_l2_and_l1():
    x = jnp.asarray([[0.0, 1.0], [-1.0, 0.5]])
    y = jnp.asarray([[0.5, 1.0], [0.0, 0.0]])
    np.testing.assert_allclose(losses.reconstruction_loss(x, y, "l2"), (0.25 + 1 + 0.25) / 4)
    np.testing.assert_allclose(losses.reconstruction_loss(x, y, "l1"), (0.5 + 1 + 0.5) / 4)


def _info_nce_reference(pred, teacher):
    """spec fqgan.md §3.3, in numpy: -mean_i log(exp(p_i.t_i) / sum_j exp(p_i.t_j))."""
    p = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=-1, keepdims=True)
    logits = p @ t.T
    return -np.mean(np.diag(logits) - np.log(np.exp(logits).sum(-1)))


def test_info_nce_by_hand_global_and_per_group():
    rng = np.random.default_rng(0)
    pred, teacher = rng.normal(size=(8, 16)), rng.normal(size=(8, 16))
    np.testing.assert_allclose(infonce.info_nce_loss(pred, teacher), _info_nce_reference(
        pred, teacher), rtol=1e-5)
    # Per-shard negatives: the mean over groups of each group's own InfoNCE.
    per_group = np.mean([_info_nce_reference(pred[i:i + 2], teacher[i:i + 2])
                         for i in range(0, 8, 2)])
    np.testing.assert_allclose(infonce.info_nce_loss(pred, teacher, num_groups=4), per_group,
                               rtol=1e-5)


def test_info_nce_gradient_reaches_the_prediction_not_the_teacher():
    rng = np.random.default_rng(1)
    pred, teacher = jnp.asarray(rng.normal(size=(4, 8))), jnp.asarray(rng.normal(size=(4, 8)))
    g_pred, g_teacher = jax.grad(lambda p, t: infonce.info_nce_loss(p, t), argnums=(0, 1))(
        pred, teacher)
    assert np.abs(np.asarray(g_pred)).sum() > 0
    assert np.all(np.asarray(g_teacher) == 0)
    # Aligned pairs give a lower loss than shuffled ones; the bound is log(B) at random.
    assert float(infonce.info_nce_loss(teacher, teacher)) < float(
        infonce.info_nce_loss(teacher[::-1], teacher))
