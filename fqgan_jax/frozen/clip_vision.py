"""The CLIP vision tower (transformers' `CLIPVisionModel`), FQGAN's frozen semantic teacher.

Spec fqgan.md §3.1: Dual distils `openai/clip-vit-large-patch14`, Triple's high-level branch
`openai/clip-vit-base-patch16`. The feature is the CLS token of `hidden_states[-1]`, i.e. the
final encoder layer's output BEFORE `post_layernorm`, with no visual projection; we return it as
`cls`. The forward pass is HF's:

    patch conv (no bias) -> [class_embedding; patches] + position_embedding -> pre_layrnorm
    -> N pre-LN layers: x + out_proj(attn(q_proj, k_proj, v_proj of layer_norm1(x)))
                        x + fc2(act(fc1(layer_norm2(x))))          act: quick_gelu or gelu (erf)
    last_hidden_state = x;  pooler_output = post_layernorm(x[:, 0])

VQGAN-LC's codebook features (spec large_codebooks.md §A.1) are the PATCH tokens after
`post_layernorm` and CLIP's `visual_projection` (HF CLIPVisionModelWithProjection; OpenAI's
`ln_post` and `proj`): 768-d for ViT-L/14. A tower built with `projection_dim` (or loaded with
`with_projection=True`) holds that bias-free projection and also returns `patch_embeds`
[B, N, P] and HF's `image_embeds` (the projected pooled CLS); without it, nothing changes.

Module and parameter names are HF's (`pre_layrnorm` is HF's spelling), so checkpoint keys map
by a table (`official_key_to_path`) and the weights load straight from a Hugging Face snapshot
(config.json + model.safetensors) with `load_clip_vision`: no conversion step, no torch.

Precision: parameters are float32. The patch conv, the Linears, the MLP activation and the
attention's weighted sum compute in `dtype`; the residual stream, the LayerNorms and the
attention logits/softmax stay float32 (HF under bf16 runs all of them in bf16). On the tiny test
tower, bf16 moves the CLS by ~0.2% of its largest entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fqgan_jax.frozen import weights
from fqgan_jax.frozen.preprocess import normalize, resize_nearest_like_torch
from fqgan_jax.models.adapter import linear
from fqgan_jax.models.layers import dot_product_attention, torch_kernel_init

# OpenAI CLIP's image normalization (spec fqgan.md §3.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The two towers FQGAN distils (spec §3.1), as CLIPVision(**preset) arguments.
CLIP_VIT_B16 = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                    patch_size=16, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_VIT_L14 = dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                    patch_size=14, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)

# transformers' CLIPVisionConfig defaults, for config.json files that leave fields out.
_HF_CONFIG_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, patch_size=32, image_size=224,
                           num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_HF_MODEL_TYPES = ("clip", "clip_vision_model")
_HF_DEFAULT_PROJECTION_DIM = 512  # CLIPConfig's and CLIPVisionConfig's default

HOW_TO_GET = ("Download a CLIP snapshot, e.g.: huggingface-cli download "
              "openai/clip-vit-large-patch14 --include config.json model.safetensors "
              "--local-dir DIR (openai/clip-vit-base-patch16 for Triple's high-level teacher), "
              "and pass DIR.")


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, x * sigmoid(1.702 x) (HF "quick_gelu")."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """HF "gelu": the exact erf form; Flax's default is the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


class CLIPVisionEmbeddings(nnx.Module):
    """Patch conv (stride = kernel = patch, no bias), CLS prepended, learned positions added."""

    def __init__(self, hidden_size: int, patch_size: int, image_size: int, num_channels: int, *,
                 dtype, rngs: nnx.Rngs):
        self.image_size = image_size
        # The init only matters for random towers (smoke runs): real weights come from a file.
        self.patch_embedding = nnx.Conv(
            num_channels, hidden_size, (patch_size, patch_size), strides=patch_size,
            padding="VALID", use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (hidden_size,)) * hidden_size ** -0.5)
        num_positions = (image_size // patch_size) ** 2 + 1
        self.position_embedding = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (num_positions, hidden_size)))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """[B, S, S, C] normalized pixels -> float32 tokens [B, 1 + (S/patch)², W]."""
        if pixels.shape[1:3] != (self.image_size, self.image_size):
            # HF can interpolate the positions instead; FQGAN always resizes to image_size.
            raise ValueError(
                f"CLIP vision input is {pixels.shape[1]}x{pixels.shape[2]}, the tower takes "
                f"{self.image_size}x{self.image_size}; resize with `preprocess` first.")
        patches = self.patch_embedding(pixels).astype(jnp.float32)
        batch, _, _, width = patches.shape
        patches = patches.reshape(batch, -1, width)  # row-major, as torch's flatten(2)
        cls = jnp.broadcast_to(self.class_embedding[...], (batch, 1, width))
        return jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...]


