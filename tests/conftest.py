"""Test setup: 8 simulated CPU devices and parsed absl flags, before anything imports jax."""

import os

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

# grain's mp_prefetch and ml_collections read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tiny_config(branches=("vis", "sem"), **overrides):
    """FQGAN at toy size on the bundled photos: every code path, seconds per step on CPU."""
    from fqgan_jax import config_lib

    config = config_lib.load_config_file(os.path.join(REPO, "configs/dual.py:smoke"))
    config.model.update(dict(branches=tuple(branches), ch=32, ch_mult=(1, 2), z_channels=32,
                             adapter_layers=1, adapter_heads=2, codebook_size=64))
    config.data.update(dict(image_size=32, num_workers=0, read_threads=1, prefetch_buffer=2))
    config.train.update(dict(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2,
                             eval_every=4, image_every=2))
    config.eval.update(dict(batch_size=8, num_images=8, grid_images=4))
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.fixture
def tiny_config():
    return make_tiny_config


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """One tiny 4-step training run, shared by the tests that inspect its outputs."""
    from fqgan_jax import train

    workdir = tmp_path_factory.mktemp("trained")
    result = train.train_and_evaluate(make_tiny_config(), str(workdir))
    return workdir, result
