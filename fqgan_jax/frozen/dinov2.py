"""DINOv2 ViT (Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`), the FQGAN-Triple teacher.

Spec fqgan.md §3.1: the `sem_mid` sub-code learns to predict the CLS token of
`facebook/dinov2-small`'s `last_hidden_state` (after the final LayerNorm), on images mapped to
[0, 1], nearest-resized to 224 and ImageNet-normalized (`preprocess`). The network, in NHWC:

    patch conv (p x p, stride p, bias) -> [CLS; patches] + position table (interpolated)
      -> [CLS; registers; patches] -> L pre-LN layers -> final `layernorm`
    layer: x += lambda1 * attn(norm1(x));  x += lambda2 * mlp(norm2(x))   (LayerScale)
    mlp:   fc1 -> exact GELU -> fc2, or SwiGLU (weights_in = [gate; up] -> silu(gate) * up
           -> weights_out) for `use_swiglu_ffn` checkpoints (dinov2-giant)

The position table covers the pretraining grid (518 / 14 = 37 per side, + 1 row for CLS). Other
grids get it resampled exactly as HF's `interpolate_pos_encoding` does: torch's bicubic
(`F.interpolate(size=..., align_corners=False)`, Keys kernel with a = -0.75, clamped borders),
or for the registers model torch's antialiased bicubic (a = -0.5, window widened by the scale,
renormalized at the borders). `jax.image.resize`'s cubic is neither, so both are built here as
small resampling matrices from static shapes (`bicubic_matrix`).

Parameter paths are HF's names, so the weights convert by a table (`official_key_to_path`):
`encoder.layer.3.attention.attention.query.weight` -> ("layer", 3, "attention", "query",
"kernel"). Weights come straight from a Hugging Face snapshot (`load_dinov2`): no conversion
step. The mask token exists only for masked pretraining and is not kept.

Precision: parameters are float32; the convs and matmuls run in `dtype`. The residual stream,
the LayerNorm statistics, the attention softmax and the outputs are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fqgan_jax.frozen import weights
from fqgan_jax.frozen.preprocess import normalize, resize_nearest_like_torch
from fqgan_jax.models.layers import dot_product_attention

HOW_TO_GET = ("Get the weights with: huggingface-cli download facebook/dinov2-small --include "
              "config.json model.safetensors --local-dir DIR, then pass DIR.")
INPUT_SIZE = 224  # spec §3.1: the teacher sees 224 x 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# HF `initializer_range`; only random_init uses it. HF's trunc_normal_ cuts at +-2 (absolute),
# i.e. +-100 std: a plain normal.
INIT_STD = 0.02
TORCH_CUBIC_A = -0.75  # torch's bicubic kernel
ANTIALIAS_CUBIC_A = -0.5  # torch's antialiased bicubic (PIL's kernel)


@dataclasses.dataclass(frozen=True)
class DINOv2Sizes:
    """The architecture of one DINOv2; a hashable static attribute of the module."""

    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int  # fc1's width; for SwiGLU, the width of each of the gate and up halves
    patch_size: int
    image_size: int  # pretraining size: the position table has (image_size // patch_size)² + 1 rows
    num_register_tokens: int = 0
    use_swiglu_ffn: bool = False
    qkv_bias: bool = True
    layerscale_value: float = 1.0  # LayerScale's init; only random_init uses it
    layer_norm_eps: float = 1e-6
    interpolate_antialias: bool = False  # True for the registers models (HF and the official code)
    num_channels: int = 3

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


DINOV2_S14 = DINOv2Sizes(width=384, num_layers=12, num_heads=6, mlp_dim=1536, patch_size=14,
                         image_size=518)
DINOV2_B14 = DINOv2Sizes(width=768, num_layers=12, num_heads=12, mlp_dim=3072, patch_size=14,
                         image_size=518)

# Dinov2Config / Dinov2WithRegistersConfig defaults, for keys a hub config.json leaves out.
_HF_DEFAULTS = {
    "dinov2": {"patch_size": 14, "num_register_tokens": 0},
    "dinov2_with_registers": {"patch_size": 16, "num_register_tokens": 4},
}


def sizes_from_hf_config(config: dict) -> DINOv2Sizes:
    """The sizes of an HF Dinov2Config / Dinov2WithRegistersConfig (a config.json dict)."""
    model_type = config.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"model_type {model_type!r} is not a DINOv2 "
                         f"({' or '.join(_HF_DEFAULTS)}).")
    config = {**_HF_DEFAULTS[model_type], "image_size": 224, "mlp_ratio": 4, "hidden_act": "gelu",
              **config}
    width, swiglu = config["hidden_size"], config.get("use_swiglu_ffn", False)
    mlp_dim = int(width * config["mlp_ratio"])
    if swiglu:  # HF Dinov2SwiGLUFFN: 2/3 of the MLP width, rounded up to a multiple of 8
        mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
    elif config["hidden_act"] != "gelu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only 'gelu').")
    return DINOv2Sizes(
        width=width, num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], mlp_dim=mlp_dim,
        patch_size=weights.square_size(config, "patch_size"),
        image_size=weights.square_size(config, "image_size"),
        num_register_tokens=config["num_register_tokens"],
        use_swiglu_ffn=swiglu, qkv_bias=config.get("qkv_bias", True),
        layerscale_value=config.get("layerscale_value", 1.0),
        layer_norm_eps=config.get("layer_norm_eps", 1e-6),
        interpolate_antialias=model_type == "dinov2_with_registers",
        num_channels=config.get("num_channels", 3))


def _cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel with parameter a (torch's cubic_convolution1/2)."""
    x = abs(x)
    if x <= 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


