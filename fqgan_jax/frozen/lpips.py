"""LPIPS with a VGG16 trunk (the `lpips` package v0.1), the tokenizer's perceptual loss.

Spec fqgan.md §4.1: LPIPS(x, x̂) with weight 1.0. Per image, with features taken after relu1_2,
relu2_2, relu3_3, relu4_3 and relu5_3 of ImageNet VGG16:

    scale:   x' = (x - shift) / scale            (ScalingLayer; inputs in [-1, 1])
    layer l: f = VGG16(x')_l / (||VGG16(x')_l||_channels + 1e-10), the same for x̂
             d_l = mean_hw( lin_l((f - f̂)²) )    (lin_l: 1x1 conv to 1 channel, no bias)
    LPIPS = Σ_l d_l

The conv stack is one `nnx.List` named `vgg` whose indices are torchvision's `vgg16().features`
indices (ReLUs and max-pools occupy their slots as parameter-free functions), so a weights key
converts by a table: `features.28.weight` -> ("vgg", 28, "kernel"); see `official_key_to_path`.
The heads are `lins[0..4]`. The weights are never trained here: they come from a file made by
`python -m fqgan_jax.tools.convert lpips` (format in `fqgan_jax.frozen.weights`).

The official heads are Dropout(0.5) -> conv, and FQGAN's training left that dropout active
(spec §4.1). We default to no dropout and apply it only when given a key (`dropout_rng`).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fqgan_jax.frozen import weights
from fqgan_jax.models.layers import torch_kernel_init

WEIGHTS_KIND = "lpips_vgg16"
WEIGHTS_FILENAME = "lpips_vgg16.npz"
HOW_TO_MAKE = ("Produce it with: python -m fqgan_jax.tools.convert lpips "
               "--vgg16=vgg16-397923af.pth --out=PATH (the file is torchvision's ImageNet "
               "VGG16, https://download.pytorch.org/models/vgg16-397923af.pth).")

# torchvision's VGG16 `features` up to relu5_3 (config "D" without its last max-pool):
# out-channel counts of the 3x3 convs, "M" for the 2x2 max-pools.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# The `features` indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the ends of lpips's
# slices [0, 4), [4, 9), [9, 16), [16, 23), [23, 30).
FEATURE_INDICES = (3, 8, 15, 22, 29)
FEATURE_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor: added to the norm, not under the square root
DROPOUT_RATE = 0.5  # NetLinLayer's nn.Dropout()


def relu(x: jax.Array) -> jax.Array:
    """`nn.ReLU`; a module-level function, so it is a static, hashable entry of `vgg` and two
    LPIPS modules built alike have equal graphdefs."""
    return jax.nn.relu(x)


def max_pool(x: jax.Array) -> jax.Array:
    """`nn.MaxPool2d(2, 2)`: floor mode, so an odd size drops its last row or column."""
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def vgg_conv(in_channels: int, out_channels: int, *, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """3x3 conv, padding 1, with torchvision VGG's init (kaiming normal, fan_out; zero bias).
    The init only matters for tests: real weights always come from a file."""
    return nnx.Conv(in_channels, out_channels, (3, 3), padding=1, dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    bias_init=nnx.initializers.zeros, rngs=rngs)


def normalize_channels(x: jax.Array) -> jax.Array:
    """lpips.normalize_tensor: x / (||x||_2 over channels + 1e-10)."""
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    # Deviation from lpips: at a position whose features are all 0 (every ReLU off), sqrt's
    # gradient is infinite and torch's backward gives NaN, which would poison the whole
    # gradient. The double `where` keeps it finite there (and the ReLU below then zeroes it);
    # values are unchanged everywhere.
    positive = sum_sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
    return x / (norm + NORM_EPS)


def dropout(x: jax.Array, rng: jax.Array) -> jax.Array:
    """nn.Dropout(0.5) in train mode: zero half the entries, scale the rest by 1 / (1 - 0.5)."""
    keep = jax.random.bernoulli(rng, 1.0 - DROPOUT_RATE, x.shape)
    return jnp.where(keep, x / (1.0 - DROPOUT_RATE), 0.0)


class LPIPS(nnx.Module):
    """LPIPS-VGG16 v0.1; the float32 parameters are frozen, the convs compute in `dtype`."""

    def __init__(self, *, dtype="float32", rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        layers, channels = [], 3
        for entry in VGG16_LAYERS:
            if entry == "M":
                layers.append(max_pool)
            else:
                layers += [vgg_conv(channels, entry, dtype=dtype, rngs=rngs), relu]
                channels = entry
        self.vgg = nnx.List(layers)
        # The heads see float32 squared differences; at one output channel they cost nothing.
        self.lins = nnx.List([
            nnx.Conv(width, 1, (1, 1), use_bias=False, dtype=jnp.float32,
                     param_dtype=jnp.float32, kernel_init=torch_kernel_init(), rngs=rngs)
            for width in FEATURE_CHANNELS])

    def features(self, x: jax.Array) -> list[jax.Array]:
        """VGG16 activations relu1_2 .. relu5_3 of scaled images, as float32."""
        taps = []
        for index, layer in enumerate(self.vgg):
            x = layer(x)
            if index in FEATURE_INDICES:
                taps.append(x.astype(jnp.float32))
        return taps

    def __call__(self, images: jax.Array, recon: jax.Array, *,
                 dropout_rng: jax.Array | None = None) -> jax.Array:
        """images, recon [B, H, W, 3] in [-1, 1] -> float32 distances [B].

        dropout_rng=None is lpips's eval mode. A key applies the heads' Dropout(0.5) to each
        layer's squared differences, with a different key per layer (the official training).
        """
        batch = images.shape[0]
        # Both images in one batched pass through the VGG: one set of larger convs.
        x = jnp.concatenate([images, recon]).astype(jnp.float32)
        x = (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
        rngs = ([None] * len(self.lins) if dropout_rng is None
                else jax.random.split(dropout_rng, len(self.lins)))
        total = jnp.zeros((batch,), jnp.float32)
        for lin, rng, features in zip(self.lins, rngs, self.features(x)):
            features = normalize_channels(features)
            diff = jnp.square(features[:batch] - features[batch:])
            if rng is not None:
                diff = dropout(diff, rng)
            total = total + jnp.mean(lin(diff), axis=(1, 2, 3))
        return total


def _layer_kinds() -> tuple[str, ...]:
    """"conv", "relu" or "pool" for each `features` index up to relu5_3."""
    kinds = []
    for entry in VGG16_LAYERS:
        kinds += ["pool"] if entry == "M" else ["conv", "relu"]
    return tuple(kinds)


LAYER_KINDS = _layer_kinds()
_TORCH_LEAF = {"weight": "kernel", "bias": "bias"}


def official_key_to_path(official_key: str) -> tuple | None:
    """One torchvision-VGG16 or `lpips` state_dict key -> our parameter path, or None if unused.

    `features.<i>.weight|bias` (torchvision vgg16) and `net.slice<k>.<i>.weight|bias` (an
    `lpips.LPIPS` module; its slices keep the `features` indices) -> ("vgg", i, leaf);
    `lin<k>.model.1.weight` (`model.0` without dropout) -> ("lins", k, "kernel"). None for what
    LPIPS does not use (`classifier.*`, features past relu5_3), for `scaling_layer.shift|scale`
    (constants here), and for `lins.<k>.*`, which torch lists as an alias of the same `lin<k>`
    tensors. Conv weights also need OIHW -> HWIO: a converter's job, not a renaming.
    """
    if official_key.startswith(("classifier.", "lins.")) or official_key in (
            "scaling_layer.shift", "scaling_layer.scale"):
        return None
    match = (re.fullmatch(r"features\.(\d+)\.(weight|bias)", official_key)
             or re.fullmatch(r"net\.slice[1-5]\.(\d+)\.(weight|bias)", official_key))
    if match:
        index = int(match.group(1))
        if index >= len(LAYER_KINDS):
            return None
        if LAYER_KINDS[index] != "conv":
            raise ValueError(f"{official_key!r}: VGG16 has no conv at features index {index} "
                             "(a vgg16_bn or other VGG?)")
        return ("vgg", index, _TORCH_LEAF[match.group(2)])
    match = re.fullmatch(r"lin([0-4])\.model\.[01]\.weight", official_key)
    if match:
        return ("lins", int(match.group(1)), "kernel")
    raise ValueError(f"Not a VGG16 or LPIPS key: {official_key!r}")


def abstract_params(dtype="float32") -> tuple[nnx.GraphDef, nnx.State]:
    """The graphdef and shape-only parameters of LPIPS, with no parameter allocated."""
    module = nnx.eval_shape(lambda: LPIPS(dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(module, nnx.Param)


def convert_torch_state_dict(vgg_state: dict[str, np.ndarray],
                             lin_state: dict[str, np.ndarray]) -> nnx.State:
    """LPIPS parameters from torch state dicts: `vgg_state` (the --vgg16 file: torchvision's
    vgg16, or an lpips.LPIPS module's) for the VGG16 convs, `lin_state` (the --lin file:
    lpips's weights/v0.1/vgg.pth) for the heads.

    Each part is filled from its own file alone, so that a full lpips.LPIPS state dict given
    for one part does not fill (or clash with) the other; every parameter must get exactly one
    value of the right shape, and an error names the file's flag and the offending keys.
    """
    _, abstract = abstract_params()
    flat = list(nnx.to_flat_state(abstract))
    filled = []
    for flag, state, part in (("--vgg16", vgg_state, "vgg"), ("--lin", lin_state, "lins")):
        part_abstract = nnx.from_flat_state([(path, leaf) for path, leaf in flat
                                             if path[0] == part])
        filled += nnx.to_flat_state(weights.fill_params(
            state, part_abstract, key_to_path=functools.partial(_key_to_path_in, part),
            path_to_key=_official_name, what=_PART_NAME[part], source=f"The {flag} file",
            hint=_SOURCE_HINT[flag]))
    return nnx.from_flat_state(filled)


def _key_to_path_in(part: str, official_key: str) -> tuple | None:
    """official_key_to_path, with keys of the other part ("vgg" or "lins") skipped: an
    lpips.LPIPS state dict holds both."""
    path = official_key_to_path(official_key)
    return path if path is None or path[0] == part else None


_PART_NAME = {"vgg": "VGG16 convs of LPIPS", "lins": "heads of LPIPS-VGG (lin0..lin4)"}
_SOURCE_HINT = {
    "--vgg16": ("Is it a torchvision vgg16 state dict (vgg16-397923af.pth; VGG16, not "
                "VGG11/13/19 or vgg16_bn), or an lpips.LPIPS(net='vgg') state dict?"),
    "--lin": ("Is it lpips's weights/v0.1/vgg.pth (the lin0..lin4 heads of LPIPS-VGG), or an "
              "lpips.LPIPS(net='vgg') state dict?"),
}


def _official_name(path: tuple) -> str:
    """Our path -> the torch key that fills it (inverse of official_key_to_path)."""
    part, index, leaf = path
    if part == "lins":
        return f"lin{index}.model.1.weight"
    return f"features.{index}.{'weight' if leaf == 'kernel' else 'bias'}"


def load_lpips(path: str, *, dtype="float32") -> LPIPS:
    """LPIPS with the weights of `path` (a converted file), computing in `dtype`."""
    graphdef, abstract = abstract_params(dtype)
    params = weights.load(path, abstract, kind=WEIGHTS_KIND, how_to_make=HOW_TO_MAKE)
    return nnx.merge(graphdef, params)
