"""The train step's non-finite guard, codebook health metrics and an end-to-end run (mesh
equivalence: tests/test_scale.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_step
from PIL import Image

from fqgan_jax import quantizers, sharding
from fqgan_jax.training import loop
from fqgan_jax.training import train_state as ts


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    return {"image": rng.integers(0, 256, (config.train.batch_size, size, size, 3), np.uint8)}


def test_nonfinite_batch_skips_the_update(tiny_config):
    config = tiny_config()
    state, step, mesh = make_step(config)
    before = jax.device_get(state.params.to_pure_dict())
    bad = np.full((8, 32, 32, 3), np.nan, np.float32)
    state, metrics = step.at(0)(state, sharding.to_global_batch({"image": bad},
                                                          sharding.batch_sharding(mesh)), {})
    assert int(metrics["skipped"]) == 1 and int(state.nonfinite_streak) == 1
    assert int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params.to_pure_dict()),
                 before)
    good = _batch(config)["image"].astype(np.float32) / 127.5 - 1
    state, metrics = step.at(1)(state, sharding.to_global_batch({"image": good},
                                                          sharding.batch_sharding(mesh)), {})
    assert int(metrics["skipped"]) == 0 and int(state.nonfinite_streak) == 0
    assert int(state.nonfinite_total) == 1


def test_running_usage_reaches_one_when_every_code_is_used():
    from fqgan_jax.training.train_step import codebook_health
    indices = jnp.arange(64).reshape(4, 4, 4, 1) % 16
    last_seen = jnp.full((1, 16), ts.NEVER_SEEN, jnp.int32)
    stats = quantizers.health_stats(indices, 16)
    seen, metrics = codebook_health(indices, stats, last_seen, jnp.int32(5), 10)
    assert float(metrics["codebook/0/running_usage"]) == 1.0
    np.testing.assert_allclose(metrics["codebook/0/perplexity"], 16.0, rtol=1e-5)
    zeros = jnp.zeros((1, 1, 1, 1), jnp.int32)
    _, later = codebook_health(zeros, quantizers.health_stats(zeros, 16), seen, jnp.int32(20),
                               10)
    assert float(later["codebook/0/running_usage"]) == 1 / 16


def test_train_and_evaluate_writes_everything(trained_workdir):
    workdir, result = trained_workdir
    assert set(os.listdir(workdir / "checkpoints")) >= {"2", "4"}
    for step in (0, 4):
        saved = json.loads((workdir / "eval" / f"{step}.json").read_text())
        assert {"step", "psnr", "ssim", "usage"} <= set(saved)
        assert len(saved["usage"]) == 2 and all(0 < u <= 1 for u in saved["usage"])
        assert (workdir / "eval" / f"{step}.png").exists()
        # FQGAN Figures 3-4: original | all | only-vis | only-sem for 8 images, and the t-SNE.
        grid = np.asarray(Image.open(workdir / "eval" / f"{step}_single_codebook.png"))
        assert grid.shape == (8 * 34 + 2, 4 * 34 + 2, 3)
        assert Image.open(workdir / "eval" / f"{step}_tsne.png").size[0] > 100
    assert result["step"] == 4
    assert (workdir / "images" / "2.png").exists()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
    # The jax.profiler trace of step 2 (train.profile_steps=1, profile_first_step=2).
    traces = [f for _, _, files in os.walk(workdir / "profile") for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    assert (workdir / "config.json").exists()


def test_nonfinite_run_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    config = tiny_config()
    config.optimizer.learning_rate = float("nan")
    config.train.update(dict(num_steps=20, checkpoint_every=1, max_nonfinite_steps=3))
    with pytest.raises(loop.NonFiniteError, match="3 consecutive steps"):
        loop.train_and_evaluate(config, str(tmp_path))
    mesh = sharding.make_mesh(config.mesh)
    state = ts.restore_state(str(tmp_path), config, mesh)
    assert int(state.step) < 3
    leaves = jax.tree.leaves(jax.device_get(state.params.to_pure_dict()))
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)


def test_data_counters_add_the_hosts_counts_to_the_restored_totals(monkeypatch):
    """Each host counts the bad and converted images of its own batches; the logged and saved
    totals are the restored ones plus every host's (one process here, a second one faked)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415

    counters = loop.DataCounters({"num_skipped_images": 5, "num_converted_images": 1,
                                   "data": {"global_next_index": 64}})
    for skipped, converted in (([0, 2, 0, 1], [1, 0, 0, 0]), ([0, 0, 0, 0], [0, 1, 1, 0])):
        counters.add({"num_skipped": np.array(skipped), "num_converted": np.array(converted)})
    assert counters.totals() == {"num_skipped_images": 8, "num_converted_images": 4}
    other_host = np.array([10, 20], np.int32)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([x, other_host]))
    assert counters.totals() == {"num_skipped_images": 18, "num_converted_images": 24}
