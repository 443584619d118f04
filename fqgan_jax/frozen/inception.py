"""The FID InceptionV3: pytorch-fid's `fid_inception_v3()`, i.e. TF's `inception-2015-12-05` graph.

FID and IS are defined by that TF graph, not by torchvision's ImageNet Inception: its weights
differ (1008 classes), its average pools exclude the zero padding (`count_include_pad=False`)
and Mixed_7c pools its last branch with a 3x3 max-pool. Architecture, as pytorch-fid builds it:
torchvision's Inception3(num_classes=1008, aux_logits=False) with Mixed_5b..5d, 6b..6e, 7b, 7c
patched; each conv is BasicConv2d = conv (no bias) -> BatchNorm(eps 0.001) -> ReLU.

NHWC. Attribute names mirror torch's, so a weights key converts by a table:
`Mixed_5b.branch5x5_1.bn.running_var` -> ("Mixed_5b", "branch5x5_1", "bn", "var"); see
`official_key_to_path`. The weights are never trained here: they come from a file made by
`python -m fqgan_jax.tools.convert inception` (format in `fqgan_jax.frozen.weights`). FID compares
float32 features across papers, so the convs and matmuls run at HIGHEST precision (TPUs would
otherwise use bf16 passes).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fqgan_jax.frozen import weights

WEIGHTS_KIND = "fid_inception_v3"
WEIGHTS_FILENAME = "fid_inception_v3.npz"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
HOW_TO_MAKE = ("Produce it with: python -m fqgan_jax.tools.convert inception "
               "--pth=pt_inception-2015-12-05-6726825d.pth --out=PATH (the file is "
               f"pytorch-fid's port of TF's FID Inception, {WEIGHTS_URL}).")

INPUT_SIZE = 299  # what FID and IS feed the net; other sizes >= MIN_SIZE run, but are not FID
MIN_SIZE = 75  # below this a stride-2 stage runs out of pixels
NUM_CLASSES = 1008
POOL3_DIM = 2048
BN_EPS = 0.001
PREPROCESS_MODES = ("pytorch_fid", "tf1")
HIGHEST = jax.lax.Precision.HIGHEST


# Preprocessing: float images in [0, 1] -> the net's [-1, 1] input at 299 x 299.


def _bilinear_matrix(in_size: int, out_size: int, half_pixel: bool) -> np.ndarray:
    """[out, in] rows of bilinear weights, rounded as torch and TF round them (float32 scale).

    half_pixel: torch's align_corners=False, src = max((dst + 0.5) * scale - 0.5, 0), whose
    CPU kernel fuses the multiply-add (one rounding; bit for bit on x86). Otherwise TF1's legacy
    resize_bilinear, src = dst * scale. Neither antialiases. scale = float32(in) / out.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float64)
    if half_pixel:  # exact in float64, then rounded once: a float32 FMA
        src = np.maximum(np.float64(scale) * (dst + 0.5) - 0.5, 0).astype(np.float32)
    else:
        src = dst.astype(np.float32) * scale
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    weight = src - lower.astype(np.float32)
    matrix = np.zeros((out_size, in_size), np.float32)
    np.add.at(matrix, (np.arange(out_size), lower), 1 - weight)
    np.add.at(matrix, (np.arange(out_size), upper), weight)
    return matrix


def _resize(images: jax.Array, half_pixel: bool) -> jax.Array:
    _, height, width, _ = images.shape
    if (height, width) == (INPUT_SIZE, INPUT_SIZE):
        return images  # both rules are then the identity
    rows = _bilinear_matrix(height, INPUT_SIZE, half_pixel)
    cols = _bilinear_matrix(width, INPUT_SIZE, half_pixel)
    images = jnp.einsum("oh,bhwc->bowc", rows, images, precision=HIGHEST)
    return jnp.einsum("pw,bowc->bopc", cols, images, precision=HIGHEST)


def preprocess(images: jax.Array, mode: str = "pytorch_fid") -> jax.Array:
    """Float images [B, H, W, 3] in [0, 1] -> float32 [B, 299, 299, 3] in [-1, 1].

    "pytorch_fid": pytorch-fid's InceptionV3(resize_input, normalize_input):
        F.interpolate(x, (299, 299), mode="bilinear", align_corners=False), then 2x - 1.
    "tf1": the TF graph's own input ops (also the OpenAI ADM evaluator's and torch-fidelity's):
        on [0, 255] values, TF1 resize_bilinear(align_corners=False, half_pixel_centers=False),
        then (x - 128) / 128.
    """
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"Unknown preprocessing mode {mode!r}; expected one of "
                         f"{', '.join(map(repr, PREPROCESS_MODES))}.")
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be float in [0, 1], got {images.dtype}")
    images = images.astype(jnp.float32)
    if mode == "pytorch_fid":
        return 2 * _resize(images, half_pixel=True) - 1
    return (_resize(255 * images, half_pixel=False) - 128) / 128