@functools.cache
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """[out_size, in_size] float32 M with M @ x == torch's 1-D `F.interpolate(x, out_size,
    mode="bicubic", align_corners=False, antialias=antialias)`; 2-D resizing is separable.

    Follows aten/src/ATen/native/cpu/UpSampleKernel.cpp: without antialias, source
    x = scale * (i + 0.5) - 0.5 and its 4 neighbours, indices clamped to the border; with it,
    PIL's filter over a window of half-width 2 * max(scale, 1), weights renormalized. The
    source coordinates are float32, as torch computes them (float64 would differ by ~1e-5).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    row = _antialias_cubic_row if antialias else _torch_cubic_row
    matrix = np.stack([row(i, scale, in_size) for i in range(out_size)]).astype(np.float32)
    matrix.setflags(write=False)  # cached: shared by every caller
    return matrix


def _torch_cubic_row(i: int, scale: np.float32, in_size: int) -> np.ndarray:
    """upsample_bicubic2d: 4 taps around x = scale * (i + 0.5) - 0.5, clamped to the border."""
    row = np.zeros(in_size)
    real = scale * np.float32(i + 0.5) - np.float32(0.5)
    base = min(math.floor(real), in_size - 1)
    t = min(max(real - base, 0.0), 1.0)
    for k in range(-1, 3):
        row[min(max(base + k, 0), in_size - 1)] += _cubic(t - k, TORCH_CUBIC_A)
    return row


def _antialias_cubic_row(i: int, scale: np.float32, in_size: int) -> np.ndarray:
    """_upsample_bicubic2d_aa: PIL's a = -0.5 filter, stretched by the scale when downsampling,
    over the taps inside the image, renormalized to sum to 1."""
    row = np.zeros(in_size)
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * np.float32(i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    for j in range(lo, hi):
        row[j] = _cubic((j - center + 0.5) * inv_scale, ANTIALIAS_CUBIC_A)
    total = row.sum()
    return row / total if total != 0.0 else row


def interpolate_positions(table: jax.Array, grid_size: int, height: int, width: int, *,
                          antialias: bool) -> jax.Array:
    """HF `interpolate_pos_encoding`: a [1, 1 + g², C] table for a g x g grid -> [1, 1 + h*w, C]
    (the CLS row kept, the patch rows bicubically resized in float32)."""
    if (height, width) == (grid_size, grid_size):
        return table
    grid = table[0, 1:].astype(jnp.float32).reshape(grid_size, grid_size, -1)
    rows = jnp.asarray(bicubic_matrix(grid_size, height, antialias))
    cols = jnp.asarray(bicubic_matrix(grid_size, width, antialias))
    resized = jnp.einsum("ph,hwc,qw->pqc", rows, grid, cols,
                         precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table[:, :1], resized.reshape(1, height * width, -1)], axis=1)


def _linear(in_features: int, out_features: int, *, use_bias: bool = True, dtype,
            rngs: nnx.Rngs) -> nnx.Linear:
    """nn.Linear with HF Dinov2's init (normal 0.02, zero bias)."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                      param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(INIT_STD),
                      rngs=rngs)


