"""Tests of the tokenizer models: official parameter names/counts, shapes, composition, dtypes.

Full-size models are only ever built abstractly (`nnx.eval_shape`); everything that runs uses
tiny configs (ch 32, 16-32 px images, 64 codes).
"""

from __future__ import annotations

import ast
import functools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fqgan_jax import config_lib
from fqgan_jax.models import FactorizedAdapter, Tokenizer, official_key_to_path
from fqgan_jax.models.layers import Downsample, ResnetBlock, Upsample, dot_product_attention

OFFICIAL_KEYS = pathlib.Path("/work/shared/spec/official_keys_tokenizer.tsv")
DUAL, TRIPLE, LLAMAGEN = ("vis", "sem"), ("vis", "sem_mid", "sem_high"), ("vq",)

FULL_SIZE = dict(image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 z_channels=256, dropout=0.0, adapter_layers=6, adapter_heads=8,
                 adapter_mlp_ratio=4.0, codebook_size=16384, code_dim=8, l2_normalize=True,
                 entropy_temperature=0.01, search_memory_mb=256, dtype="float32")
TINY = dict(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, dropout=0.0,
            adapter_layers=1, adapter_heads=2, adapter_mlp_ratio=2.0, codebook_size=64,
            code_dim=4, l2_normalize=True, entropy_temperature=0.01, search_memory_mb=1,
            dtype="float32")


@functools.lru_cache(maxsize=None)
def tiny_model(branches=DUAL, seed=0, **overrides) -> Tokenizer:
    """Cached; tests that mutate a model must work on an nnx.clone of it."""
    return Tokenizer(**{**TINY, "branches": branches, **overrides}, rngs=nnx.Rngs(seed))


def images(batch=2, size=16, seed=1) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1, maxval=1)


