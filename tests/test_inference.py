"""`--mode=eval` on a finished run, and the `load_tokenizer` Python API."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import fqgan_jax
from fqgan_jax import checkpointing, config_lib
from fqgan_jax.eval import evaluate


def _config(workdir):
    return config_lib.config_from_dict(json.loads((workdir / "config.json").read_text()))


def test_eval_mode_reproduces_the_final_training_eval(trained_workdir):
    workdir, result = trained_workdir
    again = evaluate.evaluate_workdir(_config(workdir), str(workdir))
    assert again["step"] == 4
    for key in ("psnr", "ssim", "usage"):
        np.testing.assert_allclose(again[key], result[key], rtol=1e-6)


def test_load_tokenizer_round_trip(trained_workdir):
    workdir, _ = trained_workdir
    tok = fqgan_jax.load_tokenizer(str(workdir))
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    codes = tok.encode(images)
    assert codes.shape == (2, 16, 16, 2) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 64
    recon = tok.decode(codes)
    assert recon.shape == images.shape and recon.dtype == np.uint8
    # Decoding is deterministic, and matches the training graph's own decode path.
    np.testing.assert_array_equal(tok.decode(codes), recon)
    # FQGAN Figure 3 and 4 material: row 0 is decode(encode(x)); the codebook is unit-norm.
    rows = tok.single_codebook_reconstructions(images)
    assert rows.shape == (3, 2, 32, 32, 3) and rows.dtype == np.uint8
    np.testing.assert_array_equal(rows[0], recon)
    assert np.any(rows[1] != rows[2])
    codebook = tok.codebook()
    assert codebook.shape == (2, 64, 8)
    np.testing.assert_allclose(np.linalg.norm(codebook, axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="fill must be one of"):
        tok.single_codebook_reconstructions(images, fill="noise")


def test_load_tokenizer_accepts_checkpoint_and_step_folders(trained_workdir):
    workdir, _ = trained_workdir
    params = lambda path: jax.device_get(  # noqa: E731 (comparing weights needs no compile)
        nnx.state(fqgan_jax.load_tokenizer(str(path)).model, nnx.Param).to_pure_dict())
    expected = params(workdir)
    for path in (workdir / "checkpoints", workdir / "checkpoints" / "4"):
        jax.tree.map(np.testing.assert_array_equal, params(path), expected)
    older = params(workdir / "checkpoints" / "2")  # the step folder picks that step
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(older),
                                                         jax.tree.leaves(expected)))


def test_bad_inputs_give_clear_errors(trained_workdir, tmp_path):
    workdir, _ = trained_workdir
    tok = fqgan_jax.load_tokenizer(str(workdir))
    with pytest.raises(ValueError, match="uint8 images"):
        tok.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of the tokenizer's downsampling factor 2"):
        tok.encode(np.zeros((1, 33, 33, 3), np.uint8))
    with pytest.raises(ValueError, match=r"codes in \[0, 64\)"):
        tok.decode(np.full((1, 16, 16, 2), 64))
    with pytest.raises(ValueError, match=r"\[B, h, w, 2\]"):
        tok.decode(np.zeros((1, 16, 16, 3), np.int32))
    with pytest.raises(checkpointing.CheckpointError, match="not a fqgan_jax workdir"):
        fqgan_jax.load_tokenizer(str(tmp_path))


def test_eval_refuses_a_workdir_with_another_model(trained_workdir):
    workdir, _ = trained_workdir
    config = _config(workdir)
    config.model.codebook_size = 128
    with pytest.raises(checkpointing.CheckpointError, match="config.model.codebook_size"):
        evaluate.evaluate_workdir(config, str(workdir))
