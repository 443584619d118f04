"""FQGAN-Triple: [vis, sem_mid, sem_high] sub-codebooks of 16384 x 8 (spec fqgan.md §1).

Same recipe as Dual; the disentanglement loss averages the three pairs (spec §2). sem_mid is
taught by DINOv2 ViT-S/14 and sem_high by CLIP ViT-B/16 (spec §3.1), read from
~/.cache/fqgan_jax/{dinov2-small,clip-vit-base-patch16} unless --config.teachers.<b>.path says
otherwise. The smoke preset uses small random-init towers of the same families.

Full ImageNet recipe:
  python -m fqgan_jax.main --config=configs/triple.py --workdir=/path/to/workdir
8x downsampling:
  python -m fqgan_jax.main --config=configs/triple.py:ds8 --workdir=/path/to/workdir
CPU smoke run on the photos bundled with scikit-image:
  python -m fqgan_jax.main --config=configs/triple.py:smoke --workdir=/tmp/triple_smoke
"""

from fqgan_jax import config_lib


def get_config(arg=None):
    preset = config_lib.preset(arg, ("", "ds8", "smoke"))
    config = config_lib.base_config()  # the official recipe; every key and its meaning
    config.model.branches = ("vis", "sem_mid", "sem_high")
    config.teachers.sem_mid = config_lib.teacher("dinov2_s14")
    config.teachers.sem_high = config_lib.teacher("clip_vit_b16")

    if preset == "ds8":  # 8x downsampling: a 32 x 32 code grid at 256 px
        config.model.ch_mult = (1, 2, 2, 4)

    if preset == "smoke":  # random-init towers of the same families, logged as such
        config.teachers.sem_mid = config_lib.teacher("dinov2_tiny")
        config.teachers.sem_high = config_lib.teacher("clip_tiny")
        # A 64 px ds4 model, one adapter layer, 3 x 1024 codes, float32.
        config.model.update(dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                                 adapter_layers=1, adapter_heads=4, codebook_size=1024,
                                 dtype="float32"))
        config_lib.cpu_smoke(config)  # photos, 200 steps of 16, GAN from 150, small eval
    return config
