"""A real multi-host run on this machine: two JAX processes of 4 CPU devices each (gloo
collectives), through `main --distributed` with an FSDP mesh (4, 2) and the sharded codebook
search; then the checkpoint they wrote together evaluates on one process and one device, and
training resumes from it on one process of 4 devices (another host count and mesh).

It takes ~2 minutes on 2 cores, so it runs only with FQGAN_JAX_MULTIPROCESS_TEST=1 (not in the
default suite; the single-process tests in test_scale.py cover the same programs).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("FQGAN_JAX_MULTIPROCESS_TEST") != "1",
    reason="2-process run (~2 min): set FQGAN_JAX_MULTIPROCESS_TEST=1")]

TINY = ["--config=configs/dual.py:smoke", "--config.data.image_size=32",
        "--config.model.ch_mult=(1,2)", "--config.model.codebook_size=64",
        "--config.train.batch_size=16", "--config.eval.batch_size=8",
        "--config.eval.num_images=16", "--config.gan.ndf=16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_checkpoint_and_restore_on_one(tmp_path):
    workdir = tmp_path / "run"
    run = TINY + [f"--workdir={workdir}", "--config.train.checkpoint_every=2",
                  "--config.train.eval_every=4", "--config.train.image_every=2",
                  "--config.data.num_workers=0", "--config.gan.start=1",
                  "--config.gan.disc_warmup_steps=0", "--config.eval.tsne_points=0",
                  "--config.eval.single_codebook_images=0", "--config.mesh.shape=(-1,2)",
                  "--config.model.shard_codebook=True", "--config.mesh.fsdp_min_size=256"]
    flags = run + ["--config.train.num_steps=4", "--distributed",
                   f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs = [subprocess.Popen([sys.executable, "-m", "fqgan_jax.main", *flags,
                               f"--process_id={i}"], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL) for i in range(2)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "JAX process 1/2, 8 devices" in logs[1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert len([f for f in os.listdir(workdir) if f.startswith("events.")]) == 1  # process 0
    trained = json.loads((workdir / "eval" / "4.json").read_text())

    one = subprocess.run(
        [sys.executable, "-m", "fqgan_jax.main", *TINY, f"--workdir={workdir}", "--mode=eval",
         "--config.mesh.shape=(1,1)"], cwd=REPO, text=True, capture_output=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
        stdin=subprocess.DEVNULL)
    assert one.returncode == 0, one.stderr[-3000:]
    again = json.loads((workdir / "eval" / "4.json").read_text())
    for key in ("psnr", "ssim", "usage"):
        assert again[key] == pytest.approx(trained[key], rel=1e-5)

    # A preempted pod job resuming on a smaller slice: 2 hosts -> 1, mesh (4, 2) -> (2, 2).
    resumed = subprocess.run(
        [sys.executable, "-m", "fqgan_jax.main", *run, "--config.train.num_steps=6"], cwd=REPO,
        text=True, capture_output=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored checkpoint {workdir}/checkpoints/4" in resumed.stderr
    assert "6" in os.listdir(workdir / "checkpoints")
    meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["data"] == {"global_next_index": 6 * 16}
