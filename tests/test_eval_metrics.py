"""Eval with rFID and IS: the full JSON and TensorBoard scalars with the FID Inception
configured, later evals reusing the originals' statistics, rFID against a reference-statistics
file equal to rFID against the originals (`--mode=eval`), a notice without the weights, and
clear errors, before any compute, for missing or wrong files."""

import glob
import json
import shutil

import jax
import numpy as np
import pytest
from clu import metric_writers
from flax import nnx

from fqgan_jax import checkpointing, config_lib, data, sharding
from fqgan_jax.architecture import model_graphdef
from fqgan_jax.eval import evaluate, fid, inception_metrics
from fqgan_jax.frozen import inception, weights
from fqgan_jax.training import loop


def _config(workdir, **eval_overrides):
    config = config_lib.config_from_dict(json.loads((workdir / "config.json").read_text()))
    config.eval.update(eval_overrides)
    return config


@pytest.fixture(scope="module")
def workdir(trained_workdir, tmp_path_factory):
    """A copy of the shared run, so these evals do not rewrite the files other tests read."""
    copy = tmp_path_factory.mktemp("eval_metrics") / "run"
    shutil.copytree(trained_workdir[0], copy)
    return copy


@pytest.fixture(scope="module")
def passes(workdir, fid_inception_weights):
    """Two evals of the final checkpoint through one evaluator, as in a training run: the first
    computes the originals' statistics, the second reuses them. Returns (results, evaluator)."""
    config = _config(workdir, inception_weights=fid_inception_weights, fid_method="eigh")
    mesh = sharding.make_mesh(config.mesh)
    evaluator = inception_metrics.load(config, mesh)
    params, model_state, _ = checkpointing.restore_model(str(workdir), config, mesh)
    eval_fn = evaluate.compile_eval_step(config, model_graphdef(config), mesh)
    writer = metric_writers.create_default_writer(str(workdir))
    results = [evaluate.evaluate(config, params, model_state, eval_fn=eval_fn,
                                 mesh=mesh, step=4, workdir=str(workdir), writer=writer,
                                 inception=evaluator) for _ in range(2)]
    writer.close()
    return results, evaluator


@pytest.fixture(scope="module")
def full_eval(passes):
    return passes[0][0]


