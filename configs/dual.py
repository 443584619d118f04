"""FQGAN-Dual: [vis, sem] sub-codebooks of 16384 x 8, each with its own adapter branch; `sem` is
taught by CLIP ViT-L/14 (InfoNCE on its CLS feature, spec fqgan.md §3).

Official recipe (spec §4.3): Adam(0.9, 0.95) lr 2e-4, global batch 256, ~200k steps, L2 + LPIPS
+ VQ (beta 0.25) + entropy 0.03 + disentanglement 0.1 + InfoNCE 0.5 + hinge GAN 0.5 from step
20k. The teacher is read from ~/.cache/fqgan_jax/clip-vit-large-patch14 unless
--config.teachers.sem.path says otherwise (README: "Teacher weights").

Full ImageNet recipe:
  python -m fqgan_jax.main --config=configs/dual.py --workdir=/path/to/workdir
8x downsampling:
  python -m fqgan_jax.main --config=configs/dual.py:ds8 --workdir=/path/to/workdir
CPU smoke run on the photos bundled with scikit-image (a few minutes on 2 cores; a small
random-init CLIP stands in for the teacher):
  python -m fqgan_jax.main --config=configs/dual.py:smoke --workdir=/tmp/dual_smoke
"""

from fqgan_jax import config_lib


def get_config(arg=None):
    preset = config_lib.preset(arg, ("", "ds8", "smoke"))
    config = config_lib.base_config()  # the official recipe; every key and its meaning
    config.model.branches = ("vis", "sem")
    config.teachers.sem = config_lib.teacher("clip_vit_l14")

    if preset == "ds8":  # 8x downsampling: a 32 x 32 code grid at 256 px
        config.model.ch_mult = (1, 2, 2, 4)

    if preset == "smoke":  # a 64 px ds4 model, one adapter layer, 2 x 1024 codes, float32
        config.model.update(dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                                 adapter_layers=1, adapter_heads=4, codebook_size=1024,
                                 dtype="float32"))
        config.teachers.sem = config_lib.teacher("clip_tiny")  # random-init, logged as such
        config_lib.cpu_smoke(config)  # photos, 200 steps of 16, GAN from 150, small eval
    return config
