"""LlamaGen VQ-16 baseline: one 16384 x 8 codebook, no adapters (spec fqgan.md §9).

The factorized tokenizer with k = 1 and no adapter is exactly this model.

Full ImageNet recipe (LlamaGen: lr 1e-4, global batch 128, 40 epochs, no entropy loss):
  python -m fqgan_jax.main --config=configs/vqgan.py --workdir=/path/to/workdir
8x downsampling (VQ-8):
  python -m fqgan_jax.main --config=configs/vqgan.py:ds8 --workdir=/path/to/workdir
CPU smoke run on the photos bundled with scikit-image:
  python -m fqgan_jax.main --config=configs/vqgan.py:smoke --workdir=/tmp/vqgan_smoke
"""

from fqgan_jax import config_lib


def get_config(arg=None):
    preset = config_lib.preset(arg, ("", "ds8", "smoke"))
    config = config_lib.base_config()  # the FQGAN recipe; every key and its meaning
    config.model.branches = ("vq",)
    config.model.adapter_layers = 0
    config.loss.entropy_weight = 0.0
    config.loss.disentangle_weight = 0.0  # one codebook: nothing to disentangle
    config.loss.semantic_weight = 0.0  # no teacher
    config.optimizer.learning_rate = 1e-4
    config.train.batch_size = 128
    config.train.num_steps = 400_000  # 40 epochs of 1,281,167 images at 128

    if preset == "ds8":  # VQ-8: a 32 x 32 code grid at 256 px
        config.model.ch_mult = (1, 2, 2, 4)

    if preset == "smoke":  # a 64 px ds4 model, 1024 codes, float32 (still no adapter)
        config.model.update(dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                                 adapter_heads=4, codebook_size=1024, dtype="float32"))
        config_lib.cpu_smoke(config)  # photos, 200 steps of 16, lr 1e-3, GAN from 150
    return config
