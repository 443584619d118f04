"""Fine-tuning (`config.train.init_from`) and eval's compute dtype (`config.eval.dtype`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fqgan_jax import architecture, checkpointing, config_lib
from fqgan_jax.training import loop

METRICS = ("psnr", "ssim", "usage", "perplexity", "num_images")


def _source_config(workdir):
    return config_lib.config_from_dict(json.loads((workdir / "config.json").read_text()))


def test_init_from_starts_with_the_source_weights(trained_workdir, tmp_path):
    """The step-0 eval of a run initialized from another equals that run's final eval."""
    source, result = trained_workdir
    config = _source_config(source)
    config.train.init_from = str(source)
    run = loop.setup(config, str(tmp_path / "finetune"))
    try:
        state, meta = loop.restore_or_init(run, None)
        assert int(state.step) == 0 and meta["num_skipped_images"] == 0
        first = loop._maybe_eval(run, state, 0, force=True)
    finally:
        run.checkpointer.close()
        run.writer.close()
    assert {key: first[key] for key in METRICS} == {key: result[key] for key in METRICS}
    # Fresh optimizer state, the source's discriminator.
    assert all(np.all(np.asarray(mu) == 0) for mu in jax.tree.leaves(state.opt_state[1][0].mu))
    restored = checkpointing.Checkpointer(str(source / "checkpoints"), async_save=False)
    saved = restored.restore_part(4, {"disc": {"params": state.disc.params}})["disc"]["params"]
    restored.close()
    jax.tree.map(np.testing.assert_array_equal, saved, state.disc.params)


def test_init_from_refuses_another_architecture_naming_the_shapes(trained_workdir, tmp_path):
    source, _ = trained_workdir
    config = _source_config(source)
    config.model.codebook_size = 32
    config.train.init_from = str(source / "checkpoints")
    with pytest.raises(checkpointing.CheckpointError) as error:  # at setup, before compiling
        loop.setup(config, str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()  # nothing written
    message = str(error.value)
    assert "quantize/codebook: this run (2, 32, 8)" in message and "(2, 64, 8)" in message
    assert "Use a config with the source's model settings" in message


def test_eval_and_inference_compute_in_eval_dtype(trained_workdir):
    """A bf16-trained model is evaluated in float32 by default; the JSON says which."""
    source, result = trained_workdir
    assert result["protocol"]["dtype"] == "float32"
    config = _source_config(source)
    config.model.dtype = "bfloat16"
    params, model_state = architecture.abstract_model_variables(config)
    for dtype in ("float32", "bfloat16"):
        config.eval.dtype = dtype
        model = architecture.merge_model(architecture.eval_graphdef(config), params, model_state)
        assert model.decoder.conv_out.dtype == jnp.dtype(dtype)
    train_model = architecture.merge_model(architecture.model_graphdef(config), params,
                                           model_state)
    assert train_model.decoder.conv_out.dtype == jnp.bfloat16
