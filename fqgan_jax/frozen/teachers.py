"""The frozen teachers of representation learning, by name (spec fqgan.md §3.1).

A config names a teacher per semantic branch (`clip_vit_l14` for Dual's `sem`; `dinov2_s14` and
`clip_vit_b16` for Triple). Each kind knows its architecture, its width (which sizes the branch's
FeatPredHead), its Hugging Face source, and its input preprocessing. The `*_tiny` kinds are small
random towers for CPU smoke runs; they are never loaded from a file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
from flax import nnx

from fqgan_jax.frozen import clip_vision, dinov2, weights
from fqgan_jax.frozen.weights import PretrainedError


@dataclasses.dataclass(frozen=True)
class TeacherKind:
    family: str  # "clip" | "dinov2"
    sizes: object  # clip_vision preset dict or dinov2.DINOv2Sizes
    hf_id: str  # where the weights come from; "" for random-only kinds

    @property
    def width(self) -> int:
        return self.sizes["hidden_size"] if self.family == "clip" else self.sizes.width

    @property
    def is_random(self) -> bool:
        return not self.hf_id

    def default_path(self) -> str:
        """Where a config with `path=""` looks: $FQGAN_JAX_WEIGHTS_DIR/<repo name>."""
        return weights.default_path(self.hf_id.rsplit("/", 1)[-1])

    def how_to_get(self, path: str) -> str:
        return (f"Download it with: huggingface-cli download {self.hf_id} --include config.json "
                f"model.safetensors --local-dir {path}")


_TINY_CLIP = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                  patch_size=16, image_size=224, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TINY_DINOV2 = dinov2.DINOv2Sizes(width=48, num_layers=2, num_heads=4, mlp_dim=96, patch_size=16,
                                  image_size=224)

KINDS = {
    "clip_vit_l14": TeacherKind("clip", clip_vision.CLIP_VIT_L14, "openai/clip-vit-large-patch14"),
    "clip_vit_b16": TeacherKind("clip", clip_vision.CLIP_VIT_B16, "openai/clip-vit-base-patch16"),
    "dinov2_s14": TeacherKind("dinov2", dinov2.DINOV2_S14, "facebook/dinov2-small"),
    "dinov2_b14": TeacherKind("dinov2", dinov2.DINOV2_B14, "facebook/dinov2-base"),
    "clip_tiny": TeacherKind("clip", _TINY_CLIP, ""),
    "dinov2_tiny": TeacherKind("dinov2", _TINY_DINOV2, ""),
}


def kind(name: str) -> TeacherKind:
    if name not in KINDS:
        raise ValueError(f"Unknown teacher {name!r}; known: {', '.join(sorted(KINDS))}.")
    return KINDS[name]


def random_teacher(name: str, *, seed: int = 0, dtype="float32") -> nnx.Module:
    """A randomly initialised tower of kind `name` (smoke runs: labeled as such in the log)."""
    spec = kind(name)
    if spec.family == "clip":
        return clip_vision.random_init(spec.sizes, seed, dtype)
    return dinov2.random_init(spec.sizes, seed, dtype)


def load_teacher(name: str, path: str, *, dtype="float32") -> nnx.Module:
    """The tower of kind `name` from a Hugging Face snapshot or weights file at `path`. Its
    architecture must be the kind's: a ViT-B file given for ViT-L is refused, naming both. The
    check reads only config.json, so a wrong snapshot is refused before its weights are read."""
    spec = kind(name)
    if spec.is_random:
        raise PretrainedError(f"Teacher {name!r} is a random-init kind; it has no weights file.")
    if not os.path.exists(path):
        raise PretrainedError(f"Teacher {name!r}: {path} does not exist. "
                              f"{spec.how_to_get(path)}")
    expected, found = _comparable(spec.sizes, spec.family), _snapshot_sizes(name, path)
    if found != expected:
        differ = ", ".join(f"{key} {found.get(key)} (expected {value})"
                           for key, value in expected.items() if found.get(key) != value)
        raise PretrainedError(f"{path} holds a {spec.family} tower of width "
                              f"{found['width']}, but teacher {name!r} ({spec.hf_id}) has width "
                              f"{spec.width}: {differ}. Point the branch to the right files or "
                              f"pick the matching kind ({', '.join(sorted(KINDS))}).")
    load = clip_vision.load_clip_vision if spec.family == "clip" else dinov2.load_dinov2
    return load(path, dtype=dtype)


def _comparable(sizes, family: str) -> dict:
    """The architecture fields of a kind's sizes (init-only values dropped), width included."""
    if family == "clip":
        fields = dict(sizes)
        fields["width"] = fields["hidden_size"]
    else:
        fields = dataclasses.asdict(sizes)
        fields.pop("layerscale_value")
    return fields


def _snapshot_sizes(name: str, path: str) -> dict:
    """The architecture the snapshot's config.json describes, in `_comparable`'s fields."""
    spec = kind(name)
    try:
        config = weights.read_config(path)
        if spec.family == "dinov2":
            return _comparable(dinov2.sizes_from_hf_config(config), "dinov2")
        sizes = clip_vision.sizes_from_hf_config(config)
    except ValueError as error:  # PretrainedError included; also a config of another model
        raise PretrainedError(f"Cannot read teacher {name!r} from {path}: {error} "
                              f"{spec.how_to_get(path)}") from error
    return _comparable({key: sizes.get(key) for key in spec.sizes}, "clip")


def abstract(name: str, dtype="float32") -> tuple[nnx.GraphDef, nnx.State]:
    """The graphdef and shape-only parameters of kind `name`, with nothing allocated; a loaded
    tower of that kind has exactly these parameters."""
    return nnx.split(nnx.eval_shape(lambda: random_teacher(name, dtype=dtype)), nnx.Param)


def cls_features(graphdef: nnx.GraphDef, params: nnx.State, name: str,
                 images: jax.Array) -> jax.Array:
    """The functional form of `teacher_features`, for the train step."""
    return teacher_features(nnx.merge(graphdef, params), name)(images)


def teacher_features(module, name: str) -> Callable:
    """images in [-1, 1] -> the teacher's CLS feature [B, W], a constant (stop_gradient)."""
    if kind(name).family == "clip":
        preprocess = lambda images: clip_vision.preprocess(images, module.image_size)  # noqa: E731
    else:
        preprocess = dinov2.preprocess

    def features(images):
        return jax.lax.stop_gradient(module(preprocess(images))["cls"])
    return features