def _layer_norm(width: int, eps: float, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """nn.LayerNorm: float32 statistics (Flax promotes), two-pass variance as torch computes it
    (the fast E[x²] - E[x]² form loses digits on DINOv2's large-norm tokens)."""
    return nnx.LayerNorm(width, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


class SelfAttention(nnx.Module):
    """HF Dinov2Attention: separate query/key/value projections, `output` (HF: output.dense)."""

    def __init__(self, sizes: DINOv2Sizes, *, dtype, rngs: nnx.Rngs):
        width = sizes.width
        if width % sizes.num_heads:
            raise ValueError(f"width {width} is not divisible by {sizes.num_heads} heads.")
        self.num_heads = sizes.num_heads
        self.query = _linear(width, width, use_bias=sizes.qkv_bias, dtype=dtype, rngs=rngs)
        self.key = _linear(width, width, use_bias=sizes.qkv_bias, dtype=dtype, rngs=rngs)
        self.value = _linear(width, width, use_bias=sizes.qkv_bias, dtype=dtype, rngs=rngs)
        self.output = _linear(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape

        def heads(projection):  # [B, T, W] -> [B, T, heads, W / heads]
            return projection(x).reshape(batch, length, self.num_heads, -1)

        out = dot_product_attention(heads(self.query), heads(self.key), heads(self.value))
        return self.output(out.reshape(batch, length, width))


class Mlp(nnx.Module):
    """fc1 -> exact (erf) GELU -> fc2 (HF hidden_act "gelu"; Flax's default gelu is tanh)."""

    def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(width, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(hidden, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwiGLUMlp(nnx.Module):
    """The checkpoints' SwiGLU FFN: one fused `weights_in` ([gate; up]), then `weights_out`."""

    def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.weights_in = _linear(width, 2 * hidden, dtype=dtype, rngs=rngs)
        self.weights_out = _linear(hidden, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
        return self.weights_out(jax.nn.silu(gate) * up)


class Layer(nnx.Module):
    """HF Dinov2Layer: pre-LN attention and MLP, each scaled by its LayerScale vector."""

    def __init__(self, sizes: DINOv2Sizes, *, dtype, rngs: nnx.Rngs):
        width, eps = sizes.width, sizes.layer_norm_eps
        self.norm1 = _layer_norm(width, eps, dtype=dtype, rngs=rngs)
        self.attention = SelfAttention(sizes, dtype=dtype, rngs=rngs)
        self.layer_scale1 = nnx.Param(jnp.full((width,), sizes.layerscale_value, jnp.float32))
        self.norm2 = _layer_norm(width, eps, dtype=dtype, rngs=rngs)
        mlp = SwiGLUMlp if sizes.use_swiglu_ffn else Mlp
        self.mlp = mlp(width, sizes.mlp_dim, dtype=dtype, rngs=rngs)
        self.layer_scale2 = nnx.Param(jnp.full((width,), sizes.layerscale_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: the float32 residual stream [B, T, W]; the branches add to it in float32."""
        x = x + self.layer_scale1[...] * self.attention(self.norm1(x))
        return x + self.layer_scale2[...] * self.mlp(self.norm2(x))


class DINOv2(nnx.Module):
    """HF Dinov2Model (Dinov2WithRegistersModel with `num_register_tokens` > 0), inference only."""

    def __init__(self, sizes: DINOv2Sizes, *, dtype="float32", rngs: nnx.Rngs):
        self.sizes = sizes
        width, init = sizes.width, nnx.initializers.normal(INIT_STD)
        self.patch_embedding = nnx.Conv(
            sizes.num_channels, width, (sizes.patch_size,) * 2, strides=sizes.patch_size,
            padding="VALID", dtype=jnp.dtype(dtype), param_dtype=jnp.float32, kernel_init=init,
            rngs=rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, width), jnp.float32))
        self.register_tokens = (
            nnx.Param(jnp.zeros((1, sizes.num_register_tokens, width), jnp.float32))
            if sizes.num_register_tokens else None)
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (1, sizes.grid_size ** 2 + 1, width), jnp.float32))
        self.layer = nnx.List([Layer(sizes, dtype=jnp.dtype(dtype), rngs=rngs)
                               for _ in range(sizes.num_layers)])
        # float32 out: the teacher feature feeds a float32 InfoNCE.
        self.layernorm = _layer_norm(width, sizes.layer_norm_eps, dtype=jnp.float32, rngs=rngs)

    @classmethod
    def from_hf_config(cls, config: dict, *, dtype="float32", rngs: nnx.Rngs) -> DINOv2:
        """A randomly initialised DINOv2 shaped as an HF config.json dict describes."""
        return cls(sizes_from_hf_config(config), dtype=dtype, rngs=rngs)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """HF Dinov2Embeddings: [B, H, W, C] -> float32 tokens [B, 1 + R + h*w, width]."""
        patches = self.patch_embedding(pixels)  # VALID: a remainder row/column is dropped, as HF
        batch, height, width, channels = patches.shape
        tokens = patches.reshape(batch, height * width, channels).astype(jnp.float32)
        cls = jnp.broadcast_to(self.cls_token[...], (batch, 1, channels))
        tokens = jnp.concatenate([cls, tokens], axis=1) + interpolate_positions(
            self.position_embeddings[...], self.sizes.grid_size, height, width,
            antialias=self.sizes.interpolate_antialias)
        if self.register_tokens is None:
            return tokens
        # Registers go after CLS and get no position embedding (Dinov2WithRegistersEmbeddings).
        registers = jnp.broadcast_to(self.register_tokens[...],
                                     (batch, self.sizes.num_register_tokens, channels))
        return jnp.concatenate([tokens[:, :1], registers, tokens[:, 1:]], axis=1)

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        """Normalized pixels [B, H, W, C] (H, W multiples of the patch size; see `preprocess`)
        -> float32 {"last_hidden_state": [B, 1 + R + h*w, width] (after `layernorm`, as HF),
        "cls": [B, width] (the FQGAN teacher feature, spec §3.1), "patch_tokens": [B, h*w,
        width] (row-major over the patch grid)}."""
        x = self.embed(pixels)
        for layer in self.layer:
            x = layer(x)
        out = self.layernorm(x)
        return {"last_hidden_state": out, "cls": out[:, 0],
                "patch_tokens": out[:, 1 + self.sizes.num_register_tokens:]}


def preprocess(images: jax.Array) -> jax.Array:
    """Tokenizer images [B, H, W, 3] in [-1, 1] -> DINOv2 input (spec §3.1): [0, 1], nearest
    resize to 224 (torch's rule), ImageNet mean/std. float32 out, whatever the input dtype."""
    images01 = (images.astype(jnp.float32) + 1.0) / 2.0
    return normalize(resize_nearest_like_torch(images01, INPUT_SIZE), IMAGENET_MEAN, IMAGENET_STD)


def random_init(sizes: DINOv2Sizes, seed: int = 0, dtype="float32") -> DINOv2:
    """A randomly initialised DINOv2 (smoke runs and tests; no weights needed)."""
    return DINOv2(sizes, dtype=dtype, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------
# Hugging Face weights: a Dinov2Model's state dict key -> our path, by table.

_TOP_KEYS = {
    "embeddings.cls_token": ("cls_token",),
    "embeddings.register_tokens": ("register_tokens",),
    "embeddings.position_embeddings": ("position_embeddings",),
    "embeddings.patch_embeddings.projection.weight": ("patch_embedding", "kernel"),
    "embeddings.patch_embeddings.projection.bias": ("patch_embedding", "bias"),
    "layernorm.weight": ("layernorm", "scale"),
    "layernorm.bias": ("layernorm", "bias"),
}
_LAYER_KEYS = {
    "layer_scale1.lambda1": ("layer_scale1",),
    "layer_scale2.lambda1": ("layer_scale2",),
    **{f"{norm}.{leaf}": (norm, ours) for norm in ("norm1", "norm2")
       for leaf, ours in (("weight", "scale"), ("bias", "bias"))},
    **{f"{prefix}.{name}.{leaf}": (*parent, name if name != "dense" else "output", ours)
       for prefix, parent, names in (
           ("attention.attention", ("attention",), ("query", "key", "value")),
           ("attention.output", ("attention",), ("dense",)),
           ("mlp", ("mlp",), ("fc1", "fc2", "weights_in", "weights_out")))
       for name in names for leaf, ours in (("weight", "kernel"), ("bias", "bias"))},
}
_IGNORED_KEYS = ("embeddings.mask_token",)  # masked pretraining only
_OFFICIAL_KEY = {path: key for key, path in _TOP_KEYS.items()}
_OFFICIAL_LAYER_KEY = {path: key for key, path in _LAYER_KEYS.items()}


def official_key_to_path(official_key: str) -> tuple | None:
    """An HF Dinov2Model / Dinov2WithRegistersModel state-dict key -> our parameter path, or None
    for what inference does not use (`embeddings.mask_token`). Raises ValueError for a key that
    is not DINOv2's. Linear weights also need [out, in] -> [in, out] and the patch conv OIHW ->
    HWIO (`from_hf_state_dict`); this is the renaming alone."""
    if official_key in _IGNORED_KEYS:
        return None
    if official_key in _TOP_KEYS:
        return _TOP_KEYS[official_key]
    match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", official_key)
    if match and match.group(2) in _LAYER_KEYS:
        return ("layer", int(match.group(1)), *_LAYER_KEYS[match.group(2)])
    raise ValueError(f"Not a DINOv2 key: {official_key!r}")


def path_to_official_key(path: tuple) -> str:
    """The inverse of official_key_to_path."""
    if path[0] == "layer":
        return f"encoder.layer.{path[1]}.{_OFFICIAL_LAYER_KEY[tuple(path[2:])]}"
    return _OFFICIAL_KEY[tuple(path)]


def from_hf_state_dict(state: dict[str, np.ndarray], abstract: nnx.State, *,
                       source: str = "The state dict") -> nnx.State:
    """`abstract` (the shape-only Params of a DINOv2) filled from an HF state dict. Every
    parameter must get exactly one value of its shape; a PretrainedError starting with `source`
    names the missing, unexpected and wrong-shape keys (with the expected and found shapes)."""
    return weights.fill_params(state, abstract, key_to_path=official_key_to_path,
                               path_to_key=path_to_official_key,
                               what="DINOv2 built from its config", source=source)


def abstract_model(sizes: DINOv2Sizes, dtype="float32") -> tuple[nnx.GraphDef, nnx.State]:
    """The graphdef and shape-only parameters of a DINOv2, with no parameter allocated."""
    module = nnx.eval_shape(lambda: DINOv2(sizes, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(module, nnx.Param)


def load_dinov2(path: str, *, dtype="float32") -> DINOv2:
    """The DINOv2 of an HF snapshot directory (config.json + model.safetensors or
    pytorch_model.bin) or of its weights file, computing in `dtype`."""
    try:
        config = weights.read_config(path)
        sizes = sizes_from_hf_config(config)
        state = weights.read_state_dict(path)
    except ValueError as error:  # PretrainedError included
        raise weights.PretrainedError(
            f"Cannot load DINOv2 from {path}: {error} {HOW_TO_GET}") from error
    graphdef, abstract = abstract_model(sizes, dtype)
    params = from_hf_state_dict(state, abstract, source=weights.weights_file(path))
    return nnx.merge(graphdef, params)
