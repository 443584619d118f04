"""Encoder: the shared LlamaGen trunk and the per-sub-codebook branch heads (spec fqgan.md §1.1-3).

`Encoder` is LlamaGen's encoder up to and including `mid`; it ends at the trunk width
`ch * ch_mult[-1]` (512 for the official recipe). Each `EncoderBranch` turns that shared feature
map into one sub-codebook's pre-quantization latent: optional FactorizedAdapter -> norm_out ->
swish -> conv_out -> quant_conv. With no adapter a branch is exactly LlamaGen's
`encoder.norm_out`/`encoder.conv_out`/`quant_conv`, so k = 1 reproduces the plain VQGAN.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fqgan_jax.models.adapter import FactorizedAdapter
from fqgan_jax.models.layers import ResolutionLevel, apply_mid, conv2d, group_norm, mid_block, swish


class Encoder(nnx.Module):
    """The shared trunk: conv_in -> conv_blocks -> mid (spec fqgan.md §1.2). NHWC in and out."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 dropout: float = 0.0, in_channels: int = 3, dtype=jnp.float32,
                 rngs: nnx.Rngs, remat: bool = False):
        num_levels = len(ch_mult)
        self.conv_in = conv2d(in_channels, ch, 3, dtype=dtype, rngs=rngs)
        level_in = [ch * m for m in (1,) + tuple(ch_mult[:-1])]
        self.conv_blocks = nnx.List([
            ResolutionLevel(level_in[i], ch * ch_mult[i], num_res_blocks=num_res_blocks,
                            with_attention=i == num_levels - 1,  # lowest resolution only
                            resample="downsample" if i != num_levels - 1 else None,
                            dropout=dropout, dtype=dtype, rngs=rngs, remat=remat)
            for i in range(num_levels)])
        self.out_channels = ch * ch_mult[-1]
        self.mid = mid_block(self.out_channels, dropout=dropout, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """`rngs` enables ResnetBlock dropout (only if config dropout > 0)."""
        h = self.conv_in(images)
        for level in self.conv_blocks:
            h = level(h, rngs)
        return apply_mid(self.mid, h, rngs)


class EncoderBranch(nnx.Module):
    """One sub-codebook's head: [adapter] -> GN -> swish -> conv_out -> quant_conv.

    Official names per branch b (spec §7.2): `encoder.<b>_head.0` (adapter),
    `encoder.norm_out_<b>`, `encoder.conv_out_<b>`, `quant_conv_<b>`.
    """

    def __init__(self, *, width: int, grid_size: int, z_channels: int, code_dim: int,
                 adapter_layers: int, adapter_heads: int, adapter_mlp_ratio: float, dtype,
                 rngs: nnx.Rngs):
        self.adapter = (FactorizedAdapter(width=width, grid_size=grid_size,
                                          num_layers=adapter_layers, num_heads=adapter_heads,
                                          mlp_ratio=adapter_mlp_ratio, dtype=dtype, rngs=rngs)
                        if adapter_layers > 0 else None)
        self.norm_out = group_norm(width, dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(width, z_channels, 3, dtype=dtype, rngs=rngs)
        self.quant_conv = conv2d(z_channels, code_dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, trunk_features: jax.Array) -> jax.Array:
        """[B, h, w, width] -> pre-quantization latent [B, h, w, code_dim] in float32."""
        h = trunk_features if self.adapter is None else self.adapter(trunk_features)
        h = self.conv_out(swish(self.norm_out(h)))
        # The quantizer always runs in float32 (nearest-code search and losses).
        return self.quant_conv(h).astype(jnp.float32)