# The network.


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class FrozenBatchNorm(nnx.Module):
    """Inference-only BatchNorm2d(eps=0.001); all four arrays are Params, so the Param state is
    the complete weights. Computed in float32."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.Param(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        multiplier = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return (x.astype(jnp.float32) - self.mean[...]) * multiplier + self.bias[...]


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d: conv (no bias; torch's symmetric padding) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1, padding=0,
                 dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=stride,
                             padding=tuple((p, p) for p in _pair(padding)), use_bias=False,
                             dtype=dtype, param_dtype=jnp.float32, precision=HIGHEST, rngs=rngs)
        self.bn = FrozenBatchNorm(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x))).astype(self.dtype)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """The FID patch: TF's average pool ignores the zero padding (count_include_pad=False)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                        count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int = 2) -> jax.Array:
    """nn.MaxPool2d(3, stride): floor mode; stride 1 pads by 1 with -inf, as torch does."""
    padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


def _cat(*branches: jax.Array) -> jax.Array:
    return jnp.concatenate(branches, axis=-1)


class InceptionA(nnx.Module):  # FIDInceptionA
    def __init__(self, in_channels: int, pool_features: int, *, dtype, rngs: nnx.Rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, rngs=rngs)
        self.branch1x1 = conv(in_channels, 64, 1)
        self.branch5x5_1 = conv(in_channels, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_channels, pool_features, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _cat(self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(avg_pool_3x3(x)))


class InceptionB(nnx.Module):  # torchvision's InceptionB (Mixed_6a)
    def __init__(self, in_channels: int, *, dtype, rngs: nnx.Rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, rngs=rngs)
        self.branch3x3 = conv(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_channels, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _cat(self.branch3x3(x),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    max_pool_3x3(x))


class InceptionC(nnx.Module):  # FIDInceptionC
    def __init__(self, in_channels: int, channels_7x7: int, *, dtype, rngs: nnx.Rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, rngs=rngs)
        c7 = channels_7x7
        self.branch1x1 = conv(in_channels, 192, 1)
        self.branch7x7_1 = conv(in_channels, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_channels, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return _cat(self.branch1x1(x), b7, dbl, self.branch_pool(avg_pool_3x3(x)))


class InceptionD(nnx.Module):  # torchvision's InceptionD (Mixed_7a)
    def __init__(self, in_channels: int, *, dtype, rngs: nnx.Rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, rngs=rngs)
        self.branch3x3_1 = conv(in_channels, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_channels, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                      self.branch7x7x3_4):
            b7 = layer(b7)
        return _cat(self.branch3x3_2(self.branch3x3_1(x)), b7, max_pool_3x3(x))


class InceptionE(nnx.Module):
    """FIDInceptionE_1 (pool="avg", Mixed_7b) or FIDInceptionE_2 (pool="max", Mixed_7c)."""

    def __init__(self, in_channels: int, *, pool: str, dtype, rngs: nnx.Rngs):
        conv = functools.partial(BasicConv2d, dtype=dtype, rngs=rngs)
        self.pool = pool
        self.branch1x1 = conv(in_channels, 320, 1)
        self.branch3x3_1 = conv(in_channels, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_channels, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_channels, 192, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x, stride=1)
        return _cat(self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                    self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                    self.branch_pool(pooled))


class FIDInceptionV3(nnx.Module):
    """The FID Inception; float32 parameters (frozen), convs computing in `dtype`."""

    def __init__(self, *, dtype="float32", rngs: nnx.Rngs):
        dtype = jnp.dtype(dtype)
        self.dtype = dtype
        conv = functools.partial(BasicConv2d, dtype=dtype, rngs=rngs)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, dtype=dtype, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, dtype=dtype, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, dtype=dtype, rngs=rngs)
        self.Mixed_6a = InceptionB(288, dtype=dtype, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, dtype=dtype, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, dtype=dtype, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, dtype=dtype, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, dtype=dtype, rngs=rngs)
        self.Mixed_7a = InceptionD(768, dtype=dtype, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", dtype=dtype, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(POOL3_DIM, NUM_CLASSES, dtype=jnp.float32, param_dtype=jnp.float32,
                             precision=HIGHEST, rngs=rngs)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """Preprocessed images [B, 299, 299, 3] (see `preprocess`) -> float32
        {"pool3": [B, 2048], "logits": [B, 1008] (fc), "logits_unbiased": [B, 1008]}.

        pool3 is FID's feature. logits_unbiased = pool3 @ fc.kernel without the bias: the TF
        graph's `softmax/logits/MatMul`, which the TF/ADM/improved-gan Inception Score uses. The
        net is convolutional up to its global pool, so H, W >= 75 run; FID uses 299 only.
        """
        if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"Expected preprocessed images [B, H, W, 3] with H, W >= "
                             f"{MIN_SIZE} (FID uses {INPUT_SIZE}), got shape {x.shape}")
        x = x.astype(self.dtype)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(max_pool_3x3(x)))
        x = max_pool_3x3(x)
        for mixed in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = mixed(x)
        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        unbiased = jnp.matmul(pool3, self.fc.kernel[...], precision=HIGHEST)
        return {"pool3": pool3, "logits": unbiased + self.fc.bias[...],
                "logits_unbiased": unbiased}