def layer_norm(width: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """nn.LayerNorm(width, eps), computing and returning float32 whatever the tower's dtype."""
    return nnx.LayerNorm(width, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                         rngs=rngs)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with separate biased q/k/v/out projections, no mask."""

    def __init__(self, width: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"CLIP width {width} is not divisible by {num_heads} heads.")
        self.num_heads = num_heads
        self.q_proj = linear(width, width, dtype=dtype, rngs=rngs)
        self.k_proj = linear(width, width, dtype=dtype, rngs=rngs)
        self.v_proj = linear(width, width, dtype=dtype, rngs=rngs)
        self.out_proj = linear(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape

        def heads(proj):  # [B, T, W] -> [B, T, heads, W / heads]
            return proj(x).reshape(batch, length, self.num_heads, width // self.num_heads)

        out = dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj))
        return self.out_proj(out.reshape(batch, length, width))


class CLIPMLP(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, width: int, hidden: int, activation, *, dtype, rngs: nnx.Rngs):
        self.activation = activation  # a module-level function: static, hashable
        self.fc1 = linear(width, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = linear(hidden, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + self_attn(layer_norm1(x)); x + mlp(layer_norm2(x))."""

    def __init__(self, width: int, num_heads: int, intermediate_size: int, activation,
                 eps: float, *, dtype, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(width, num_heads, dtype=dtype, rngs=rngs)
        self.layer_norm1 = layer_norm(width, eps, rngs=rngs)
        self.mlp = CLIPMLP(width, intermediate_size, activation, dtype=dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(width, eps, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """Holds `layers`, so that paths read as HF's keys: encoder.layers.<i>...."""

    def __init__(self, layers: list[CLIPEncoderLayer]):
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVision(nnx.Module):
    """HF CLIPVisionModel; float32 parameters, matmuls in `dtype`. See the module docstring."""

    def __init__(self, *, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, patch_size: int, image_size: int,
                 hidden_act: str = "quick_gelu", layer_norm_eps: float = 1e-5,
                 num_channels: int = 3, projection_dim: int | None = None, dtype="float32",
                 rngs: nnx.Rngs):
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {hidden_act!r} is not supported; this port has "
                             f"{', '.join(ACTIVATIONS)}.")
        if image_size % patch_size:
            raise ValueError(f"CLIP image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}.")
        dtype = jnp.dtype(dtype)
        self.image_size = image_size
        self.embeddings = CLIPVisionEmbeddings(hidden_size, patch_size, image_size, num_channels,
                                               dtype=dtype, rngs=rngs)
        self.pre_layrnorm = layer_norm(hidden_size, layer_norm_eps, rngs=rngs)
        self.encoder = CLIPEncoder([
            CLIPEncoderLayer(hidden_size, num_heads, intermediate_size, ACTIVATIONS[hidden_act],
                             layer_norm_eps, dtype=dtype, rngs=rngs)
            for _ in range(num_layers)])
        self.post_layernorm = layer_norm(hidden_size, layer_norm_eps, rngs=rngs)
        # HF's visual_projection: nn.Linear(hidden_size, projection_dim, bias=False).
        self.visual_projection = nnx.Linear(
            hidden_size, projection_dim, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=torch_kernel_init(), rngs=rngs) if projection_dim else None

    @property
    def projection_dim(self) -> int | None:
        """The width of `patch_embeds`, or None for a tower without the projection."""
        return None if self.visual_projection is None else self.visual_projection.out_features

    @classmethod
    def from_hf_config(cls, config: dict, *, dtype="float32", rngs: nnx.Rngs) -> CLIPVision:
        """The tower a HF config.json describes (CLIPVisionConfig, or a CLIPConfig's
        `vision_config`)."""
        return cls(**sizes_from_hf_config(config), dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        """[B, S, S, 3] CLIP-normalized pixels at S = image_size -> float32
        {"last_hidden_state": [B, 1 + N, W] (HF's hidden_states[-1], pre post_layernorm),
         "pooler_output": post_layernorm of its CLS, [B, W],
         "cls": its CLS, [B, W] (the FQGAN teacher feature, spec §3.1)},
        and with the projection also
        {"image_embeds": visual_projection(pooler_output), [B, P] (HF's),
         "patch_embeds": visual_projection(post_layernorm(patch tokens)), [B, N, P] (the
         VQGAN-LC codebook features, spec large_codebooks.md §A.1; row-major patch order)}."""
        hidden = self.pre_layrnorm(self.embeddings(pixels))
        hidden = self.encoder(hidden)
        cls = hidden[:, 0]
        outputs = {"last_hidden_state": hidden, "pooler_output": self.post_layernorm(cls),
                   "cls": cls}
        if self.visual_projection is not None:
            project = lambda x: self.visual_projection(x).astype(jnp.float32)  # noqa: E731
            outputs["image_embeds"] = project(outputs["pooler_output"])
            outputs["patch_embeds"] = project(self.post_layernorm(hidden[:, 1:]))
        return outputs

    def preprocess(self, images: jax.Array) -> jax.Array:
        """Tokenizer images ([-1, 1], [B, H, W, 3]) -> this tower's input; see `preprocess`."""
        return preprocess(images, self.image_size)


def preprocess(images: jax.Array, image_size: int = 224) -> jax.Array:
    """Spec fqgan.md §3.1: [-1, 1] -> [0, 1] -> nearest resize to image_size (torch's rule)
    -> OpenAI CLIP mean/std. float32 out, whatever the input dtype."""
    images01 = (images.astype(jnp.float32) + 1.0) / 2.0
    return normalize(resize_nearest_like_torch(images01, image_size), CLIP_MEAN, CLIP_STD)


def sizes_from_hf_config(config: dict) -> dict:
    """CLIPVision constructor arguments from a HF config.json dict.

    A CLIPConfig nests the tower under `vision_config`; old hub configs (openai/clip-vit-*)
    also carry a `vision_config_dict`, which transformers lets override `vision_config`.
    Fields left out take CLIPVisionConfig's defaults, as transformers does.
    """
    model_type = config.get("model_type")
    if model_type is not None and model_type not in _HF_MODEL_TYPES:
        raise ValueError(f"config.json has model_type {model_type!r}, not a CLIP model "
                         f"({' or '.join(_HF_MODEL_TYPES)}).")
    if "vision_config" in config or "vision_config_dict" in config:
        config = {**(config.get("vision_config") or {}),
                  **(config.get("vision_config_dict") or {})}
    config = {**_HF_CONFIG_DEFAULTS, **config}
    return dict(
        hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
        patch_size=weights.square_size(config, "patch_size"),
        image_size=weights.square_size(config, "image_size"),
        hidden_act=config["hidden_act"], layer_norm_eps=config["layer_norm_eps"],
        num_channels=config["num_channels"])


def projection_dim_from_hf_config(config: dict) -> int:
    """`visual_projection`'s output width from a HF config.json: CLIPConfig's top-level
    `projection_dim` (what transformers uses), else its vision config's (a
    CLIPVisionConfig saved by CLIPVisionModelWithProjection has it at the top), else HF's
    default 512."""
    for section in (config, config.get("vision_config_dict") or {},
                    config.get("vision_config") or {}):
        if section.get("projection_dim") is not None:
            return int(section["projection_dim"])
    return _HF_DEFAULT_PROJECTION_DIM


def random_init(preset_or_sizes: dict, seed: int = 0, dtype="float32",
                projection_dim: int | None = None) -> CLIPVision:
    """A randomly initialised tower (e.g. CLIP_VIT_L14) for smoke runs without weights; with
    `projection_dim`, with the visual projection too."""
    return CLIPVision(**preset_or_sizes, projection_dim=projection_dim, dtype=dtype,
                      rngs=nnx.Rngs(seed))


# Keys of a full CLIPModel / CLIPVisionModelWithProjection checkpoint that the tower does not use.
_IGNORED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.")
_IGNORED_KEYS = ("logit_scale", "embeddings.position_ids")
_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                  "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
_NORMS = ("pre_layrnorm", "post_layernorm", "layer_norm1", "layer_norm2")


def official_key_to_path(official_key: str, with_projection: bool = False) -> tuple | None:
    """One HF CLIP state_dict key -> our parameter path, or None if the tower does not use it.

    A CLIPModel checkpoint (the hub's openai/clip-vit-*) and transformers 4.x's CLIPVisionModel
    prefix the tower's keys with `vision_model.`; transformers 5's CLIPVisionModel.save_pretrained
    writes them bare. Both are accepted. The path mirrors the key: `encoder.layers.3.mlp.fc1.weight`
    -> ("encoder", "layers", 3, "mlp", "fc1", "kernel"); torch's `weight` is a LayerNorm `scale`,
    otherwise a `kernel` (which also needs a transpose: `from_hf_state_dict`). None for the text
    model, the projections, `logit_scale` and the `position_ids` buffers; `with_projection`
    (a tower built with `projection_dim`) maps `visual_projection.weight` too.
    """
    if with_projection and official_key == "visual_projection.weight":
        return ("visual_projection", "kernel")
    key = official_key.removeprefix("vision_model.")
    if official_key.startswith(_IGNORED_PREFIXES) or key in _IGNORED_KEYS:
        return None
    if key == "embeddings.class_embedding":
        return ("embeddings", "class_embedding")
    if key == "embeddings.position_embedding.weight":
        return ("embeddings", "position_embedding")
    if key == "embeddings.patch_embedding.weight":
        return ("embeddings", "patch_embedding", "kernel")
    *module, leaf = key.split(".")
    if leaf in ("weight", "bias"):
        if len(module) == 1 and module[0] in ("pre_layrnorm", "post_layernorm"):
            return (module[0], _leaf(module[0], leaf))
        if (len(module) > 3 and module[:2] == ["encoder", "layers"] and module[2].isdigit()
                and ".".join(module[3:]) in _LAYER_MODULES):
            return ("encoder", "layers", int(module[2]), *module[3:], _leaf(module[-1], leaf))
    raise ValueError(f"Not a CLIP vision tower key: {official_key!r}")


def _leaf(module: str, torch_leaf: str) -> str:
    if torch_leaf == "bias":
        return "bias"
    return "scale" if module in _NORMS else "kernel"


def _official_key(path: tuple) -> str:
    """Our path -> the (unprefixed) HF key that fills it; the inverse of official_key_to_path."""
    if path == ("embeddings", "position_embedding"):
        return "embeddings.position_embedding.weight"
    *module, leaf = (str(part) for part in path)
    return ".".join([*module, "weight" if leaf in ("kernel", "scale") else leaf])


def from_hf_state_dict(state: dict[str, np.ndarray], abstract: nnx.State) -> nnx.State:
    """`abstract` (the tower's shape-only nnx.Param state) filled from a HF state dict.

    Every parameter must get exactly one value of its shape; a key of the vision tower that
    has no parameter here is an error too (a deeper or differently built tower). All problems
    are reported at once, as one PretrainedError naming the keys. The visual projection is read
    when `abstract` has one (a tower built with `projection_dim`).
    """
    with_projection = any(path[0] == "visual_projection"
                          for path, _ in nnx.to_flat_state(abstract))
    return weights.fill_params(
        state, abstract, path_to_key=_official_key, what="CLIP vision tower",
        key_to_path=lambda key: official_key_to_path(key, with_projection=with_projection))


def load_clip_vision(path: str, *, dtype="float32", with_projection: bool = False
                     ) -> CLIPVision:
    """The tower of a HF snapshot directory (config.json + weights) or weights file, computing
    in `dtype`; `with_projection` also reads `visual_projection.weight` (a CLIPModel or
    CLIPVisionModelWithProjection checkpoint; its width from config.json). Built shape-only
    first, so no random init runs; errors are PretrainedErrors that name `path` and how to
    download the weights."""
    try:
        config = weights.read_config(path)
        sizes = sizes_from_hf_config(config)
        projection_dim = projection_dim_from_hf_config(config) if with_projection else None
        module = nnx.eval_shape(lambda: CLIPVision(**sizes, projection_dim=projection_dim,
                                                   dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, abstract = nnx.split(module, nnx.Param)
        params = from_hf_state_dict(weights.read_state_dict(path), abstract)
    except ValueError as error:  # PretrainedError included; also a config it cannot build
        raise weights.PretrainedError(
            f"Cannot load a CLIP vision tower from {path}: {error} {HOW_TO_GET}") from error
    return nnx.merge(graphdef, params)
