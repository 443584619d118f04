"""FVQ: LlamaGen's VQ-16 with a 16384 x 256 codebook searched through VQBridge-L/4, trained with
learning annealing (spec large_codebooks.md §B; "Scalable Training for Vector-Quantized Networks
with 100% Codebook Utilization", arXiv 2509.10140).

Recipe (spec §B.4, §B.7): L2 + LPIPS 1 + VQ (codebook 1, commitment 0.25, no entropy) + hinge GAN
0.5, fixed weight, from step 20k with a 3-layer PatchGAN; Adam(0.9, 0.95) lr 1e-4 for G and D,
clip 1, global batch 128, 40 epochs, bf16. Both optimizers use the annealing schedule (§B.5):
4-epoch warm-up from 0.005 x lr, full rate for 30% of the remaining steps, then a linear decay to
0.01 x lr at the last step. Steps and warm-up are counted as the official loader does (drop_last
over 1,281,167 images); they are fixed numbers here, so a --config.train.batch_size override
should come with matching num_steps and warmup_steps.

Departures from the official code (fqgan_jax/quantizers/vqbridge.py says more):
* the bridge is the ViT "release" one (the paper's method per the README), not the DiT-block
  variant that the official shell scripts invoke;
* codes are grouped 1D (group_size consecutive codes) rather than as p x p blocks of a square
  sqrt(K) x sqrt(K) layout: a fixed permutation of the codes for group_size = p^2, and K need not
  be a perfect square.

Full ImageNet recipe (16k codes, VQBridge-L/4: 16 codes per group, width 256):
  python -m fqgan_jax.main --config=configs/fvq.py --workdir=/path/to/workdir
65,536 or 262,144 codes with VQBridge-L/8 (64 codes per group), as the official scripts:
  python -m fqgan_jax.main --config=configs/fvq.py:65k --workdir=/path/to/workdir
  python -m fqgan_jax.main --config=configs/fvq.py:262k --workdir=/path/to/workdir
8x downsampling (FVQ's f8, 1024 tokens at 256 px):
  python -m fqgan_jax.main --config=configs/fvq.py:ds8 --workdir=/path/to/workdir
CPU smoke run on the photos bundled with scikit-image:
  python -m fqgan_jax.main --config=configs/fvq.py:smoke --workdir=/tmp/fvq_smoke
"""

from fqgan_jax import config_lib

_IMAGENET_TRAIN_IMAGES = 1_281_167
_EPOCHS, _WARMUP_EPOCHS = 40, 4


def _annealing(opt, warmup_steps: int) -> None:
    """FVQ's learning annealing (spec §B.5), set on config.optimizer or config.gan.optimizer."""
    opt.update(dict(schedule="annealing", warmup_steps=warmup_steps, warmup_init_ratio=0.005,
                    annealing_plateau=0.3, annealing_shape="linear", min_lr_ratio=0.01))


def get_config(arg=None):
    preset = config_lib.preset(arg, ("", "65k", "262k", "ds8", "smoke"))
    config = config_lib.base_config()  # the FQGAN recipe; every key and its meaning
    config.model.update(dict(quantizer="fvq", branches=("vq",), adapter_layers=0,
                             l2_normalize=False, code_dim=256, codebook_size=16384))
    config.model.fvq.update(dict(group_size=16, width=256, depth=2, heads=4, mlp_ratio=2.0))
    config.loss.update(dict(reconstruction="l2", perceptual_weight=1.0, codebook_weight=1.0,
                            commitment_beta=0.25, entropy_weight=0.0, disentangle_weight=0.0,
                            semantic_weight=0.0))
    config.gan.update(dict(weight=0.5, adaptive_weight=False, generator_loss="hinge",
                           start=20_000, n_layers=3))
    config.train.batch_size = 128
    steps_per_epoch = _IMAGENET_TRAIN_IMAGES // config.train.batch_size  # 10,009
    config.train.num_steps = _EPOCHS * steps_per_epoch  # 400,360
    for opt in (config.optimizer, config.gan.optimizer):  # official: one lr for G and D
        opt.update(dict(learning_rate=1e-4, b1=0.9, b2=0.95, grad_clip_norm=1.0))
        _annealing(opt, _WARMUP_EPOCHS * steps_per_epoch)

    if preset in ("65k", "262k"):  # the official scripts' VQBridge-L/8, d = 256
        config.model.codebook_size = 65536 if preset == "65k" else 262144
        config.model.fvq.group_size = 64
        # Search Ĉ's rows split over the fsdp axis (a no-op on an fsdp axis of 1); both sizes
        # divide by any power-of-two fsdp group.
        config.model.shard_codebook = True

    if preset == "ds8":  # FVQ's f8 tokenizer: a 32 x 32 code grid at 256 px
        config.model.ch_mult = (1, 2, 2, 4)

    if preset == "smoke":  # a 64 px ds4 model, 1024 codes of 64 dims, bridge width 64
        # code_dim = z_channels, as in the full recipe (256 = 256). At this size the bridge is
        # 64 tokens of 16 codes and the search 4096 tokens x 1024 codes x 64 dims per step:
        # negligible next to the CNN on a CPU, so nothing is gained by a smaller d.
        config.model.update(dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                                 codebook_size=1024, code_dim=64, dtype="float32"))
        config.model.fvq.update(dict(group_size=16, width=64))
        config_lib.cpu_smoke(config)  # photos, 200 steps of 16, lr 1e-3, GAN from 150
        for opt in (config.optimizer, config.gan.optimizer):
            _annealing(opt, 10)  # 10 warm-up steps, plateau to step 67, decay to step 199
    return config
