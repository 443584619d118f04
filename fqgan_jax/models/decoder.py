"""Decoder: LlamaGen's VQGAN decoder, identical shapes and names (spec fqgan.md §1.5, §9).

conv_in (z_channels -> top width) -> mid (Res, Attn, Res) -> `conv_blocks` from the lowest
resolution up, each with `num_res_blocks + 1` ResnetBlocks (+ one AttnBlock after each at the
lowest resolution only) and a nearest-x2 `upsample` except after the last -> norm_out -> swish ->
conv_out (-> 3). No tanh: the output is nominally, not strictly, in [-1, 1].
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fqgan_jax.models.layers import ResolutionLevel, apply_mid, conv2d, group_norm, mid_block, swish


class Decoder(nnx.Module):
    """[B, h, w, z_channels] -> images [B, h * 2^(L-1), w * 2^(L-1), 3] in float32."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 dropout: float = 0.0, out_channels: int = 3, dtype=jnp.float32,
                 rngs: nnx.Rngs, remat: bool = False):
        num_levels = len(ch_mult)
        # Level i of the decoder mirrors encoder level L-1-i (lowest resolution first).
        widths = [ch * ch_mult[num_levels - 1 - i] for i in range(num_levels)]
        self.conv_in = conv2d(z_channels, widths[0], 3, dtype=dtype, rngs=rngs)
        self.mid = mid_block(widths[0], dropout=dropout, dtype=dtype, rngs=rngs)
        level_in = [widths[0]] + widths[:-1]
        self.conv_blocks = nnx.List([
            ResolutionLevel(level_in[i], widths[i], num_res_blocks=num_res_blocks + 1,
                            with_attention=i == 0,  # lowest resolution only
                            resample="upsample" if i != num_levels - 1 else None,
                            dropout=dropout, dtype=dtype, rngs=rngs, remat=remat)
            for i in range(num_levels)])
        self.norm_out = group_norm(widths[-1], dtype=dtype, rngs=rngs)
        self.conv_out = conv2d(widths[-1], out_channels, 3, dtype=dtype, rngs=rngs)

    def features(self, z: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Everything before `conv_out`: its input, which the adaptive GAN weight needs."""
        h = apply_mid(self.mid, self.conv_in(z), rngs)
        for level in self.conv_blocks:
            h = level(h, rngs)
        return swish(self.norm_out(h))

    def __call__(self, z: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """`rngs` enables ResnetBlock dropout (only if config dropout > 0)."""
        return self.conv_out(self.features(z, rngs)).astype(jnp.float32)
