"""The large-codebook quantizers (VQGAN-LC, FVQ, LFQ) as config choices of the one trainer, and
the materialized inference form of the mapped ones (fqgan_jax/materialize.py)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import make_tiny_config
from flax import nnx

from fqgan_jax import architecture, inference, materialize
from fqgan_jax.tools import official


def tiny(quantizer: str, **overrides):
    """A one-branch tiny tokenizer with `quantizer`, trained without a GAN (its phases are
    covered elsewhere): seconds per step on CPU."""
    settings = {"model.quantizer": quantizer, "model.adapter_layers": 0,
                "model.l2_normalize": False, "model.code_dim": 8, "gan.weight": 0.0,
                "loss.entropy_weight": 0.0, "loss.disentangle_weight": 0.0,
                "model.fvq.group_size": 4, "model.fvq.width": 16, "model.fvq.heads": 2,
                # The file mode's placeholder init: building the model never reads the file.
                "model.lc.feature_dim": 16, "model.lc.codebook_path": "unread.npy"}
    if quantizer == "lfq":
        settings.update({"model.code_dim": 6, "model.codebook_size": 64,
                         "loss.entropy_weight": 0.1, "model.lfq.entropy_group_bits": 3})
    config = make_tiny_config(branches=("vq",), **{**settings, **overrides})
    config.teachers = ml_collections.ConfigDict()  # the Dual preset's teacher taught `sem`
    return config


def _random_variables(config, seed=0):
    """The model's variables with every float array perturbed, so FVQ's zero-initialized output
    layer (a codebook of zeros) becomes a real codebook."""
    _, params, state = nnx.split(architecture.create_model(config, nnx.Rngs(seed)),
                                 nnx.Param, ...)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(key, leaf.shape, leaf.dtype)
              for leaf, key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves), state


@pytest.mark.parametrize("quantizer", ["fvq", "lc"])
def test_materialized_tokenizer_encodes_and_decodes_as_the_trained_one(quantizer):
    config = tiny(quantizer)
    params, state = _random_variables(config)
    plain_config, plain_params, plain_state = materialize.materialize(config, params, state)
    assert plain_config.model.quantizer == "vq" and not plain_config.model.l2_normalize
    # Only the materialized codebook is left of the quantizer: no bridge, projector or raw C.
    quantize = plain_params["quantize"]
    assert set(quantize.keys()) == {"codebook"}
    assert quantize["codebook"].value.shape == (1, config.model.codebook_size, 8)
    assert not jax.tree.leaves(plain_state)

    images = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3), minval=-1, maxval=1)
    mapped = architecture.merge_model(architecture.model_graphdef(config), params, state)
    plain = architecture.merge_model(architecture.model_graphdef(plain_config), plain_params,
                                     plain_state)
    codes, plain_codes = mapped.encode(images).indices, plain.encode(images).indices
    np.testing.assert_array_equal(codes, plain_codes)
    assert len(np.unique(codes)) > 1  # a real search, not every token on one code
    np.testing.assert_allclose(plain.decode_indices(plain_codes), mapped.decode_indices(codes),
                               atol=1e-6)


def test_unmapped_quantizers_pass_through_materialize():
    for quantizer in ("vq", "lfq"):
        config = tiny(quantizer)
        params, state = _random_variables(config)
        assert not materialize.is_mapped(config)
        assert materialize.materialize(config, params, state)[0] is config


def test_fvq_exports_as_a_llamagen_vq_checkpoint():
    """FVQ's convert_fullvq2vq: the official export is LlamaGen's layout holding Ĉ."""
    config = tiny("fvq")
    params, state = _random_variables(config)
    plain_config, variables = official.materialized(config, {"params": params,
                                                             "model_state": state})
    checkpoint = official.official_checkpoint(variables, plain_config)["model"]
    codebook = checkpoint["quantize.embedding.weight"]
    model = architecture.merge_model(architecture.model_graphdef(config), params, state)
    np.testing.assert_array_equal(codebook, np.asarray(model.quantize.materialized_codebook()))
    assert not any("bridge" in key or "projector" in key for key in checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["lc", "fvq", "lfq"])
def test_trainer_runs_each_quantizer_on_eight_devices(quantizer, tmp_path):
    """Train (data-parallel over 8 simulated devices, the codebook sharded over fsdp=2 where
    the quantizer searches one), checkpoint, evaluate with exact usage, then load the result
    for inference: the same trainer for every quantizer."""
    from fqgan_jax.training import loop  # noqa: PLC0415

    overrides = {"train.num_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
                 "train.image_every": 2, "mesh.shape": (-1, 2)}
    if quantizer == "lc":  # a clustered codebook read from a file, as init_codebook writes
        path = tmp_path / "codebook.npy"
        np.save(path, np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
        overrides.update({"model.lc.tuning_codebook": 0, "model.lc.codebook_path": str(path)})
    if quantizer in ("lc", "fvq"):
        overrides["model.shard_codebook"] = True
    config = tiny(quantizer, **overrides)
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir)

    with open(os.path.join(workdir, "eval", "2.json")) as f:
        result = json.load(f)
    assert len(result["usage"]) == 1 and 0 < result["usage"][0] <= 1
    assert np.isfinite(result["psnr"])
    tok = inference.load_tokenizer(workdir)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    codes = tok.encode(images)
    assert codes.shape == (2, 16, 16, 1) and codes.max() < config.model.codebook_size
    assert tok.decode(codes).shape == images.shape
    if quantizer == "lc":  # the file's codebook reached the model, frozen
        state = inference.checkpointing.restore_model(
            workdir, config, jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                                               ("data", "fsdp")))[1]
        np.testing.assert_array_equal(jnp.asarray(state["quantize"]["codebook"].value),
                                      np.load(path))
