"""FactorizedAdapter: the per-branch ViT-style transformer over the trunk's tokens (spec §1.3).

Forward: flatten [B, h, w, C] -> [B, h*w, C], add a learnable positional embedding, `ln_pre`,
`num_layers` pre-LN residual blocks (bidirectional multi-head attention + exact-GELU MLP),
`ln_post`, reshape back. There is no residual around the adapter as a whole: its output
replaces the trunk features for that branch.

Deviation from the official code: the official adapter hard-codes the token grid to
`256 // downsample` and only works on 256x256 inputs. Here the positional table is sized for the
configured `image_size`'s latent grid, and when an input's grid differs the table is bilinearly
resized to it (as DINOv2's `interpolate_pos_encoding` does; half-pixel centres, no antialias,
like torch's `F.interpolate(mode="bilinear", align_corners=False)`). Non-square grids work too.

Names follow the official state_dict: `positional_embedding`, `ln_pre`,
`transformer[i].{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_post`. `attn.in_proj` is one fused
Linear (C -> 3C, [q; k; v] order) so it maps to torch's `in_proj_weight`/`in_proj_bias` by a
transpose alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fqgan_jax.models.layers import dot_product_attention, torch_bias_init, torch_kernel_init

LAYER_NORM_EPS = 1e-5  # PyTorch's default; Flax's default is 1e-6 (spec §7.2)


def layer_norm(width: int, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32,
                         rngs=rngs)


def linear(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs, kernel_init=None,
           bias_init=None) -> nnx.Linear:
    """nn.Linear with PyTorch's default init unless overridden."""
    return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=kernel_init or torch_kernel_init(),
                      bias_init=bias_init or torch_bias_init(in_features), rngs=rngs)


class MultiHeadSelfAttention(nnx.Module):
    """torch.nn.MultiheadAttention(width, heads) used as self-attention, no mask, no dropout."""

    def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"Adapter width {width} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        # torch MHA init: xavier_uniform in_proj, zero biases, default-init out_proj weight.
        zeros = nnx.initializers.zeros_init()
        self.in_proj = linear(width, 3 * width, dtype=dtype, rngs=rngs,
                              kernel_init=nnx.initializers.xavier_uniform(), bias_init=zeros)
        self.out_proj = linear(width, width, dtype=dtype, rngs=rngs, bias_init=zeros)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        qkv = self.in_proj(x).reshape(batch, length, 3, self.num_heads, width // self.num_heads)
        out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return self.out_proj(out.reshape(batch, length, width))


class Mlp(nnx.Module):
    """c_fc -> exact (erf) GELU -> c_proj; Flax's gelu defaults to the tanh form (spec §7.2)."""

    def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.c_fc = linear(width, hidden, dtype=dtype, rngs=rngs)
        self.c_proj = linear(hidden, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class ResidualAttentionBlock(nnx.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, dtype, rngs: nnx.Rngs):
        self.ln_1 = layer_norm(width, dtype=dtype, rngs=rngs)
        self.attn = MultiHeadSelfAttention(width, num_heads, dtype=dtype, rngs=rngs)
        self.ln_2 = layer_norm(width, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, int(width * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def resize_positions(table: jax.Array, grid_size: int, height: int, width: int) -> jax.Array:
    """A [grid_size², C] positional table for a grid_size² token grid -> [h*w, C] for an h x w
    grid, bilinearly resized (half-pixel centres, no antialias) when the grid differs."""
    if (height, width) == (grid_size, grid_size):
        return table
    grid = table.reshape(grid_size, grid_size, -1)
    resized = jax.image.resize(grid, (height, width, grid.shape[-1]), method="bilinear",
                               antialias=False)
    return resized.reshape(height * width, -1)


class FactorizedAdapter(nnx.Module):
    """Transformer adapter over a [B, h, w, width] feature map; returns the same shape."""

    def __init__(self, *, width: int, grid_size: int, num_layers: int, num_heads: int,
                 mlp_ratio: float, dtype, rngs: nnx.Rngs):
        self.grid_size = grid_size
        # spec §1.3: N(0, 1) * width^-0.5, one row per token of the configured latent grid.
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (grid_size * grid_size, width), jnp.float32)
            * width ** -0.5)
        self.ln_pre = layer_norm(width, dtype=dtype, rngs=rngs)
        self.transformer = nnx.List([
            ResidualAttentionBlock(width, num_heads, mlp_ratio, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])
        self.ln_post = layer_norm(width, dtype=dtype, rngs=rngs)

    def positions(self, height: int, width: int) -> jax.Array:
        """The positional table for an h x w token grid, [h*w, C], float32."""
        return resize_positions(self.positional_embedding[...], self.grid_size, height, width)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        tokens = x.reshape(batch, height * width, channels)
        tokens = tokens + self.positions(height, width).astype(tokens.dtype)
        tokens = self.ln_pre(tokens)
        for block in self.transformer:
            tokens = block(tokens)
        return self.ln_post(tokens).reshape(batch, height, width, channels)
