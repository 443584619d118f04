"""Convolutional building blocks shared by the encoder trunk, the branch heads and the decoder.

These are the LlamaGen/taming VQGAN blocks (spec fqgan.md §1.2, §1.5, §9) in NHWC layout:
GroupNorm(32, eps 1e-6) + swish, ResnetBlock, single-head AttnBlock, Downsample, Upsample.

Parameter names follow the official state_dict (`norm1`, `conv1`, `nin_shortcut`, `q`, `k`, `v`,
`proj_out`, `downsample.conv`, ...) so that checkpoint conversion is a rename table (spec §7.2).
Initialisers reproduce PyTorch's defaults (the official code does no custom init), so that
training from scratch starts from the same distribution as the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

NUM_GROUPS = 32  # spec fqgan.md §1.2: GroupNorm(32 groups, eps 1e-6, affine)
GROUP_NORM_EPS = 1e-6


def torch_kernel_init():
    """PyTorch's default Conv/Linear weight init: kaiming_uniform(a=sqrt(5)) = U(±fan_in^-0.5)."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias init U(±1/sqrt(fan_in)); Flax's default would be zeros."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv2d(in_channels: int, out_channels: int, kernel_size: int, *, dtype, rngs: nnx.Rngs,
           strides: int = 1, padding=None) -> nnx.Conv:
    """A Conv2d with PyTorch's padding convention (k // 2 on each side) and default init."""
    if padding is None:
        padding = kernel_size // 2
    return nnx.Conv(
        in_channels, out_channels, (kernel_size, kernel_size), strides=strides, padding=padding,
        dtype=dtype, param_dtype=jnp.float32, kernel_init=torch_kernel_init(),
        bias_init=torch_bias_init(in_channels * kernel_size * kernel_size), rngs=rngs)


def group_norm(channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm(32, eps 1e-6); Flax computes the statistics in float32 even for bf16 inputs."""
    if channels % NUM_GROUPS:
        raise ValueError(f"GroupNorm({NUM_GROUPS}) needs a channel count divisible by "
                         f"{NUM_GROUPS}, got {channels}.")
    return nnx.GroupNorm(channels, num_groups=NUM_GROUPS, epsilon=GROUP_NORM_EPS, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


def swish(x: jax.Array) -> jax.Array:
    return jax.nn.silu(x)  # x * sigmoid(x), the official `nonlinearity`


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """Softmax attention over all positions; [B, T, heads, d] in, same out.

    Logits and softmax are float32 even under bf16 compute, so that the normalisation over
    H*W positions does not lose precision; the weighted sum runs in the compute dtype.
    """
    scale = query.shape[-1] ** -0.5
    logits = jnp.einsum("bqnd,bknd->bnqk", query, key, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * scale, axis=-1).astype(value.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, value)


class ResnetBlock(nnx.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus the residual."""

    def __init__(self, in_channels: int, out_channels: int, *, dropout: float = 0.0, dtype,
                 rngs: nnx.Rngs):
        self.norm1 = group_norm(in_channels, dtype=dtype, rngs=rngs)
        self.conv1 = conv2d(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.norm2 = group_norm(out_channels, dtype=dtype, rngs=rngs)
        # The module holds no RNG state: randomness is passed at call time (see __call__), so
        # the model stays a pure function of its params and checkpoints hold no RNG keys.
        self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
        self.conv2 = conv2d(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        # The official block uses a 1x1 `nin_shortcut` only where the channel count changes.
        self.nin_shortcut = (conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs)
                             if in_channels != out_channels else None)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Dropout (if its rate is > 0) is applied only when `rngs` ('dropout' stream) is given."""
        h = self.conv1(swish(self.norm1(x)))
        h = swish(self.norm2(h))
        if self.dropout is not None:
            h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
        h = self.conv2(h)
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nnx.Module):
    """GN -> 1x1 q, k, v -> single-head attention over H*W (scale c^-0.5) -> proj_out, residual."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.norm = group_norm(channels, dtype=dtype, rngs=rngs)
        self.q = conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.k = conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.v = conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)
        self.proj_out = conv2d(channels, channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = self.norm(x)

        def tokens(conv):  # [B, H, W, C] -> [B, H*W, 1 head, C]
            return conv(h).reshape(batch, height * width, 1, channels)

        out = dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        return x + self.proj_out(out.reshape(batch, height, width, channels))


class Downsample(nnx.Module):
    """Pad right/bottom by one zero, then a 3x3 stride-2 VALID conv (spec fqgan.md §1.2)."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        # Asymmetric explicit padding == F.pad(x, (0, 1, 0, 1)) followed by padding=0.
        self.conv = conv2d(channels, channels, 3, strides=2, padding=((0, 1), (0, 1)),
                           dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv (spec fqgan.md §1.5)."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # == F.interpolate(mode="nearest")
        return self.conv(x)


def mid_block(channels: int, *, dropout: float, dtype, rngs: nnx.Rngs) -> nnx.List:
    """`mid` = ResnetBlock -> AttnBlock -> ResnetBlock, indexed 0..2 as in the official code."""
    return nnx.List([
        ResnetBlock(channels, channels, dropout=dropout, dtype=dtype, rngs=rngs),
        AttnBlock(channels, dtype=dtype, rngs=rngs),
        ResnetBlock(channels, channels, dropout=dropout, dtype=dtype, rngs=rngs),
    ])


def apply_mid(mid: nnx.List, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    x = mid[0](x, rngs)
    return mid[2](mid[1](x), rngs)


def _apply(block: nnx.Module, x: jax.Array, rngs) -> jax.Array:
    return block(x, rngs)


class ResolutionLevel(nnx.Module):
    """One encoder or decoder level: `res[j]` (+ `attn[j]` at the lowest resolution), then the
    resampling conv, kept under the official name (`downsample` or `upsample`)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_res_blocks: int,
                 with_attention: bool, resample: str | None, dropout: float, dtype,
                 rngs: nnx.Rngs, remat: bool = False):
        self.remat = remat  # recompute each ResnetBlock in the backward pass (saves activations)
        channels = [in_channels] + [out_channels] * num_res_blocks
        self.res = nnx.List([
            ResnetBlock(channels[j], channels[j + 1], dropout=dropout, dtype=dtype, rngs=rngs)
            for j in range(num_res_blocks)])
        self.attn = nnx.List([AttnBlock(out_channels, dtype=dtype, rngs=rngs)
                              for _ in range(num_res_blocks if with_attention else 0)])
        self.resample_name = resample
        if resample == "downsample":
            self.downsample = Downsample(out_channels, dtype=dtype, rngs=rngs)
        elif resample == "upsample":
            self.upsample = Upsample(out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        for j, res_block in enumerate(self.res):
            x = nnx.remat(_apply)(res_block, x, rngs) if self.remat else res_block(x, rngs)
            if len(self.attn):
                x = self.attn[j](x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)
