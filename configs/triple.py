"""FQGAN-Triple: [vis, sem_mid, sem_high] sub-codebooks of 16384 x 8 (spec fqgan.md §1).

Same recipe as Dual; the disentanglement loss averages the three pairs (spec §2). The DINOv2
(sem_mid) and CLIP (sem_high) teachers join in a later release.

Full ImageNet recipe:
  python -m fqgan_jax.main --config=configs/triple.py --workdir=/path/to/workdir
CPU smoke run on the photos bundled with scikit-image:
  python -m fqgan_jax.main --config=configs/triple.py:smoke --workdir=/tmp/triple_smoke
"""

from fqgan_jax import config_lib


def get_config(arg=None):
    preset = config_lib.preset(arg, ("", "ds8", "smoke"))
    config = config_lib.base_config()
    config.model.branches = ("vis", "sem_mid", "sem_high")
    return config_lib.apply_preset(config, preset)
