"""The CLIP vision teacher against transformers' CLIPVisionModel: outputs, gradients, the
nearest-resize preprocessing, checkpoint loading and its errors, and the full-size presets."""

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from torch_reference import import_torchvision

from fqgan_jax.frozen import clip_vision, weights
from fqgan_jax.frozen.preprocess import resize_nearest_like_torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8)
TINY_SIZES = clip_vision.sizes_from_hf_config(TINY)  # the same tower as CLIPVision arguments
ATOL = 1e-4


@pytest.fixture(scope="module")
def transformers():
    """Imported here, not at collection: it takes seconds, and its CLIP needs torchvision
    imported first (see torch_reference)."""
    import_torchvision()
    import transformers  # noqa: PLC0415

    return transformers


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def tower(request, transformers, tmp_path_factory):
    """(torch reference in eval mode, its save_pretrained directory) for each activation."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**TINY, hidden_act=request.param)
    model = transformers.CLIPVisionModel(config).eval()
    directory = tmp_path_factory.mktemp(f"clip_{request.param}")
    model.save_pretrained(directory, safe_serialization=True)
    return model, str(directory)


def normalized_pixels(batch: int = 2, size: int = 32, seed: int = 0) -> np.ndarray:
    """Random CLIP-normalized pixels, NCHW (torch's layout)."""
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def nhwc(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def torch_outputs(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), output_hidden_states=True)
    return {"last_hidden_state": out.hidden_states[-1].numpy(),
            "pooler_output": out.pooler_output.numpy()}


def test_outputs_match_transformers(tower):
    model, directory = tower
    pixels = normalized_pixels()
    want = torch_outputs(model, pixels)
    got = jax.tree.map(np.asarray, clip_vision.load_clip_vision(directory)(nhwc(pixels)))
    cls_diff = np.abs(got["cls"] - want["last_hidden_state"][:, 0]).max()
    patch_diff = np.abs(got["last_hidden_state"][:, 1:] - want["last_hidden_state"][:, 1:]).max()
    pooler_diff = np.abs(got["pooler_output"] - want["pooler_output"]).max()
    print(f"max |diff|: cls {cls_diff:.2e}, patches {patch_diff:.2e}, pooler {pooler_diff:.2e}")
    assert got["last_hidden_state"].shape == (2, 1 + 16, 64)
    np.testing.assert_array_equal(got["cls"], got["last_hidden_state"][:, 0])
    assert max(cls_diff, patch_diff, pooler_diff) < ATOL


def test_loads_the_tower_of_a_full_clip_checkpoint(transformers, tmp_path):
    """Hub snapshots (openai/clip-vit-*) are CLIPModels: `vision_model.`-prefixed tower keys
    beside the text model, the projections and logit_scale, with the sizes in vision_config."""
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        vision_config=TINY, text_config=dict(hidden_size=32, intermediate_size=64, vocab_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             bos_token_id=0, eos_token_id=1, pad_token_id=1))
    full = transformers.CLIPModel(config).eval()
    full.save_pretrained(tmp_path, safe_serialization=True)
    keys = weights.read_state_dict(str(tmp_path)).keys()
    assert "vision_model.pre_layrnorm.weight" in keys and "text_projection.weight" in keys
    pixels = normalized_pixels(batch=1)
    want = torch_outputs(full.vision_model, pixels)
    got = clip_vision.load_clip_vision(str(tmp_path / "model.safetensors"))(nhwc(pixels))
    np.testing.assert_allclose(got["last_hidden_state"], want["last_hidden_state"], atol=ATOL)


def test_cls_gradient_matches_torch(tower):
    model, directory = tower
    pixels = normalized_pixels(batch=1, seed=2)
    weights = np.random.default_rng(3).normal(size=(64,)).astype(np.float32)
    ours = clip_vision.load_clip_vision(directory)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ours(x)["cls"] * weights)))(nhwc(pixels))
    x = torch.from_numpy(pixels).requires_grad_(True)
    cls = model(x, output_hidden_states=True).hidden_states[-1][:, 0]
    (cls * torch.from_numpy(weights)).sum().backward()
    want = x.grad.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("in_size,out_size", [(256, 224), (64, 32), (48, 224), (2, 82)])
def test_resize_nearest_is_torch_interpolate(in_size, out_size):
    """(2, 82): a size pair where float32 floor(dst * in / out) differs from exact arithmetic."""
    images = np.random.default_rng(in_size).normal(size=(2, in_size, in_size, 3))
    images = images.astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(images.transpose(0, 3, 1, 2)),
                                           size=(out_size, out_size), mode="nearest")
    got = resize_nearest_like_torch(jnp.asarray(images), out_size)
    np.testing.assert_array_equal(np.asarray(got), want.numpy().transpose(0, 2, 3, 1))


