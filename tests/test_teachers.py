"""The teacher registry: widths that size the prediction heads, frozen features, width checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_reference import import_torchvision

from fqgan_jax.frozen import teachers, weights


def test_widths_of_the_papers_teachers():
    """spec fqgan.md §3.1: CLIP L/14 1024 (Dual sem), DINOv2-S 384 and CLIP B/16 768 (Triple)."""
    widths = {name: teachers.kind(name).width for name in ("clip_vit_l14", "dinov2_s14",
                                                            "clip_vit_b16", "dinov2_b14")}
    assert widths == {"clip_vit_l14": 1024, "dinov2_s14": 384, "clip_vit_b16": 768,
                      "dinov2_b14": 768}
    with pytest.raises(ValueError, match="Unknown teacher 'clip_vit_h14'.*clip_vit_l14"):
        teachers.kind("clip_vit_h14")


@pytest.mark.parametrize("name", ["clip_tiny", "dinov2_tiny"])
def test_features_are_constant_cls_vectors(name):
    module = teachers.random_teacher(name)
    features = teachers.teacher_features(module, name)
    images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
    cls = features(images)
    assert cls.shape == (2, teachers.kind(name).width) and cls.dtype == jnp.float32
    grad = jax.grad(lambda x: jnp.sum(features(x)))(images)
    assert np.all(np.asarray(grad) == 0)  # frozen: no gradient through the teacher


def test_a_file_of_another_width_is_refused(tmp_path):
    import_torchvision()
    from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: PLC0415

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=16)
                    ).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(weights.PretrainedError, match="width 32.*clip_vit_b16.*width 768"):
        teachers.load_teacher("clip_vit_b16", str(tmp_path))
