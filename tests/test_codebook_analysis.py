"""Tests of the per-sub-codebook analysis (FQGAN Figures 3 and 4) on a tiny FQGAN-Dual."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from fqgan_jax.data import pixels
from fqgan_jax.eval import codebook_analysis as ca
from fqgan_jax.models import Tokenizer

# The sizes of tests/test_models.py's TINY: 16 px images, 8x8 tokens, k=2 sub-codebooks of 64.
TINY = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, dropout=0.0,
            adapter_layers=1, adapter_heads=2, adapter_mlp_ratio=2.0, codebook_size=64,
            code_dim=4, l2_normalize=True, entropy_temperature=0.01, search_memory_mb=1,
            dtype="float32")
BATCH, SIZE = 2, 16


@pytest.fixture(scope="module")
def model():
    return Tokenizer(**TINY, branches=("vis", "sem"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (BATCH, SIZE, SIZE, 3), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def recon(model, images):
    return ca.single_codebook_reconstructions(model, images)


def random_codes(shape=(2, 3, 3, 2, 4), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


# ------------------------------------------------------------------------------------------------
# only_codebook
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_only_codebook_zeros_keeps_one_subcode_exactly(index):
    codes = random_codes()
    out = ca.only_codebook(codes, index)
    assert out.shape == codes.shape and out.dtype == codes.dtype
    np.testing.assert_array_equal(out[..., index, :], codes[..., index, :])
    np.testing.assert_array_equal(out[..., 1 - index, :], 0.0)


def test_only_codebook_mean_fills_with_batch_mean_code():
    codes = random_codes()
    out = ca.only_codebook(codes, 0, fill="mean")
    np.testing.assert_array_equal(out[..., 0, :], codes[..., 0, :])
    mean_code = np.mean(np.asarray(codes[..., 1, :]).reshape(-1, 4), axis=0)
    np.testing.assert_allclose(out[..., 1, :], np.broadcast_to(mean_code, out[..., 1, :].shape),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("index", [-1, 2, 1.0])
def test_only_codebook_rejects_bad_index(index):
    with pytest.raises(ValueError, match="index"):
        ca.only_codebook(random_codes(), index)


def test_only_codebook_rejects_unknown_fill():
    with pytest.raises(ValueError, match="fill 'median'"):
        ca.only_codebook(random_codes(), 0, fill="median")


# ------------------------------------------------------------------------------------------------
# Single-sub-codebook reconstructions (Figure 3)
# ------------------------------------------------------------------------------------------------


def test_row_zero_is_the_full_reconstruction(model, images, recon):
    assert recon.shape == (model.num_codebooks + 1, BATCH, SIZE, SIZE, 3)
    assert recon.dtype == jnp.float32
    np.testing.assert_allclose(recon[0], model(images)[0], rtol=1e-5, atol=1e-5)


def test_only_rows_decode_codes_with_the_other_subcode_zeroed(model, images, recon):
    codes = model.encode(images).quantized
    for i in range(model.num_codebooks):
        other = 1 - i
        expected = model.decode_codes(codes.at[..., other, :].set(0.0))
        np.testing.assert_allclose(recon[1 + i], expected, rtol=1e-5, atol=1e-5)
    # Each sub-codebook alone carries different information.
    assert float(jnp.max(jnp.abs(recon[1] - recon[2]))) > 1e-3
    assert float(jnp.max(jnp.abs(recon[0] - recon[1]))) > 1e-3


def test_zero_fill_acts_before_post_quant_conv(model, images):
    """post_quant_conv is affine, so the two single-code inputs sum to the full one plus a bias:
    this holds only if the masking happens on the codes, before the conv (bias kept once each)."""
    codes = model.encode(images).quantized
    conv = model.post_quant_conv

    def conv_of(c):
        return conv(c.reshape(*c.shape[:-2], -1))

    total = conv_of(ca.only_codebook(codes, 0)) + conv_of(ca.only_codebook(codes, 1))
    np.testing.assert_allclose(total - conv.bias[...], conv_of(codes), rtol=1e-5, atol=1e-5)


def test_jitted_step_matches_eager_uint8(model, images, recon):
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    step = jax.jit(functools.partial(ca.single_codebook_step, graphdef=graphdef, fill="zeros"))
    images_u8 = pixels.to_uint8(images)
    out = step(params, model_state, images_u8)
    assert out.shape == recon.shape and out.dtype == jnp.uint8
    eager = pixels.to_uint8(
        ca.single_codebook_reconstructions(model, images_u8.astype(jnp.float32) / 127.5 - 1.0))
    # Fused XLA arithmetic may move a value across a rounding boundary: at most one level.
    assert int(jnp.max(jnp.abs(out.astype(jnp.int32) - eager.astype(jnp.int32)))) <= 1


def test_mean_fill_reconstructions_differ_from_zero_fill(model, images, recon):
    mean_recon = ca.single_codebook_reconstructions(model, images, fill="mean")
    np.testing.assert_allclose(mean_recon[0], recon[0], rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(mean_recon[1] - recon[1]))) > 1e-3


def test_grid_layout_rows_are_images_columns_are_variants():
    k, height, width, pad = 2, 5, 7, 2
    rng = np.random.default_rng(0)
    originals = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    recon = rng.integers(0, 256, (k + 1, 3, height, width, 3), dtype=np.uint8)
    grid = ca.single_codebook_grid(originals, recon, padding=pad)
    assert grid.dtype == np.uint8
    assert grid.shape == (3 * (height + pad) + pad, (k + 2) * (width + pad) + pad, 3)
    for b in range(3):
        top = pad + b * (height + pad)
        cell = grid[top:top + height, pad:pad + width]
        np.testing.assert_array_equal(cell, originals[b])
        for column in range(k + 1):
            left = pad + (column + 1) * (width + pad)
            np.testing.assert_array_equal(grid[top:top + height, left:left + width],
                                          recon[column, b])


def test_grid_rejects_mismatched_shapes():
    originals = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="recon"):
        ca.single_codebook_grid(originals, np.zeros((3, 1, 4, 4, 3), np.uint8))


# ------------------------------------------------------------------------------------------------
# Codebook points and t-SNE (Figure 4)
# ------------------------------------------------------------------------------------------------


def test_decoder_codebook_is_what_lookup_returns(model, images):
    codebook = ca.decoder_codebook(model)
    assert codebook.shape == (2, TINY["codebook_size"], TINY["code_dim"])
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=-1), 1.0, rtol=1e-5)
    quantized = model.encode(images)
    indices = np.asarray(quantized.indices)
    for i in range(2):
        np.testing.assert_allclose(codebook[i][indices[..., i]], quantized.quantized[..., i, :],
                                   rtol=1e-6, atol=1e-6)


def test_codebook_points_is_deterministic_and_capped():
    codebook = np.random.default_rng(0).normal(size=(2, 50, 3))
    points, labels = ca.codebook_points(codebook, 10, seed=3)
    again, again_labels = ca.codebook_points(codebook, 10, seed=3)
    np.testing.assert_array_equal(points, again)
    np.testing.assert_array_equal(labels, again_labels)
    assert points.shape == (20, 3) and np.bincount(labels).tolist() == [10, 10]
    for i in range(2):  # every selected point is an entry of its own sub-codebook
        chosen = points[labels == i]
        assert all(np.any(np.all(codebook[i] == p, axis=-1)) for p in chosen)
    other, _ = ca.codebook_points(codebook, 10, seed=4)
    assert not np.array_equal(points, other)


def test_codebook_points_respects_used():
    codebook = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
    used = np.zeros((2, 6), bool)
    used[0, [1, 4]] = True
    used[1, [0, 2, 3, 5]] = True
    points, labels = ca.codebook_points(codebook, 3, seed=0, used=used)
    np.testing.assert_array_equal(points[labels == 0, 0], [1.0, 4.0])
    chosen = points[labels == 1, 0] - 6
    assert len(chosen) == 3 and set(chosen.tolist()) <= {0.0, 2.0, 3.0, 5.0}
    with pytest.raises(ValueError, match="used"):
        ca.codebook_points(codebook, 3, seed=0, used=used[:1])


def test_tsne_png_writes_png_with_clamped_perplexity(tmp_path):
    codebook = np.random.default_rng(0).normal(size=(2, 10, 4)).astype(np.float32)
    path = tmp_path / "nested" / "tsne.png"
    # 20 points < the default perplexity of 30: must be clamped, not rejected by sklearn.
    embedding, labels = ca.tsne_png(codebook, ["vis", "sem"], path)
    assert embedding.shape == (20, 2) and np.all(np.isfinite(embedding))
    np.testing.assert_array_equal(np.bincount(labels), [10, 10])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_tsne_png_rejects_too_few_points(tmp_path):
    codebook = np.zeros((2, 10, 4), np.float32)
    used = np.ones((2, 10), bool)
    used[1] = False
    used[1, 3] = True
    with pytest.raises(ValueError, match="at least 2 points"):
        ca.tsne_png(codebook, ["vis", "sem"], tmp_path / "x.png", used=used)
    with pytest.raises(ValueError, match="names"):
        ca.tsne_png(codebook, ["vis"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