def test_preprocess_is_the_official_teacher_input():
    """Spec §3.1: [-1, 1] -> [0, 1] -> F.interpolate(224) -> Normalize(OpenAI CLIP mean, std)."""
    assert clip_vision.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert clip_vision.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    images = np.random.default_rng(0).uniform(-1, 1, size=(2, 256, 256, 3)).astype(np.float32)
    x = (torch.from_numpy(images.transpose(0, 3, 1, 2)) + 1) / 2
    x = torch.nn.functional.interpolate(x, size=(224, 224))
    x = import_torchvision().transforms.Normalize(clip_vision.CLIP_MEAN, clip_vision.CLIP_STD)(x)
    got = clip_vision.preprocess(jnp.asarray(images), image_size=224)
    np.testing.assert_allclose(got, x.numpy().transpose(0, 2, 3, 1), atol=1e-6)


def test_bf16_compute_is_close_to_float32(tower):
    _, directory = tower
    pixels = nhwc(normalized_pixels())
    f32 = clip_vision.load_clip_vision(directory)(pixels)["cls"]
    bf16_tower = clip_vision.load_clip_vision(directory, dtype="bfloat16")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(bf16_tower)))
    bf16 = bf16_tower(pixels)["cls"]
    assert bf16.dtype == jnp.float32
    error = float(jnp.abs(bf16 - f32).max() / jnp.abs(f32).max())
    print(f"bf16 vs float32 CLS: max |diff| / max |cls| = {error:.2e}")
    assert 0 < error < 0.02


def test_wrong_input_size_is_an_error(tower):
    with pytest.raises(ValueError, match="64x64.*32x32.*preprocess"):
        clip_vision.load_clip_vision(tower[1])(jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize("preset,hf_sizes", [
    (clip_vision.CLIP_VIT_B16, dict(hidden_size=768, intermediate_size=3072,
                                    num_hidden_layers=12, num_attention_heads=12, patch_size=16)),
    (clip_vision.CLIP_VIT_L14, dict(hidden_size=1024, intermediate_size=4096,
                                    num_hidden_layers=24, num_attention_heads=16, patch_size=14)),
])
def test_presets_have_the_parameter_counts_of_transformers(transformers, preset, hf_sizes):
    """ViT-B/16: 85,799,424; ViT-L/14: 303,179,776 (post_layernorm included, no projection)."""
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        reference = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(**hf_sizes, image_size=224, hidden_act="quick_gelu"))
    want = sum(p.numel() for p in reference.parameters())
    abstract = nnx.eval_shape(lambda: clip_vision.random_init(preset))
    got = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert got == want


def test_sizes_from_a_hub_style_clip_config():
    """openai/clip-vit-large-patch14's config.json: a CLIPConfig whose `vision_config_dict`
    overrides `vision_config`; fields left out take CLIPVisionConfig's defaults."""
    config = {"model_type": "clip", "vision_config": {"hidden_size": 768, "patch_size": 32},
              "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096,
                                     "num_attention_heads": 16, "num_hidden_layers": 24,
                                     "patch_size": 14}}
    assert clip_vision.sizes_from_hf_config(config) == dict(clip_vision.CLIP_VIT_L14,
                                                            num_channels=3)
    with pytest.raises(ValueError, match="dinov2"):
        clip_vision.sizes_from_hf_config({"model_type": "dinov2"})


def test_official_keys():
    to_path = clip_vision.official_key_to_path
    assert to_path("vision_model.encoder.layers.3.self_attn.q_proj.weight") == (
        "encoder", "layers", 3, "self_attn", "q_proj", "kernel")
    assert to_path("encoder.layers.0.layer_norm2.weight") == (
        "encoder", "layers", 0, "layer_norm2", "scale")
    assert to_path("vision_model.pre_layrnorm.bias") == ("pre_layrnorm", "bias")
    for ignored in ("text_model.encoder.layers.0.mlp.fc1.weight", "visual_projection.weight",
                    "text_projection.weight", "logit_scale",
                    "vision_model.embeddings.position_ids"):
        assert to_path(ignored) is None
    for bad in ("encoder.layers.0.attn.qkv.weight", "vision_model.head.weight", "embed.weight"):
        with pytest.raises(ValueError, match="Not a CLIP vision tower key"):
            to_path(bad)


