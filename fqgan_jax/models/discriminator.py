"""PatchGAN discriminator: taming's `NLayerDiscriminator` with BatchNorm, in NHWC.

Spec fqgan.md §4.2 (FQGAN/LlamaGen: n_layers 3, 2,765,633 params, 256x256 -> 30x30 logits) and
large_codebooks.md §A.5 (VQGAN-LC: n_layers 2). Layers, all 4x4 convs with padding 1:

    conv(in -> ndf, stride 2, bias) -> LeakyReLU(0.2)
    n = 1 .. n_layers-1:  conv(stride 2, no bias) -> BatchNorm -> LeakyReLU(0.2)
    conv(stride 1, no bias) -> BatchNorm -> LeakyReLU(0.2)
    conv(-> 1, stride 1, bias)

with widths ndf * min(2**n, 8). The layers sit in one `nnx.List` named `main` whose indices are
torch's `nn.Sequential` indices (LeakyReLUs occupy slots as parameter-free entries), so official
keys convert by a table: `main.3.weight` -> ("main", 3, "scale"); see `official_key_to_path`.

BatchNorm: the official discriminator always runs in train mode (spec §4.1), i.e. normalises
with batch statistics; running statistics are only tracked. Under `jax.jit` with the batch
sharded over a mesh, XLA SPMD computes the statistics over the *global* batch (no `axis_name`
needed), which equals PyTorch's SyncBatchNorm. Deviations from torch's BatchNorm2d:
- LlamaGen's `vq_train.py` wraps the loss module (discriminator inside) in plain DDP with no
  SyncBatchNorm conversion, so with 8 GPUs x 32 images each GPU normalised over its own 32.
  Ours normalises over the whole global batch, so results do not depend on the device count.
- torch tracks the *unbiased* variance in `running_var`, Flax the biased one; they differ by a
  factor n / (n - 1) with n = B*H*W >= 900 per layer at 256 px, i.e. < 0.12% even at batch 1.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from fqgan_jax.models.layers import torch_bias_init

KERNEL_SIZE = 4  # taming NLayerDiscriminator: kw = 4, padw = 1
PADDING = 1
LEAKY_SLOPE = 0.2
BN_MOMENTUM = 0.9  # torch momentum 0.1 weights the *new* batch; Flax's momentum weights the old
BN_EPS = 1e-5  # torch BatchNorm2d default
INIT_STD = 0.02  # taming `weights_init` (spec fqgan.md §4.2)


def leaky_relu(x: jax.Array) -> jax.Array:
    """The Sequential's `nn.LeakyReLU(0.2, True)`; a module-level function, so it is a static,
    hashable entry of `main` and two discriminators built alike have equal graphdefs."""
    return jax.nn.leaky_relu(x, LEAKY_SLOPE)


def bn_scale_init(key, shape, dtype=jnp.float32):
    """BatchNorm weight ~ N(1, 0.02) (taming `weights_init`); its bias stays 0."""
    return 1.0 + INIT_STD * jax.random.normal(key, shape, dtype)


def patch_conv(in_channels: int, out_channels: int, *, strides: int, use_bias: bool, dtype,
               rngs: nnx.Rngs) -> nnx.Conv:
    """4x4 conv, padding 1. Weights N(0, 0.02) as in taming's `weights_init`; that init leaves
    conv biases at PyTorch's default U(±1/sqrt(fan_in)), which we reproduce (not Flax's zeros)."""
    fan_in = in_channels * KERNEL_SIZE * KERNEL_SIZE
    return nnx.Conv(
        in_channels, out_channels, (KERNEL_SIZE, KERNEL_SIZE), strides=strides, padding=PADDING,
        use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(INIT_STD), bias_init=torch_bias_init(fan_in),
        rngs=rngs)


def batch_norm(channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm2d(momentum 0.1, eps 1e-5). Flax computes the statistics in at least float32 and
    keeps the running ones in float32 (param_dtype). The two-pass variance (not E[x²] - E[x]²)
    matches torch's numerics and avoids cancellation on the non-centred LeakyReLU outputs."""
    return nnx.BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype,
                         param_dtype=jnp.float32, scale_init=bn_scale_init,
                         use_fast_variance=False, rngs=rngs)


class PatchDiscriminator(nnx.Module):
    """NLayerDiscriminator(input_nc, ndf, n_layers) with BatchNorm (spec fqgan.md §4.2)."""

    def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
                 dtype="float32", rngs: nnx.Rngs):
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}.")
        dtype = jnp.dtype(dtype)
        widths = [ndf * min(2**n, 8) for n in range(n_layers + 1)]
        layers = [patch_conv(in_channels, ndf, strides=2, use_bias=True, dtype=dtype, rngs=rngs),
                  leaky_relu]
        for n in range(1, n_layers + 1):
            # The last of these blocks keeps the resolution (stride 1), the others halve it.
            strides = 2 if n < n_layers else 1
            layers += [patch_conv(widths[n - 1], widths[n], strides=strides, use_bias=False,
                                  dtype=dtype, rngs=rngs),
                       batch_norm(widths[n], dtype=dtype, rngs=rngs),
                       leaky_relu]
        layers.append(patch_conv(widths[n_layers], 1, strides=1, use_bias=True, dtype=dtype,
                                 rngs=rngs))
        self.main = nnx.List(layers)

    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """images [B, H, W, C] in [-1, 1] -> float32 patch logits [B, h, w, 1].

        train=True normalises with the batch statistics and updates the running ones in place
        (the BatchStat variables); train=False normalises with the running statistics.
        """
        x = images
        for layer in self.main:
            if isinstance(layer, nnx.BatchNorm):
                x = layer(x, use_running_average=not train)
            else:
                x = layer(x)
        return x.astype(jnp.float32)


_TORCH_LEAF = {"weight": None, "bias": "bias", "running_mean": "mean", "running_var": "var"}


def official_key_to_path(official_key: str) -> tuple | None:
    """One official discriminator state_dict key -> our variable path, or None if dropped.

    `main.<i>.<leaf>` -> ("main", i, leaf'); torch's `weight` is a conv `kernel` or a BatchNorm
    `scale`, `running_mean`/`running_var` are the BatchStats `mean`/`var`. `num_batches_tracked`
    has no counterpart (momentum is fixed, so it is never read) and maps to None. Conv weights
    also need OIHW -> HWIO, which is a converter's job, not a renaming.
    """
    match = re.fullmatch(r"main\.(\d+)\.(\w+)", official_key)
    if match is None:
        raise ValueError(f"Not a PatchGAN discriminator key: {official_key!r}")
    index, leaf = int(match.group(1)), match.group(2)
    if leaf == "num_batches_tracked":
        return None
    if leaf not in _TORCH_LEAF:
        raise ValueError(f"Unknown leaf {leaf!r} in {official_key!r}")
    if leaf == "weight":
        # Sequential layout: conv 0, relu 1, then (conv, BN, relu) at (2+3k, 3+3k, 4+3k), then
        # the final conv at 2+3n; so BatchNorms are exactly the indices 3, 6, 9, ...
        leaf = "scale" if index >= 3 and index % 3 == 0 else "kernel"
    else:
        leaf = _TORCH_LEAF[leaf]
    return ("main", index, leaf)