def test_eval_writes_rfid_and_is(workdir, passes, trained_workdir):
    saved = json.loads((workdir / "eval" / "4.json").read_text())
    assert saved == json.loads(json.dumps(passes[0][1]))  # the last pass's
    assert {"psnr", "ssim", "usage", "perplexity", "num_images", "rfid", "is", "is_std",
            "protocol"} <= set(saved)
    for key in ("psnr", "ssim", "usage"):  # the Inception pass changes nothing else
        np.testing.assert_allclose(saved[key], trained_workdir[1][key], rtol=1e-6)
    assert np.isfinite(saved["rfid"]) and saved["rfid"] > 0
    # IS >= 1 (exp of a KL); this random net sees the 8 photo crops alike, so it is near 1.
    assert 1.0 - 1e-6 < saved["is"] < inception.NUM_CLASSES and saved["is_std"] >= 0
    protocol = saved["protocol"]["fid"]
    assert "pytorch-fid" in protocol["network"] and "2x - 1" in protocol["preprocess"]
    assert protocol["reference"].startswith("the eval originals")
    assert saved["protocol"]["num_images"] == 8 and "center" in saved["protocol"]["crop"]
    tags = set()
    import tensorflow as tf  # noqa: PLC0415 (clu's writer already imported it)
    for path in glob.glob(str(workdir / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    assert {"eval/rfid", "eval/is", "eval/psnr", "eval/usage/sem"} <= tags


def test_later_evals_of_a_run_reuse_the_originals_statistics(passes):
    """The second pass sent only reconstructions through the network, with the same results (up
    to float32 rounding: the network then runs on 8 images a batch instead of 16)."""
    (first, second), evaluator = passes
    assert list(evaluator.originals) == [8]
    np.testing.assert_allclose(second["rfid"], first["rfid"], rtol=1e-5)
    np.testing.assert_allclose(second["is"], first["is"], rtol=0, atol=1e-6)
    assert evaluator.updates[True]._cache_size() == evaluator.updates[False]._cache_size() == 1


def test_rfid_against_a_stats_file_of_the_originals_equals_rfid_against_the_originals(
        workdir, full_eval, fid_inception_weights, tmp_path):
    """Mode (b) with the eval originals' statistics, computed here in one shot (float64 numpy
    mean and covariance of all features at once), equals mode (a)'s streamed statistics."""
    config = _config(workdir, inception_weights=fid_inception_weights, fid_method="eigh")
    model = inception.load_inception(fid_inception_weights)
    graphdef, params = nnx.split(model, nnx.Param)
    features = jax.jit(lambda p, x: inception.features(graphdef, p, x / 255.0)["pool3"])
    batches = list(data.make_eval_batches(config.data, batch_size=8, num_images=8))
    pool3 = np.concatenate([np.asarray(features(params, b["image"][b["mask"]].astype(np.float32)),
                                       np.float64) for b in batches])
    assert pool3.shape == (8, inception.POOL3_DIM)
    stats = tmp_path / "originals.npz"
    fid.save_stats(str(stats), pool3.mean(0), np.cov(pool3, rowvar=False))
    config.eval.fid_reference = str(stats)
    again = evaluate.evaluate_workdir(config, str(workdir))
    assert again["protocol"]["fid"]["reference"] == str(stats)
    np.testing.assert_allclose(again["rfid"], full_eval["rfid"], rtol=1e-4)
    np.testing.assert_allclose(again["is"], full_eval["is"], rtol=1e-6)


def test_without_inception_weights_eval_says_so_and_skips_rfid(workdir, tmp_path, monkeypatch,
                                                                caplog, capsys):
    monkeypatch.setenv("FQGAN_JAX_WEIGHTS_DIR", str(tmp_path))  # nothing at the default path
    with caplog.at_level("WARNING"):
        result = evaluate.evaluate_workdir(_config(workdir), str(workdir))
    assert "eval step 4: 100%" in capsys.readouterr().err  # the progress bar, as --mode=eval
    assert "rfid" not in result and "is" not in result
    assert "convert inception" in result["protocol"]["fid"]["skipped"]
    assert "NOT rFID or IS" in caplog.text and str(tmp_path) in caplog.text


@pytest.mark.parametrize("problem", ["missing_weights", "wrong_kind", "reference_dims",
                                     "reference_missing"])
def test_bad_inception_or_reference_files_fail_before_anything_is_written(
        workdir, fid_inception_weights, tiny_config, tmp_path, problem):
    if problem == "missing_weights":
        overrides, error, words = dict(inception_weights=str(tmp_path / "none.npz")), \
            weights.PretrainedError, ["none.npz does not exist", "convert inception"]
    elif problem == "wrong_kind":  # an LPIPS-kind file where the Inception should be
        wrong = tmp_path / "lpips.npz"
        weights.save(str(wrong), nnx.State({"w": np.zeros(2, np.float32)}),
                        kind="lpips_vgg16")
        overrides, error, words = dict(inception_weights=str(wrong)), \
            weights.PretrainedError, ["'lpips_vgg16'", "'fid_inception_v3'"]
    else:
        stats = tmp_path / "stats.npz"
        if problem == "reference_dims":
            fid.save_stats(str(stats), np.zeros(64), np.eye(64))
        overrides, error, words = dict(inception_weights=fid_inception_weights,
                                       fid_reference=str(stats)), fid.FIDError, \
            ["pool3 has 2048"] if problem == "reference_dims" else ["does not exist"]
    before = sorted(p.name for p in (workdir / "eval").iterdir())
    with pytest.raises(error) as info:
        evaluate.evaluate_workdir(_config(workdir, **overrides), str(workdir))
    assert all(word in str(info.value) for word in words), str(info.value)
    assert sorted(p.name for p in (workdir / "eval").iterdir()) == before
    config = tiny_config()
    config.eval.update(overrides)
    with pytest.raises(error):  # training stops at setup too, before its workdir exists
        loop.setup(config, str(tmp_path / "new_run"))
    assert not (tmp_path / "new_run").exists()