def test_missing_checkpoint_says_how_to_download(tmp_path):
    with pytest.raises(weights.PretrainedError,
                       match="(?s)nowhere.*huggingface-cli download openai/clip-vit-large"):
        clip_vision.load_clip_vision(str(tmp_path / "nowhere"))


def test_checkpoint_errors_name_the_keys(tower):
    _, directory = tower
    state = weights.read_state_dict(directory)
    abstract = nnx.state(nnx.eval_shape(lambda: clip_vision.random_init(TINY_SIZES)), nnx.Param)
    clip_vision.from_hf_state_dict(state, abstract)  # the unmodified state fits
    for extra in ("encoder.layers.2.mlp.fc1.bias",  # a deeper tower
                  "vision_model.embeddings.patch_embedding.bias"):  # CLIP's patch conv has none
        with pytest.raises(weights.PretrainedError, match=f"1 unexpected: {extra}"):
            clip_vision.from_hf_state_dict(dict(state, **{extra: np.zeros(64)}), abstract)
    del state["post_layernorm.weight"]
    with pytest.raises(weights.PretrainedError, match="1 missing: post_layernorm.weight"):
        clip_vision.from_hf_state_dict(state, abstract)


def test_wrong_shape_error_names_the_file_and_the_array(tower, tmp_path):
    _, directory = tower
    state = weights.read_state_dict(directory)
    state["encoder.layers.1.mlp.fc1.weight"] = np.zeros((64, 64), np.float32)
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(f"{directory}/config.json", tmp_path)
    with pytest.raises(weights.PretrainedError,
                       match=rf"(?s){re.escape(str(tmp_path))}.*1 with the wrong shape: "
                             r"encoder.layers.1.mlp.fc1.weight \(expected \(128, 64\), "
                             r"found \(64, 64\)\).*huggingface-cli download"):
        clip_vision.load_clip_vision(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# The visual projection of the patch tokens (VQGAN-LC's codebook features, spec
# large_codebooks.md §A.1), against transformers' CLIPVisionModelWithProjection.

PROJECTION_DIM = 48


@pytest.fixture(scope="module")
def projected_tower(transformers, tmp_path_factory):
    torch.manual_seed(4)
    config = transformers.CLIPVisionConfig(**TINY, projection_dim=PROJECTION_DIM)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    directory = tmp_path_factory.mktemp("clip_projection")
    model.save_pretrained(directory, safe_serialization=True)
    return model, str(directory)


def test_projected_patches_match_transformers(projected_tower):
    """patch_embeds = visual_projection(post_layernorm(patch tokens)); image_embeds is HF's."""
    model, directory = projected_tower
    pixels = normalized_pixels(seed=5)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels))
        patches = model.visual_projection(
            model.vision_model.post_layernorm(out.last_hidden_state[:, 1:])).numpy()
    tower = clip_vision.load_clip_vision(directory, with_projection=True)
    assert tower.projection_dim == PROJECTION_DIM
    got = jax.tree.map(np.asarray, tower(nhwc(pixels)))
    assert got["patch_embeds"].shape == (2, 16, PROJECTION_DIM)
    patch_diff = np.abs(got["patch_embeds"] - patches).max()
    embeds_diff = np.abs(got["image_embeds"] - out.image_embeds.numpy()).max()
    print(f"max |diff|: patch_embeds {patch_diff:.2e}, image_embeds {embeds_diff:.2e}")
    assert max(patch_diff, embeds_diff) < ATOL
    # The same file loads without the projection too, as the FQGAN teacher does.
    plain = clip_vision.load_clip_vision(directory)(nhwc(pixels))
    assert "patch_embeds" not in plain
    np.testing.assert_allclose(plain["cls"], got["cls"], atol=1e-6)


def test_projection_of_a_full_clip_config_and_its_absence(tower, tmp_path):
    """CLIPConfig keeps projection_dim at the top level; a file without visual_projection
    cannot fill a tower that wants one."""
    assert clip_vision.projection_dim_from_hf_config(
        {"model_type": "clip", "projection_dim": 768,
         "vision_config": {"projection_dim": 512}}) == 768
    assert clip_vision.projection_dim_from_hf_config({"model_type": "clip_vision_model"}) == 512
    assert clip_vision.official_key_to_path("visual_projection.weight",
                                            with_projection=True) == ("visual_projection",
                                                                      "kernel")
    with pytest.raises(weights.PretrainedError, match="1 missing: visual_projection.weight"):
        clip_vision.load_clip_vision(tower[1], with_projection=True)
