"""The CPU defaults of fqgan_jax/xla_flags.py: added once, and a user's own value wins."""

import os

from fqgan_jax import xla_flags


def test_defaults_are_added_to_the_users_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    xla_flags.set_defaults(environ)
    assert environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_enable_concurrency_optimized_scheduler=false",
        "--xla_cpu_experimental_ynn_fusion_type="]
    once = environ["XLA_FLAGS"]
    xla_flags.set_defaults(environ)
    assert environ["XLA_FLAGS"] == once


def test_a_users_value_wins():
    environ = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    xla_flags.set_defaults(environ)
    assert "--xla_cpu_experimental_ynn_fusion_type=individual_dot" in environ["XLA_FLAGS"]
    assert environ["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_this_process_runs_with_them():  # set at `import fqgan_jax`, before the backend starts
    assert "--xla_cpu_experimental_ynn_fusion_type" in os.environ["XLA_FLAGS"]