def flat_params(model) -> dict[tuple, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def official_section(title: str) -> tuple[list[tuple[str, str, tuple]], int]:
    """Rows (key, param|buffer, torch shape) and the header's param total for one model."""
    rows, total, inside = [], None, False
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if line.startswith("###"):
            inside = line.startswith(f"### {title}:")
            if inside:
                total = int(re.search(r"([\d,]+) params", line).group(1).replace(",", ""))
        elif inside and line.strip():
            key, kind, shape = line.split("\t")
            rows.append((key, kind, tuple(ast.literal_eval(shape))))
    assert rows, f"section {title!r} not found"
    return rows, total


def is_excluded(key: str, kind: str) -> bool:
    """Buffers (codebook_used)."""
    return kind == "buffer"


def flax_shape(key: str, torch_shape: tuple) -> tuple:
    """The layout a converter produces: conv OIHW -> HWIO, Linear (out, in) -> (in, out)."""
    if len(torch_shape) == 4:
        out_ch, in_ch, kh, kw = torch_shape
        return (kh, kw, in_ch, out_ch)
    if len(torch_shape) == 2 and not key.endswith(("positional_embedding", "class_embedding",
                                                   "embedding.weight")):
        return torch_shape[::-1]
    return torch_shape


# Teacher widths (spec §3.1): CLIP L/14 for Dual's sem; DINOv2-S and CLIP B/16 for Triple.
DUAL_TEACHERS = {"sem": 1024}
TRIPLE_TEACHERS = {"sem_mid": 384, "sem_high": 768}


@pytest.mark.parametrize("title, branches, overrides", [
    ("llamagen_vq_model VQ-16", LLAMAGEN, dict(adapter_layers=0)),
    ("vq_model_dual VQ-16", DUAL, dict(teacher_widths=DUAL_TEACHERS)),
    ("vq_model_triple VQ-16", TRIPLE, dict(teacher_widths=TRIPLE_TEACHERS)),
    ("vq_model_dual VQ-8", DUAL, dict(ch_mult=(1, 2, 2, 4), teacher_widths=DUAL_TEACHERS)),
    ("vq_model_triple VQ-8", TRIPLE, dict(ch_mult=(1, 2, 2, 4),
                                          teacher_widths=TRIPLE_TEACHERS)),
])
def test_every_official_key_maps_to_a_param(title, branches, overrides):
    """Every official parameter, the feature-prediction heads included, fills exactly one of
    ours with its shape, and the totals equal the TSV headers."""
    model = nnx.eval_shape(lambda: Tokenizer(**{**FULL_SIZE, "branches": branches, **overrides},
                                             rngs=nnx.Rngs(0)))
    params = flat_params(model)
    rows, official_total = official_section(title)
    filled = {path: [] for path in params}
    for key, kind, torch_shape in rows:
        if is_excluded(key, kind):
            continue
        path, index = official_key_to_path(key, branches)
        assert path in params, f"{key} -> {path} is not a parameter"
        shape = params[path].shape if index is None else params[path].shape[1:]
        assert shape == flax_shape(key, torch_shape), key
        assert math.prod(shape) == math.prod(torch_shape), key
        filled[path].append(index)
    # A bijection: each param filled exactly once, the stacked codebook once per branch.
    for path, indices in filled.items():
        expected = list(range(len(branches))) if path == ("quantize", "codebook") else [None]
        assert sorted(indices, key=str) == expected, (path, indices)
    excluded = sum(math.prod(shape) for key, kind, shape in rows
                   if kind == "param" and is_excluded(key, kind))
    ours = sum(math.prod(v.shape) for v in params.values())
    assert ours == official_total - excluded
    if branches == LLAMAGEN:
        assert ours == 71_883_403


def test_official_names_of_single_params():
    assert official_key_to_path("encoder.visual_head.0.transformer.3.attn.in_proj_weight",
                                DUAL) == (("branches", "vis", "adapter", "transformer", 3, "attn",
                                           "in_proj", "kernel"), None)
    assert official_key_to_path("encoder.norm_out_sem_high.weight", TRIPLE) == (
        ("branches", "sem_high", "norm_out", "scale"), None)
    assert official_key_to_path("quantize_sem.embedding.weight", DUAL) == (
        ("quantize", "codebook"), 1)
    assert official_key_to_path("quant_conv.bias", LLAMAGEN) == (
        ("branches", "vq", "quant_conv", "bias"), None)
    assert official_key_to_path("decoder.conv_blocks.0.attn.2.proj_out.weight", DUAL) == (
        ("decoder", "conv_blocks", 0, "attn", 2, "proj_out", "kernel"), None)
    assert official_key_to_path("feat_pred_head.upscale.2.weight", DUAL) == (
        ("feat_pred_heads", "sem", "upscale", 2, "kernel"), None)
    assert official_key_to_path("mid_sem_feat_pred.transformer.1.ln_2.weight", TRIPLE) == (
        ("feat_pred_heads", "sem_mid", "transformer", 1, "ln_2", "scale"), None)
    assert official_key_to_path("high_sem_feat_pred.class_embedding", TRIPLE) == (
        ("feat_pred_heads", "sem_high", "class_embedding"), None)


@pytest.mark.parametrize("branches, ch_mult", [(LLAMAGEN, (1, 2)), (DUAL, (1, 2, 2)),
                                               (TRIPLE, (1, 2))])
def test_encode_decode_shapes(branches, ch_mult):
    model = tiny_model(branches, ch_mult=ch_mult, adapter_layers=int(branches != LLAMAGEN))
    k, grid = len(branches), model.latent_size(16)
    assert (model.num_codebooks, grid) == (k, 16 // 2 ** (len(ch_mult) - 1))
    quantized = model.encode(images())
    assert quantized.indices.shape == (2, grid, grid, k)
    assert quantized.indices.dtype == jnp.int32
    assert quantized.quantized.shape == (2, grid, grid, k, TINY["code_dim"])
    recon = model.decode_indices(quantized.indices)
    assert recon.shape == (2, 16, 16, 3) and recon.dtype == jnp.float32


def test_adapter_positions_resize_to_the_input_grid():
    adapter = FactorizedAdapter(width=32, grid_size=4, num_layers=1, num_heads=2, mlp_ratio=2.0,
                                dtype=jnp.float32, rngs=nnx.Rngs(0))
    table = adapter.positional_embedding[...]
    np.testing.assert_array_equal(adapter.positions(4, 4), table)  # configured grid: as is
    # Bilinear resize of a table that is constant per channel leaves it constant.
    adapter.positional_embedding[...] = jnp.broadcast_to(table[:1], table.shape)
    np.testing.assert_allclose(adapter.positions(7, 3), jnp.broadcast_to(table[:1], (21, 32)),
                               rtol=1e-6)
    # Doubling the grid keeps the mean of each channel (half-pixel centres, no antialias).
    adapter.positional_embedding[...] = table
    np.testing.assert_allclose(adapter.positions(8, 8).mean(0), table.mean(0), atol=1e-6)
    for height, width in [(4, 4), (6, 6), (3, 5)]:  # also non-square grids
        out = adapter(jnp.ones((2, height, width, 32)))
        assert out.shape == (2, height, width, 32) and bool(jnp.all(jnp.isfinite(out)))


def test_tokenizer_runs_at_an_unconfigured_image_size():
    model = tiny_model(DUAL)  # adapters sized for 16 px (8 x 8 tokens)
    recon, quantized = model(images(size=24))
    assert recon.shape == (2, 24, 24, 3)
    assert quantized.indices.shape == (2, 12, 12, 2)


def test_single_branch_without_adapter_is_plain_llamagen():
    model = tiny_model(LLAMAGEN, adapter_layers=0)
    branch = model.branches["vq"]
    assert branch.adapter is None
    x = images()
    h = model.encoder(x)
    z = branch.quant_conv(branch.conv_out(jax.nn.silu(branch.norm_out(h))))
    quantized = model.quantize(z[..., None, :])
    expected = model.decoder(model.post_quant_conv(quantized.quantized[..., 0, :]))
    recon, ours = model(x)
    np.testing.assert_array_equal(ours.indices, quantized.indices)
    np.testing.assert_allclose(recon, expected, rtol=1e-6, atol=1e-6)


def test_branches_are_independent():
    model = nnx.clone(tiny_model(TRIPLE))
    x = images()
    before = model.encode(x)
    branch_state = nnx.state(model.branches["sem_mid"], nnx.Param)
    noise = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(jax.random.key(3), p.shape),
                         branch_state)
    nnx.update(model.branches["sem_mid"], noise)
    after = model.encode(x)
    for i in (0, 2):  # vis and sem_high: bit-identical
        np.testing.assert_array_equal(after.indices[..., i], before.indices[..., i])
        np.testing.assert_array_equal(after.quantized[..., i, :], before.quantized[..., i, :])
    assert bool(jnp.any(after.indices[..., 1] != before.indices[..., 1]))


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    model = tiny_model(DUAL, dtype="bfloat16")
    assert all(v.dtype == jnp.float32 for v in flat_params(model).values())
    x = images()
    assert model.encoder(x).dtype == jnp.bfloat16  # compute really is bf16
    assert model.encode_latents(x).dtype == jnp.float32  # the quantizer sees float32
    recon, quantized = model(x)
    assert recon.dtype == jnp.float32 and quantized.quantized.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(recon)))


