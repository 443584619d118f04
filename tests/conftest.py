"""Test setup: 8 simulated CPU devices and parsed absl flags, before anything imports jax."""

import os

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

# grain's mp_prefetch and ml_collections read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
