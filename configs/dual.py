"""FQGAN-Dual: [vis, sem] sub-codebooks of 16384 x 8, each with its own adapter branch.

Official recipe (spec fqgan.md §4.3): Adam(0.9, 0.95) lr 2e-4, global batch 256, ~200k steps,
L2 + VQ (beta 0.25) + entropy 0.03 + disentanglement 0.1. The CLIP teacher of the `sem` branch,
LPIPS and the GAN join in later releases.

Full ImageNet recipe:
  python -m fqgan_jax.main --config=configs/dual.py --workdir=/path/to/workdir
8x downsampling:
  python -m fqgan_jax.main --config=configs/dual.py:ds8 --workdir=/path/to/workdir
CPU smoke run on the photos bundled with scikit-image (a few minutes on 2 cores):
  python -m fqgan_jax.main --config=configs/dual.py:smoke --workdir=/tmp/dual_smoke
"""

from fqgan_jax import config_lib


def get_config(arg=None):
    preset = config_lib.preset(arg, ("", "ds8", "smoke"))
    config = config_lib.base_config()
    config.model.branches = ("vis", "sem")
    return config_lib.apply_preset(config, preset)
