"""VQGAN-LC's projected codebook (fqgan_jax/quantizers/lc.py, spec large_codebooks.md §A.2-A.5):
gradients reach the projector and never a frozen codebook, the search is the brute-force
nearest projected code, the loss weights are the official ones, bad codebook files are refused
by name, and a fresh run's state holds the file's codebook."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from flax import nnx

from fqgan_jax import config_lib, sharding
from fqgan_jax.quantizers import registry
from fqgan_jax.quantizers.lc import (
    CodebookFileError,
    FrozenCodebook,
    ProjectedCodebookQuantizer,
)
from fqgan_jax.training.build import build_run

K, FEATURES, CODE_DIM = 64, 16, 4


def quantizer(tuning_codebook=0, code_dim=CODE_DIM, projector="linear", **kwargs):
    return ProjectedCodebookQuantizer(codebook_size=K, code_dim=code_dim, feature_dim=FEATURES,
                                      projector=projector, mlp_hidden=8,
                                      tuning_codebook=tuning_codebook, rngs=nnx.Rngs(0),
                                      **kwargs)


def latents(code_dim=CODE_DIM, seed=1):
    return jax.random.normal(jax.random.key(seed), (2, 3, 3, 1, code_dim))


def total_loss(graphdef, params, rest, z):
    out = nnx.merge(graphdef, params, rest)(z)
    weights = jnp.arange(out.quantized.size, dtype=jnp.float32).reshape(out.quantized.shape)
    return out.losses["codebook"] + out.losses["commitment"] + jnp.sum(out.quantized * weights)


@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_frozen_codebook_is_state_and_only_the_projector_learns(projector):
    graphdef, params, rest = nnx.split(quantizer(projector=projector), nnx.Param, ...)
    assert isinstance(rest["codebook"], FrozenCodebook) and "codebook" not in params
    # The optimizer is built from params, so it holds no moments for the codebook.
    moments = jax.tree.leaves(optax.adam(1e-3).init(params))
    assert all(leaf.shape != (K, FEATURES) for leaf in moments)
    grad_params, grad_rest = jax.grad(total_loss, argnums=(1, 2))(graphdef, params, rest,
                                                                 latents())
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grad_params))
    assert float(jnp.abs(grad_rest["codebook"][...]).sum()) == 0


@pytest.mark.parametrize("mode,width", [(1, FEATURES), (-1, CODE_DIM), (-2, CODE_DIM)])
def test_trained_and_random_modes(mode, width):
    """1 / -1 train the codebook (a Param with gradient); the random modes are built at
    code_dim wide, as the official (models_vq.py: embed_dim)."""
    module = quantizer(mode)
    assert module.codebook.shape == (K, width)
    assert np.abs(np.asarray(module.codebook[...])).max() <= 1.0 / K
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    assert ("codebook" in params) == (mode in (1, -1))
    if "codebook" in params:
        grads = jax.grad(total_loss, argnums=1)(graphdef, params, rest, latents())
        assert float(jnp.abs(grads["codebook"][...]).sum()) > 0


def test_search_is_the_brute_force_nearest_projected_code():
    """Squared Euclidean over Ĉ = C W + b, with a budget small enough to chunk the codebook."""
    module = quantizer(memory_budget_bytes=512)
    module.codebook[...] = jax.random.normal(jax.random.key(2), (K, FEATURES))
    z = latents(seed=3)
    out = module(z)
    kernel = np.asarray(module.projector.linear.kernel[...], np.float64)
    bias = np.asarray(module.projector.linear.bias[...], np.float64)
    projected = np.asarray(module.codebook[...], np.float64) @ kernel + bias
    flat = np.asarray(z, np.float64).reshape(-1, CODE_DIM)
    want = np.argmin(((flat[:, None] - projected[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), want)
    np.testing.assert_allclose(np.asarray(out.quantized).reshape(-1, CODE_DIM),
                               projected[want], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module.lookup(out.indices), out.quantized)
    mse = np.mean((projected[want] - flat) ** 2)
    for term in ("codebook", "commitment"):
        np.testing.assert_allclose(float(out.losses[term]), mse, rtol=1e-5)
    assert float(out.losses["entropy"]) == 0
    # Straight-through: the decoder's gradient reaches z unchanged.
    grad = jax.grad(lambda x: jnp.sum(module(x).quantized * 3.0))(z)
    np.testing.assert_allclose(grad, 3.0 * np.ones(z.shape))


def test_z_is_normalized_only_without_reduction():
    """Official: `embed_dim == 768 and tuning_codebook != -1` (768 = the codebook's width)."""
    assert quantizer(0, code_dim=FEATURES).normalize_z
    assert quantizer(-2, code_dim=CODE_DIM).normalize_z  # random codebooks are code_dim wide
    assert not quantizer(0).normalize_z
    assert not quantizer(-1).normalize_z


def test_loss_weights_and_branch_count():
    config = config_lib.load_config_file(f"{REPO}/configs/lc.py")
    weights = quantizer().loss_weights(config.loss)
    assert weights == pytest.approx({"codebook": 0.1 * 0.33, "commitment": 0.1, "entropy": 0})
    with pytest.raises(ValueError, match="one branch"):
        quantizer(num_codebooks=2)
    with pytest.raises(ValueError, match="tuning_codebook=3"):
        quantizer(3)


def model_config(path, tuning_codebook=0):
    config = config_lib.load_config_file(f"{REPO}/configs/lc.py")
    config.model.update(dict(codebook_size=K))
    config.model.lc.update(dict(feature_dim=FEATURES, codebook_path=str(path),
                                tuning_codebook=tuning_codebook))
    return config.model


@pytest.mark.parametrize("content,match", [
    (None, r"(?s)does not exist.*\(64, 16\).*tools.init_codebook"),
    (np.zeros((K, FEATURES + 1), np.float32), r"shape \(64, 17\).*need \(64, 16\)"),
    (np.full((K, FEATURES), np.nan, np.float32), "1024 non-finite values"),
    (np.zeros((K, FEATURES), np.int32), "dtype int32"),
])
def test_bad_codebook_files_are_refused_by_name(tmp_path, content, match):
    path = tmp_path / "codebook.npy"
    if content is not None:
        np.save(path, content)
    with pytest.raises(CodebookFileError, match=match) as error:
        registry.initial_values(model_config(path))
    assert str(path) in str(error.value)
    with pytest.raises(CodebookFileError, match="codebook_path is empty.*init_codebook"):
        registry.initial_values(model_config(""))
    assert registry.initial_values(model_config("", tuning_codebook=-1)) == {}


def test_a_fresh_run_holds_the_files_codebook(tmp_path):
    """Run.init_state reads lc.codebook_path into model_state (not params: no optimizer
    moments). A train step is not compiled here (minutes on a busy CPU): the gradient tests
    above show it cannot change the codebook."""
    codebook = np.random.default_rng(0).normal(size=(K, FEATURES)).astype(np.float64)
    np.save(tmp_path / "codebook.npy", codebook)
    config = config_lib.load_config_file(f"{REPO}/configs/lc.py:smoke")
    config.model.update(dict(ch=32, ch_mult=(1,), z_channels=32, codebook_size=K))
    config.model.lc.update(dict(feature_dim=FEATURES,
                                codebook_path=str(tmp_path / "codebook.npy")))
    config.data.update(dict(image_size=16, num_workers=0))
    config.train.batch_size = 8
    config.gan.weight = 0.0
    config.loss.perceptual_weight = 0.0
    run = build_run(config, sharding.make_mesh(config_lib.single_device_mesh(),
                                               jax.devices()[:1]), frozen={})
    state = run.init_state()
    stored = state.model_state["quantize"]["codebook"]
    assert isinstance(stored, FrozenCodebook)
    np.testing.assert_array_equal(np.asarray(stored[...]), codebook.astype(np.float32))
    assert "codebook" not in state.params["quantize"]
    assert all(np.shape(leaf) != (K, FEATURES) for leaf in jax.tree.leaves(state.opt_state))
