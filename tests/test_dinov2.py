"""DINOv2: parity with transformers' Dinov2Model / Dinov2WithRegistersModel through a saved HF
snapshot, gradients, the position-table resampling, preprocessing, the presets, and the error
messages for bad snapshots.

No hub weights are downloaded: the references are tiny randomly initialised HF models (every
parameter perturbed, LayerScale non-trivial) saved with `save_pretrained`, which writes the same
key layout as the hub checkpoints.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from torch_reference import import_torchvision

from fqgan_jax.frozen import dinov2, weights

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "mlp_ratio": 2,
        "patch_size": 8, "image_size": 32, "layerscale_value": 0.5}
VARIANTS = {  # name: (transformers class names, extra config)
    "plain": ("Dinov2Model", "Dinov2Config", {}),
    "swiglu": ("Dinov2Model", "Dinov2Config", {"use_swiglu_ffn": True}),
    "registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                  {"num_register_tokens": 3}),
}
SIZES = [(32, 32), (48, 48), (24, 40)]  # the pretraining grid; upsampled; downsampled, non-square


@pytest.fixture(scope="module")
def transformers():
    import_torchvision()  # before transformers: see torch_reference
    import transformers
    return transformers


def make_reference(transformers, variant: str, seed: int = 0):
    """A tiny HF model in eval mode, every parameter perturbed so that none is at its init."""
    model_class, config_class, extra = VARIANTS[variant]
    config = getattr(transformers, config_class)(**TINY, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(0.05 * torch.randn_like(param))
            if name.endswith("lambda1"):
                param.uniform_(0.1, 1.0)
            if name.endswith("position_embeddings"):
                param.mul_(20.0)  # as large as the patch embeddings: resampling errors show
    return model


@pytest.fixture(scope="module")
def snapshots(transformers, tmp_path_factory):
    """{variant: (torch model, snapshot dir)}."""
    out = {}
    for variant in VARIANTS:
        model = make_reference(transformers, variant)
        directory = tmp_path_factory.mktemp(variant)
        model.save_pretrained(directory, safe_serialization=True)
        out[variant] = (model, directory)
    return out


def jitted(model: dinov2.DINOv2):
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda params, pixels: nnx.merge(graphdef, params)(pixels))
    return lambda pixels: fn(params, pixels)


def pixels(height, width, seed=0, batch=2):
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def to_torch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(snapshots, variant):
    torch_model, directory = snapshots[variant]
    forward = jitted(dinov2.load_dinov2(str(directory)))
    registers = VARIANTS[variant][2].get("num_register_tokens", 0)
    for height, width in SIZES:
        images = pixels(height, width)
        ours = forward(images)
        with torch.no_grad():
            theirs = torch_model(pixel_values=to_torch(images)).last_hidden_state.numpy()
        num_patches = (height // 8) * (width // 8)
        assert ours["last_hidden_state"].shape == (2, 1 + registers + num_patches, 64)
        assert ours["last_hidden_state"].dtype == jnp.float32
        np.testing.assert_allclose(ours["cls"], theirs[:, 0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(ours["patch_tokens"], theirs[:, 1 + registers:], atol=1e-4,
                                   rtol=0)
        np.testing.assert_allclose(ours["last_hidden_state"], theirs, atol=1e-4, rtol=0)


def test_gradient_matches_torch(snapshots):
    torch_model, directory = snapshots["registers"]
    forward = jitted(dinov2.load_dinov2(str(directory)))
    images = pixels(48, 40, seed=1)
    rng = np.random.default_rng(2)
    weight_cls = rng.normal(size=(2, 64)).astype(np.float32)
    weight_patches = rng.normal(size=(2, 30, 64)).astype(np.float32)

    def loss(images):
        out = forward(images)
        return jnp.sum(out["cls"] * weight_cls) + jnp.sum(out["patch_tokens"] * weight_patches)

    ours = np.asarray(jax.grad(loss)(images))
    images_torch = to_torch(images).requires_grad_()
    hidden = torch_model(pixel_values=images_torch).last_hidden_state
    (torch.sum(hidden[:, 0] * torch.from_numpy(weight_cls))
     + torch.sum(hidden[:, 4:] * torch.from_numpy(weight_patches))).backward()
    theirs = images_torch.grad.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).max() > 0
    np.testing.assert_allclose(ours, theirs, atol=1e-5 * np.abs(theirs).max(), rtol=1e-4)


def test_bfloat16_close_to_float32(snapshots):
    directory = str(snapshots["plain"][1])
    images = pixels(48, 48, seed=3)
    f32 = np.asarray(jitted(dinov2.load_dinov2(directory))(images)["last_hidden_state"])
    bf16 = jitted(dinov2.load_dinov2(directory, dtype="bfloat16"))(images)["last_hidden_state"]
    assert bf16.dtype == jnp.float32
    assert np.linalg.norm(np.asarray(bf16) - f32) <= 2e-2 * np.linalg.norm(f32)


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_matches_torch_interpolate(antialias):
    """HF's position resampling: F.interpolate(mode="bicubic", align_corners=False), with and
    without antialias, at the sizes the teacher meets (37 -> 16 for 224 px) and small ones."""
    rng = np.random.default_rng(4)
    for in_size, out_size in [(37, 16), (37, 64), (4, 6), (4, 3), (3, 11), (5, 5)]:
        grid = rng.normal(size=(1, 2, in_size, in_size)).astype(np.float32)
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(grid), size=(out_size, out_size), mode="bicubic",
            align_corners=False, antialias=antialias).numpy()
        matrix = dinov2.bicubic_matrix(in_size, out_size, antialias)
        ours = np.einsum("ph,bchw,qw->bcpq", matrix, grid, matrix)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_preprocess_matches_torch():
    """Spec §3.1: [-1, 1] -> [0, 1] -> F.interpolate(size=224) (nearest) -> ImageNet mean/std."""
    images = np.random.default_rng(5).uniform(-1, 1, (2, 256, 256, 3)).astype(np.float32)
    resized = torch.nn.functional.interpolate((to_torch(images) + 1) / 2, size=(224, 224))
    mean = torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1)
    theirs = ((resized - mean) / std).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(dinov2.preprocess(jnp.asarray(images)), theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset, hf_sizes", [
    (dinov2.DINOV2_S14, {"hidden_size": 384, "num_attention_heads": 6}),
    (dinov2.DINOV2_B14, {"hidden_size": 768, "num_attention_heads": 12}),
])
def test_presets_match_transformers(transformers, preset, hf_sizes):
    """dinov2-small/base: the hub configs give our presets, with HF's parameter count less the
    mask token (masked pretraining only); the teacher's input gives a 16 x 16 grid + CLS."""
    config = transformers.Dinov2Config(**hf_sizes, num_hidden_layers=12, mlp_ratio=4,
                                       patch_size=14, image_size=518)
    assert dinov2.sizes_from_hf_config(config.to_dict()) == preset
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in transformers.Dinov2Model(config).parameters())
    graphdef, abstract = dinov2.abstract_model(preset)
    ours = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    assert ours == hf_count - preset.width
    out = jax.eval_shape(lambda params, images: nnx.merge(graphdef, params)(
        dinov2.preprocess(images)), abstract, jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
    assert out["cls"].shape == (2, preset.width)
    assert out["patch_tokens"].shape == (2, 256, preset.width)


TINY_SIZES = dinov2.sizes_from_hf_config({"model_type": "dinov2", **TINY})


def test_random_init_runs():
    out = jitted(dinov2.random_init(TINY_SIZES, seed=0))(jnp.zeros((1, 16, 24, 3)))
    assert out["patch_tokens"].shape == (1, 6, 64)
    assert np.all(np.isfinite(out["last_hidden_state"]))


def test_graphdef_is_static():
    """Two modules built alike (from sizes or from the HF config) have equal, hashable
    graphdefs (jit caches on them)."""
    first, _ = dinov2.abstract_model(TINY_SIZES)
    second, _ = nnx.split(nnx.eval_shape(lambda: dinov2.DINOv2.from_hf_config(
        {"model_type": "dinov2", **TINY}, rngs=nnx.Rngs(1))), nnx.Param)
    assert first == second and hash(first) == hash(second)


def test_hub_config_gives_the_preset():
    """facebook/dinov2-small's config.json (written by transformers 4.31: no register count, no
    mask-token flag) -> DINOV2_S14."""
    hub_config = {
        "architectures": ["Dinov2Model"], "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "hidden_size": 384, "image_size": 518, "initializer_range": 0.02,
        "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4, "model_type": "dinov2",
        "num_attention_heads": 6, "num_channels": 3, "num_hidden_layers": 12, "patch_size": 14,
        "qkv_bias": True, "torch_dtype": "float32", "use_swiglu_ffn": False}
    assert dinov2.sizes_from_hf_config(hub_config) == dinov2.DINOV2_S14
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        dinov2.sizes_from_hf_config({**hub_config, "hidden_act": "relu"})


# Keys and bad snapshots.


@pytest.mark.parametrize("key, path", [
    ("embeddings.patch_embeddings.projection.weight", ("patch_embedding", "kernel")),
    ("embeddings.mask_token", None),
    ("encoder.layer.11.attention.attention.query.weight",
     ("layer", 11, "attention", "query", "kernel")),
    ("encoder.layer.0.attention.output.dense.bias", ("layer", 0, "attention", "output", "bias")),
    ("encoder.layer.3.layer_scale2.lambda1", ("layer", 3, "layer_scale2")),
    ("encoder.layer.3.mlp.weights_in.weight", ("layer", 3, "mlp", "weights_in", "kernel")),
    ("layernorm.weight", ("layernorm", "scale")),
])
def test_official_key_to_path(key, path):
    assert dinov2.official_key_to_path(key) == path


def test_every_parameter_has_an_official_key():
    for sizes in (dinov2.DINOV2_S14, dinov2.sizes_from_hf_config(
            {"model_type": "dinov2_with_registers", **TINY, "use_swiglu_ffn": True})):
        _, abstract = dinov2.abstract_model(sizes)
        for path, _ in nnx.to_flat_state(abstract):
            assert dinov2.official_key_to_path(dinov2.path_to_official_key(path)) == path


@pytest.mark.parametrize("key", ["encoder.layer.0.attention.q_proj.weight", "pooler.dense.bias"])
def test_official_key_to_path_rejects(key):
    with pytest.raises(ValueError, match="Not a DINOv2 key"):
        dinov2.official_key_to_path(key)


def altered_snapshot(snapshots, tmp_path, **replace):
    """A copy of the plain snapshot with `replace` ({key: array or None}) swapped in, added or
    (None) removed."""
    source = snapshots["plain"][1]
    state = weights.read_state_dict(str(source))
    for key, array in replace.items():
        if array is None:
            del state[key]
        else:
            state[key] = array
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(source / "config.json", tmp_path / "config.json")
    return str(tmp_path)


def test_missing_path(tmp_path):
    path = str(tmp_path / "nowhere")
    with pytest.raises(weights.PretrainedError, match=f"{path}.*huggingface-cli download"):
        dinov2.load_dinov2(path)


def test_wrong_shape(snapshots, tmp_path):
    key = "encoder.layer.1.attention.attention.key.weight"
    path = altered_snapshot(snapshots, tmp_path, **{key: np.zeros((64, 32), np.float32)})
    with pytest.raises(weights.PretrainedError,
                       match=rf"wrong shape: {key} \(expected \(64, 64\), found \(64, 32\)\)"):
        dinov2.load_dinov2(path)


def test_unexpected_and_missing_keys(snapshots, tmp_path):
    path = altered_snapshot(snapshots, tmp_path, **{
        "encoder.layer.2.norm1.weight": np.ones(64, np.float32), "classifier.weight":
        np.ones((3, 64), np.float32), "layernorm.bias": None})
    with pytest.raises(weights.PretrainedError) as error:
        dinov2.load_dinov2(path)
    message = str(error.value)
    assert path in message
    assert "1 missing: layernorm.bias" in message
    assert "2 unexpected: " in message and "encoder.layer.2.norm1.weight" in message
    assert "classifier.weight" in message


def test_not_a_dinov2_config(snapshots, tmp_path):
    path = altered_snapshot(snapshots, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(weights.PretrainedError, match="'clip_vision_model' is not a DINOv2"):
        dinov2.load_dinov2(path)
