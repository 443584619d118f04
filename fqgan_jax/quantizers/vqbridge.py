"""VQBridge: the shared network that maps FVQ's raw codebook C [K, d] to the searched one Ĉ.

FVQ (spec large_codebooks.md §B) quantizes against Ĉ = f(C) instead of C, with f strong enough
that the gradient of the few selected codes moves all of them (§B.1, §B.6). This is the ViT
"release" bridge (`vq_train_qbridge_lr_release.py`, which the README says is the paper's method),
not the DiT-block variant the official shell scripts call (§B.3):

  compress:  consecutive groups of `group_size` codes, flattened, -> Dense -> tokens [T, width]
  process:   `depth` pre-norm ViT blocks (LayerNorm without affine, eps 1e-6; MHSA with a fused
             qkv with bias; MLP with tanh-GELU); global attention over the T group tokens is what
             mixes codes across groups; no positional embedding
  recover:   LayerNorm without affine -> Dense(width -> group_size * d), zero kernel and bias
             -> Ĉ [K, d]. No skip connection from C, so Ĉ is exactly 0 at init (§B.3.4).

Departures from the official layout (§B.3.1, §B.10):

* Codes are grouped 1D, k // group_size, instead of as p x p blocks of a sqrt(K) x sqrt(K) image.
  With group_size = p^2 that is a fixed permutation of the codes, irrelevant from scratch but to
  be applied (with the conv kernel's (out, in, p, p) transpose) when loading PyTorch weights.
* So K need not be a perfect square, nor a multiple of group_size: the last group is padded with
  zero codes and the padded output rows are dropped. The pads are fixed zeros, not parameters.

Everything is float32 (the official runs it under bf16 autocast); the bridge is computed once per
step and is small next to the encoder (3.2M params at L/4, 9.4M at L/8, §B.3).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# §B.3: every LayerNorm of the release bridge is elementwise_affine=False, eps=1e-6. Keeping this
# eps matters: raw codes are U(+-1/K), so at init token variances sit far below it (§B.10).
_LAYER_NORM_EPS = 1e-6


def _linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
            zero: bool = False) -> nnx.Linear:
    """The official `_basic_init`: Xavier-uniform kernel, zero bias; `zero` for the output."""
    kernel_init = nnx.initializers.zeros_init() if zero else nnx.initializers.xavier_uniform()
    return nnx.Linear(in_features, out_features, use_bias=True, kernel_init=kernel_init,
                      bias_init=nnx.initializers.zeros_init(), dtype=jnp.float32,
                      param_dtype=jnp.float32, rngs=rngs)


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without scale or bias (nothing to learn, so no module)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + _LAYER_NORM_EPS)


class BridgeBlock(nnx.Module):
    """A pre-norm ViT block over the group tokens [T, width] (timm Attention + Mlp)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"VQBridge width {width} is not divisible by heads={heads}.")
        self.heads = heads
        # timm's fused qkv: one Linear(width, 3 * width), so its Xavier bound uses 3 x width.
        self.qkv = _linear(width, 3 * width, rngs=rngs)
        self.proj = _linear(width, width, rngs=rngs)
        hidden = int(width * mlp_ratio)
        self.fc1 = _linear(width, hidden, rngs=rngs)
        self.fc2 = _linear(hidden, width, rngs=rngs)

    def attention(self, x: jax.Array) -> jax.Array:
        tokens, width = x.shape
        # timm's layout: qkv features are (3, heads, head_dim).
        qkv = self.qkv(x).reshape(1, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(out.reshape(tokens, width))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(_layer_norm(x))
        hidden = jax.nn.gelu(self.fc1(_layer_norm(x)), approximate=True)
        return x + self.fc2(hidden)


class VQBridge(nnx.Module):
    """Raw codebook C [K, d] -> Ĉ [K, d] through compress -> ViT blocks -> recover (§B.3)."""

    def __init__(self, *, codebook_size: int, code_dim: int, group_size: int = 16,
                 width: int = 256, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0,
                 rngs: nnx.Rngs):
        if group_size < 1 or depth < 0:
            raise ValueError(f"VQBridge needs group_size >= 1 and depth >= 0; got "
                             f"group_size={group_size}, depth={depth}.")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.group_size = group_size
        self.num_groups = math.ceil(codebook_size / group_size)
        group_features = group_size * code_dim
        # The official PatchEmbed is a strided conv initialized Xavier on its flattened view:
        # exactly a Dense on the flattened group.
        self.embed = _linear(group_features, width, rngs=rngs)
        self.blocks = nnx.List([BridgeBlock(width, heads, mlp_ratio, rngs=rngs)
                                for _ in range(depth)])
        self.output = _linear(width, group_features, rngs=rngs, zero=True)

    def __call__(self, codebook: jax.Array) -> jax.Array:
        expected = (self.codebook_size, self.code_dim)
        if tuple(codebook.shape) != expected:
            raise ValueError(f"VQBridge expects a codebook {expected}; got {codebook.shape}")
        padding = self.num_groups * self.group_size - self.codebook_size
        codes = jnp.pad(jnp.asarray(codebook, jnp.float32), ((0, padding), (0, 0)))
        x = self.embed(codes.reshape(self.num_groups, -1))
        for block in self.blocks:
            x = block(x)
        out = self.output(_layer_norm(x))
        return out.reshape(-1, self.code_dim)[:self.codebook_size]
