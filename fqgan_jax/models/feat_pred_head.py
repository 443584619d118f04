"""FeatPredHead: predicts a frozen teacher's CLS feature from one semantic sub-codebook's codes.

Spec fqgan.md §3.2. Codes [B, h, w, d] (straight-through, so the InfoNCE gradient reaches the
branch's encoder) -> tokens [B, h*w, d] -> `upscale` MLP (d -> W -> ReLU -> W), W = the teacher's
width -> prepend `class_embedding` -> + `positional_embedding` ((h*w + 1) x W) -> `ln_pre` ->
3 pre-LN transformer blocks (the adapter's block: 8 heads, MLP ratio 4, exact GELU) -> `ln_post`.
Only the class token's output is used.

Names follow the official state_dict (`feat_pred_head`, `mid_sem_feat_pred`,
`high_sem_feat_pred`); `upscale` is a list whose index 1 is the parameter-free ReLU, as torch's
Sequential. Like the adapter, the positional table follows `data.image_size` and is resized for
other grids (the official head hard-codes 256 x 256 inputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fqgan_jax.models.adapter import ResidualAttentionBlock, layer_norm, linear, resize_positions


def relu(x: jax.Array) -> jax.Array:
    """The Sequential's nn.ReLU; a module-level function, so graphdefs stay hashable."""
    return jax.nn.relu(x)


class FeatPredHead(nnx.Module):
    """Codes [B, h, w, code_dim] -> predicted teacher CLS feature [B, width], float32."""

    def __init__(self, *, code_dim: int, width: int, grid_size: int, num_layers: int = 3,
                 num_heads: int = 8, mlp_ratio: float = 4.0, dtype, rngs: nnx.Rngs):
        self.grid_size = grid_size
        self.upscale = nnx.List([linear(code_dim, width, dtype=dtype, rngs=rngs), relu,
                                 linear(width, width, dtype=dtype, rngs=rngs)])
        scale = width ** -0.5  # spec §3.2: N(0, 1) * W^-0.5 for both
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (1, width), jnp.float32) * scale)
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (grid_size * grid_size + 1, width), jnp.float32)
            * scale)
        self.ln_pre = layer_norm(width, dtype=dtype, rngs=rngs)
        self.transformer = nnx.List([
            ResidualAttentionBlock(width, num_heads, mlp_ratio, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])
        self.ln_post = layer_norm(width, dtype=dtype, rngs=rngs)

    def __call__(self, codes: jax.Array) -> jax.Array:
        batch, height, width_tokens, code_dim = codes.shape
        x = codes.reshape(batch, height * width_tokens, code_dim)
        for layer in self.upscale:
            x = layer(x)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (batch, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        table = self.positional_embedding[...]
        positions = jnp.concatenate(
            [table[:1], resize_positions(table[1:], self.grid_size, height, width_tokens)])
        x = self.ln_pre(x + positions.astype(x.dtype))
        for block in self.transformer:
            x = block(x)
        return self.ln_post(x[:, 0]).astype(jnp.float32)