def features(graphdef: nnx.GraphDef, params: nnx.State, images01: jax.Array, *,
             mode: str = "pytorch_fid") -> dict[str, jax.Array]:
    """`preprocess` then the net, from split state: jit it with graphdef and mode static."""
    return nnx.merge(graphdef, params)(preprocess(images01, mode))


# Weights.

_TORCH_LEAF = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_OUR_LEAF = {ours: theirs for theirs, ours in _TORCH_LEAF.items()}


def official_key_to_path(official_key: str) -> tuple | None:
    """One pytorch-fid FID Inception state_dict key -> our parameter path, or None if unused.

    `<block>[.<branch>].conv.weight` -> (..., "conv", "kernel");
    `<block>[.<branch>].bn.weight|bias|running_mean|running_var` -> (..., "bn",
    "scale"|"bias"|"mean"|"var"); `fc.weight|bias` -> ("fc", "kernel"|"bias"); None for
    `num_batches_tracked`. Raises ValueError for a key the FID Inception does not have. Conv
    weights also need OIHW -> HWIO and fc's a transpose: a converter's job, not a renaming.
    """
    if official_key.endswith(".num_batches_tracked"):
        return None
    match = re.fullmatch(r"(fc)\.(weight|bias)|(\w+(?:\.\w+)?)\.(conv|bn)\.(\w+)", official_key)
    path = None
    if match and match.group(1):
        path = ("fc", "kernel" if match.group(2) == "weight" else "bias")
    elif match and (match.group(4), match.group(5)) == ("conv", "weight"):
        path = (*match.group(3).split("."), "conv", "kernel")
    elif match and match.group(4) == "bn" and match.group(5) in _TORCH_LEAF:
        path = (*match.group(3).split("."), "bn", _TORCH_LEAF[match.group(5)])
    if path not in _param_shapes():
        raise ValueError(f"Not an FID Inception key: {official_key!r}")
    return path


def _official_name(path: tuple) -> str:
    """Our path -> the torch key that fills it (inverse of official_key_to_path)."""
    *module, leaf = path
    if leaf == "kernel":
        leaf = "weight"
    elif module[-1] == "bn":
        leaf = _OUR_LEAF[leaf]
    return ".".join([*module, leaf])


def abstract_params(dtype="float32") -> tuple[nnx.GraphDef, nnx.State]:
    """The graphdef and shape-only parameters of the FID Inception, with nothing allocated."""
    module = nnx.eval_shape(lambda: FIDInceptionV3(dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(module, nnx.Param)


@functools.cache
def _param_shapes() -> dict[tuple, tuple]:
    return {path: tuple(leaf.shape) for path, leaf in nnx.to_flat_state(abstract_params()[1])}


def convert_torch_state_dict(state: dict[str, np.ndarray], *,
                             source: str = "The state dict") -> nnx.State:
    """FID Inception parameters from pytorch-fid's state dict (pt_inception-2015-12-05-*.pth).

    Every parameter must get exactly one value of the right shape; an error starting with
    `source` (e.g. "The --pth file") names the offending keys and where the right file is.
    """
    _reject_torchvision_inception(state)
    _, abstract = abstract_params()
    return weights.fill_params(
        state, abstract, key_to_path=official_key_to_path, path_to_key=_official_name,
        what="FID Inception", source=source,
        hint=f"Is it pytorch-fid's pt_inception-2015-12-05-6726825d.pth ({WEIGHTS_URL})?")


def _reject_torchvision_inception(state: dict) -> None:
    """torchvision's ImageNet inception_v3 has the same key names but other weights and pools:
    converting it would silently give wrong FIDs, so say what it is."""
    fc_shape = tuple(np.shape(state["fc.weight"])) if "fc.weight" in state else None
    aux = sum(key.startswith("AuxLogits.") for key in state)
    if aux or fc_shape == (1000, POOL3_DIM):
        raise weights.PretrainedError(
            f"This is torchvision's ImageNet Inception v3 (fc.weight of shape {fc_shape}, {aux} "
            "AuxLogits.* arrays; e.g. inception_v3_google-0cc3c7bd.pth), not the FID Inception: "
            "FID needs TF's inception-2015-12-05 weights (1008 classes), whose pytorch-fid port "
            f"is pt_inception-2015-12-05-6726825d.pth ({WEIGHTS_URL}).")


def load_inception(path: str, *, dtype="float32") -> FIDInceptionV3:
    """The FID Inception with the weights of `path` (a converted file), computing in `dtype`."""
    graphdef, abstract = abstract_params(dtype)
    params = weights.load(path, abstract, kind=WEIGHTS_KIND, how_to_make=HOW_TO_MAKE)
    return nnx.merge(graphdef, params)