def test_decode_indices_matches_the_forward_reconstruction():
    model = tiny_model(TRIPLE)
    x = images()
    recon, _ = model(x)
    np.testing.assert_array_equal(model.decode_indices(model.encode(x).indices), recon)


def test_reconstruction_gradient_reaches_every_parameter_but_the_codebook():
    model = tiny_model(DUAL)
    graphdef, params = nnx.split(model, nnx.Param)
    x = images()

    def loss_fn(params):
        recon, _ = nnx.merge(graphdef, params)(x)
        return jnp.mean((recon - x) ** 2)

    grads = dict(nnx.to_flat_state(jax.jit(jax.grad(loss_fn))(params)))
    for path, grad in grads.items():
        norm = float(jnp.linalg.norm(grad[...]))
        if path == ("quantize", "codebook"):
            assert norm == 0.0  # straight-through: the codebook learns from codebook_loss only
        else:
            assert norm > 0.0, f"no gradient reaches {path}"
    assert any(p[:2] == ("branches", "vis") for p in grads)
    assert any(p[:2] == ("branches", "sem") for p in grads)


def test_dropout_applies_only_with_call_time_rngs():
    model = tiny_model(DUAL, dropout=0.5)
    x = images()
    assert nnx.state(model, nnx.Not(nnx.Param)) == nnx.State({})  # no RNG state in the model
    np.testing.assert_array_equal(model(x)[0], model(x)[0])
    with_dropout = model(x, rngs=nnx.Rngs(dropout=0))[0]
    assert bool(jnp.any(with_dropout != model(x)[0]))


def test_from_config_builds_the_configured_model():
    config = config_lib.base_config()
    config.model.update(dict(branches=TRIPLE, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                             z_channels=32, adapter_layers=1, adapter_heads=2,
                             codebook_size=64, code_dim=4))
    model = nnx.eval_shape(lambda: Tokenizer.from_config(config.model, image_size=32,
                                                         rngs=nnx.Rngs(0)))
    params = flat_params(model)
    assert model.branch_names == TRIPLE
    assert params[("quantize", "codebook")].shape == (3, 64, 4)
    assert params[("branches", "sem_high", "adapter", "positional_embedding")].shape == (256, 64)
    assert params[("post_quant_conv", "kernel")].shape == (1, 1, 12, 32)


def test_layers_match_their_definitions():
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 32))
    down = Downsample(32, dtype=jnp.float32, rngs=nnx.Rngs(0))
    padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # F.pad(x, (0, 1, 0, 1))
    expected = jax.lax.conv_general_dilated(padded, down.conv.kernel[...], (2, 2), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(down(x), expected + down.conv.bias[...], rtol=1e-5, atol=1e-5)
    up = Upsample(32, dtype=jnp.float32, rngs=nnx.Rngs(0))
    up.conv.kernel[...] = jnp.zeros_like(up.conv.kernel[...]).at[1, 1].set(jnp.eye(32))
    up.conv.bias[...] = jnp.zeros_like(up.conv.bias[...])  # conv = identity: pure nearest x2
    np.testing.assert_array_equal(up(x)[:, ::2, ::2], x)
    np.testing.assert_array_equal(up(x)[:, 1::2, 1::2], x)
    # Shortcut only where channels change, as in the official state_dict.
    assert ResnetBlock(32, 32, dtype=jnp.float32, rngs=nnx.Rngs(0)).nin_shortcut is None
    assert ResnetBlock(32, 64, dtype=jnp.float32, rngs=nnx.Rngs(0)).nin_shortcut is not None
    with pytest.raises(ValueError, match="divisible by 32"):
        ResnetBlock(16, 16, dtype=jnp.float32, rngs=nnx.Rngs(0))


def test_attention_matches_jax_reference():
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 10, 4, 8))
    np.testing.assert_allclose(dot_product_attention(q, k, v),
                               jax.nn.dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
