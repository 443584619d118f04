"""LPIPS inside training: the weights file found and checked before compiling, the smoke
presets' fallback, the perceptual term in the train step, and its dropout option."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, make_step
from flax import nnx

from fqgan_jax import architecture, config_lib, sharding
from fqgan_jax.frozen import lpips, networks, weights
from fqgan_jax.training import loop
from fqgan_jax.training import train_state as ts
from fqgan_jax.training.train_step import _perceptual_fn


@pytest.fixture(scope="module")
def random_lpips_file(tmp_path_factory):
    """LPIPS with random weights, in the project's format (real ones cannot be downloaded)."""
    path = str(tmp_path_factory.mktemp("weights") / "lpips_vgg16.npz")
    params = nnx.state(lpips.LPIPS(rngs=nnx.Rngs(0)), nnx.Param)
    for head in params["lins"].values():  # LPIPS heads are non-negative, as the real ones
        head["kernel"].value = jnp.abs(head["kernel"].value)
    weights.save(path, params, kind=lpips.WEIGHTS_KIND)
    return path


def _with_lpips(tiny_config, path, **overrides):
    return tiny_config(**{"loss.perceptual_weight": 1.0, "loss.lpips_weights": path,
                          **overrides})


def test_perceptual_term_in_the_train_step(tiny_config, random_lpips_file):
    config = _with_lpips(tiny_config, random_lpips_file)
    mesh = sharding.make_mesh(config_lib.single_device_mesh(), jax.devices()[:1])
    frozen = networks.load(config, mesh)
    state, step, mesh = make_step(config, frozen=frozen)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), np.uint8)
    # The term the step logs is the batch-mean LPIPS of the reconstructions of its params.
    components = ts.make_components(config)
    model = architecture.merge_model(components.graphdef, state.params, state.model_state)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1
    expected = jnp.mean(lpips.load_lpips(random_lpips_file)(x, model(x)[0]))
    inputs = sharding.to_global_batch({"image": images}, sharding.batch_sharding(mesh))
    new_state, metrics = step.at(0)(state, inputs, frozen)
    np.testing.assert_allclose(metrics["loss/perceptual"], expected, rtol=1e-4)
    assert float(metrics["loss/perceptual"]) > 0 and int(metrics["skipped"]) == 0
    # LPIPS is a constant of the step: its params are not in the state, nor donated.
    assert "lpips" not in jax.tree.structure(new_state).__repr__()
    jax.tree.map(lambda a: a.block_until_ready(), frozen)


def test_lpips_dropout_option_is_keyed(tiny_config, random_lpips_file):
    config = _with_lpips(tiny_config, random_lpips_file)
    frozen = {"lpips": nnx.state(lpips.load_lpips(random_lpips_file), nnx.Param)}
    components = ts.make_components(config)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    y = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    value = lambda loss, key: float(  # noqa: E731
        _perceptual_fn(components, frozen, loss, jax.random.key(key))(x, y))
    config.loss.lpips_dropout = True
    on_a, on_a_again, on_b = value(config.loss, 0), value(config.loss, 0), value(config.loss, 1)
    config.loss.lpips_dropout = False
    off_a, off_b = value(config.loss, 0), value(config.loss, 1)
    assert off_a == off_b  # no dropout: the key is unused
    assert on_a == on_a_again and on_a != on_b and on_a != off_a


def test_missing_weights_fail_before_compiling(tiny_config, tmp_path):
    missing = str(tmp_path / "nowhere" / "lpips_vgg16.npz")
    config = _with_lpips(tiny_config, missing, **{"loss.lpips_required": True})
    with pytest.raises(weights.PretrainedError) as error:
        loop.setup(config, str(tmp_path / "workdir"))
    message = str(error.value)
    for part in (missing, "python -m fqgan_jax.tools.convert lpips", "--vgg16=",
                 "config.loss.lpips_weights", "perceptual_weight=0"):
        assert part in message
    assert not (tmp_path / "workdir").exists()  # nothing written, nothing compiled


def test_wrong_shapes_fail_before_compiling(tiny_config, tmp_path):
    bad = nnx.state(lpips.LPIPS(rngs=nnx.Rngs(0)), nnx.Param)
    bad["lins"][2]["kernel"].value = jnp.zeros((1, 1, 128, 1))  # 256 channels expected
    path = str(tmp_path / "bad.npz")
    weights.save(path, bad, kind=lpips.WEIGHTS_KIND)
    with pytest.raises(weights.PretrainedError, match=r"lins/2/kernel.*\(1, 1, 256, 1\)"):
        loop.setup(_with_lpips(tiny_config, path, **{"loss.lpips_required": True}),
                    str(tmp_path / "workdir"))


def test_smoke_presets_run_without_lpips_and_say_so(tmp_path, caplog):
    config = config_lib.load_config_file(os.path.join(REPO, "configs/dual.py:smoke"))
    config.loss.lpips_weights = str(tmp_path / "absent.npz")
    assert config.loss.perceptual_weight == 1.0 and not config.loss.lpips_required
    with caplog.at_level(logging.WARNING):
        resolved = networks.resolve(config)
    assert resolved.loss.perceptual_weight == 0.0
    assert config.loss.perceptual_weight == 1.0  # the caller's config is left alone
    assert "WITHOUT the perceptual loss" in caplog.text
    assert "fqgan_jax.tools.convert lpips" in caplog.text


def test_smoke_presets_use_lpips_when_the_file_is_there(random_lpips_file):
    config = config_lib.load_config_file(os.path.join(REPO, "configs/dual.py:smoke"))
    config.loss.lpips_weights = random_lpips_file
    assert networks.resolve(config).loss.perceptual_weight == 1.0


def test_full_presets_carry_the_official_objective():
    for name in ("vqgan", "dual", "triple"):
        config = config_lib.load_config_file(os.path.join(REPO, f"configs/{name}.py"))
        assert (config.loss.reconstruction, config.loss.reconstruction_weight) == ("l2", 1.0)
        assert config.loss.perceptual_weight == 1.0 and config.loss.lpips_required
        assert (config.gan.weight, config.gan.start, config.gan.generator_loss) == (
            0.5, 20_000, "hinge")
        assert (config.gan.ndf, config.gan.n_layers, config.gan.adaptive_weight) == (64, 3, False)
        assert config.gan.optimizer.learning_rate == 2e-4


@pytest.mark.parametrize("missing, expected", [
    ("lpips", "fqgan_jax.tools.convert lpips"),
    ("teacher", "huggingface-cli download openai/clip-vit-large-patch14"),
    ("inception", "fqgan_jax.tools.convert inception"),
])
def test_cli_reports_missing_weights_without_a_traceback(tmp_path, missing, expected):
    """The full Dual preset without its LPIPS file, its CLIP teacher's snapshot, or the FID
    Inception file its eval config names."""
    flags = {"lpips": [f"--config.loss.lpips_weights={tmp_path / 'x.npz'}",
                       "--config.loss.semantic_weight=0"],
             "teacher": [f"--config.teachers.sem.path={tmp_path / 'clip'}"],
             "inception": ["--config.loss.perceptual_weight=0", "--config.loss.semantic_weight=0",
                           f"--config.eval.inception_weights={tmp_path / 'fid.npz'}"]}[missing]
    result = subprocess.run(
        [sys.executable, "-m", "fqgan_jax.main", "--config=configs/dual.py",
         f"--workdir={tmp_path / 'w'}", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert result.returncode != 0
    assert "error:" in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()
