"""Exact resume: an interrupted run (also by kill -9) ends where an uninterrupted one does, the
random tiny teacher and its InfoNCE head included in both."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO

from fqgan_jax import config_lib, sharding
from fqgan_jax.training import loop
from fqgan_jax.training import train_state as ts


def _final(workdir, config):
    """The trained values of a run: tokenizer and discriminator params, D's BatchNorm
    statistics and both optimizer states."""
    mesh = sharding.make_mesh(config.mesh)
    state = ts.restore_state(str(workdir), config, mesh)
    assert state.disc is not None
    trained = (state.params.to_pure_dict(), state.opt_state, state.disc.params.to_pure_dict(),
               state.disc.batch_stats.to_pure_dict(), state.disc.opt_state)
    return jax.device_get(trained), int(state.step)


def _assert_same(params_a, params_b):
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_resume_in_process_is_exact(trained_workdir, tmp_path):
    """Two steps, then a second run to four, against the shared uninterrupted four-step run
    (with its tiny teacher and the Figure 3-4 analysis)."""
    full, full_eval = trained_workdir
    def config():
        saved = config_lib.config_from_dict(json.loads((full / "config.json").read_text()))
        # Not in the compared eval dict, and costly: the Figure 3-4 PNGs and the profile.
        saved.eval.update(dict(single_codebook_images=0, tsne_points=0))
        saved.train.profile_steps = 0
        return saved

    parts = tmp_path / "parts"
    first = config()
    first.train.num_steps = 2
    loop.train_and_evaluate(first, str(parts))
    resumed_eval = loop.train_and_evaluate(config(), str(parts))
    assert resumed_eval == full_eval
    (params_full, step_full), (params_parts, step_parts) = (
        _final(full, config()), _final(parts, config()))
    assert step_full == step_parts == 4
    _assert_same(params_full, params_parts)


def _cli(workdir, num_steps):
    return [sys.executable, "-m", "fqgan_jax.main", "--config=configs/dual.py:smoke",
            f"--workdir={workdir}", f"--config.train.num_steps={num_steps}",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=100",
            "--config.train.log_every=2", "--config.train.image_every=100",
            "--config.data.image_size=32", "--config.model.ch_mult=(1,2)",
            "--config.model.codebook_size=64", "--config.train.batch_size=8",
            "--config.eval.batch_size=8", "--config.eval.num_images=8",
            "--config.data.num_workers=2", "--config.gan.start=1",
            "--config.gan.disc_warmup_steps=0", "--config.gan.ndf=16",
            "--config.eval.single_codebook_images=0", "--config.eval.tsne_points=0"]


@pytest.mark.slow
def test_resume_after_kill_9_is_exact(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    run = lambda wd: subprocess.run(_cli(wd, 8), cwd=REPO, env=env, capture_output=True,  # noqa
                                    text=True, timeout=600, stdin=subprocess.DEVNULL)
    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed, 8), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.time() + 500
    while not (killed / "checkpoints" / "4").exists() and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    restarted = run(killed)
    assert restarted.returncode == 0, restarted.stderr[-3000:]

    final = lambda wd: json.loads((wd / "eval" / "8.json").read_text())  # noqa: E731
    assert final(killed) == final(tmp_path / "reference")
    config = config_lib.config_from_dict(json.loads((killed / "config.json").read_text()))
    ref_params, _ = _final(tmp_path / "reference", config)
    killed_params, step = _final(killed, config)
    assert step == 8
    _assert_same(ref_params, killed_params)
