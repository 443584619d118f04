"""The frozen teachers of representation learning, by name (spec fqgan.md §3.1).

A config names a teacher per semantic branch (`clip_vit_l14` for Dual's `sem`; `dinov2_s14` and
`clip_vit_b16` for Triple). Each kind knows its architecture, its width (which sizes the branch's
FeatPredHead), its Hugging Face source, and its input preprocessing. The `*_tiny` kinds are small
random towers for CPU smoke runs; they are never loaded from a file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from flax import nnx

from fqgan_jax.models import clip_vision, dinov2
from fqgan_jax.pretrained import PretrainedError


@dataclasses.dataclass(frozen=True)
class TeacherKind:
    family: str  # "clip" | "dinov2"
    sizes: object  # clip_vision preset dict or dinov2.DINOv2Sizes
    hf_id: str  # where the weights come from; "" for random-only kinds

    @property
    def width(self) -> int:
        return self.sizes["hidden_size"] if self.family == "clip" else self.sizes.width


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
    """The tower of kind `name` from a Hugging Face snapshot or weights file at `path`; its
    width must be the kind's (a ViT-B file given for ViT-L is refused, naming both)."""
    spec = kind(name)
    load = clip_vision.load_clip_vision if spec.family == "clip" else dinov2.load_dinov2
    module = load(path, dtype=dtype)
    found = _width(module, spec.family)
    if found != spec.width:
        raise PretrainedError(f"{path} holds a {spec.family} tower of width {found}, but teacher "
                              f"{name!r} ({spec.hf_id}) has width {spec.width}.")
    return module


def _width(module, family: str) -> int:
    if family == "clip":
        return module.embeddings.class_embedding[...].shape[-1]
    return module.sizes.width


def teacher_features(module, name: str) -> Callable:
    """images in [-1, 1] -> the teacher's CLS feature [B, W], a constant (stop_gradient)."""
    preprocess = clip_vision.preprocess if kind(name).family == "clip" else dinov2.preprocess

    def features(images):
        return jax.lax.stop_gradient(module(preprocess(images))["cls"])
    return features
