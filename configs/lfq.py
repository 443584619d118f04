"""Open-MAGVIT2's lookup-free quantizer (spec large_codebooks.md §C) on the LlamaGen CNN.

The latent is 18 sign bits: 2^18 = 262,144 implicit codes, no codebook parameters, an entropy
penalty (per-token entropy minimized, each device's batch-mean entropy maximized, τ = 0.01) and a
0.25 commitment (fqgan_jax/quantizers/lfq.py). The rest is Open-MAGVIT2's ImageNet recipe (§C.3)
where the framework has the key: L1 + LPIPS, non-saturating generator loss on per-image mean
logits with a fixed weight 0.1 from step 0, hinge D loss + LeCam 0.05 (EMA 0.999), Adam(0.5, 0.9)
lr 1e-4 constant for G and D, EMA of weights 0.999, global batch 256, 270 epochs.

Not reproduced:
* the MAGVIT-v2 encoder/decoder (4 residual blocks per level, no attention, depth-to-space
  upsampling, AdaptiveGroupNorm conditioned on the code): this config uses the project's
  LlamaGen VQ-16 CNN (2 blocks per level, attention at the lowest level), with its 1x1 conv to
  the 18 channels;
* the LR drops (x 0.1 at epochs 200 and 250): the framework's schedules are constant, warm-up
  cosine and FVQ's annealing, so the LR stays at 1e-4;
* fp16 mixed precision (bf16 here), and the official absence of gradient clipping (spec §C.3
  lists none; the framework's clip 1.0 stays).

ImageNet 256 (16 x 16 tokens of 18 bits):
  python -m fqgan_jax.main --config=configs/lfq.py --workdir=/path/to/workdir
CPU smoke run on the photos bundled with scikit-image (a few minutes on 2 cores):
  python -m fqgan_jax.main --config=configs/lfq.py:smoke --workdir=/tmp/lfq_smoke
"""

from fqgan_jax import config_lib


def get_config(arg=None):
    preset = config_lib.preset(arg, ("", "smoke"))
    config = config_lib.base_config()  # every key and its meaning
    config.model.update(dict(quantizer="lfq", branches=("vq",), adapter_layers=0, code_dim=18,
                             codebook_size=2**18))
    config.loss.update(dict(
        reconstruction="l1", reconstruction_weight=1.0, perceptual_weight=1.0,
        entropy_weight=0.1, commitment_beta=0.25,
        codebook_weight=1.0,  # unused: LFQ has no codebook term
        disentangle_weight=0.0, semantic_weight=0.0))  # one latent, no teacher
    config.gan.update(dict(
        weight=0.1, adaptive_weight=False, start=0, disc_warmup_steps=0,
        generator_loss="non_saturating_per_image",
        # Open-MAGVIT2's vqperceptual.py: d_loss = disc_factor (1) x (hinge + 0.05 LeCam).
        disc_loss_weight=1.0, lecam_weight=0.05, lecam_decay=0.999))
    for optimizer in (config.optimizer, config.gan.optimizer):
        optimizer.update(dict(learning_rate=1e-4, b1=0.5, b2=0.9, schedule="constant"))
    config.optimizer.ema_decay = 0.999
    config.train.batch_size = 256
    config.train.num_steps = 1_351_000  # 270 epochs of 1,281,167 images at 256

    if preset == "smoke":
        # The vqgan.py:smoke model. 10 bits (1024 codes) rather than 18: an eval of 32 images x
        # 256 tokens can then reach every code, so its usage figure means something, and the
        # entropy keeps the two-group matmul path of 18 bits (5 + 5 here, 9 + 9 there).
        config.model.update(dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                                 code_dim=10, codebook_size=2**10, dtype="float32"))
        config.model.lfq.entropy_group_bits = 5
        config_lib.cpu_smoke(config)  # photos, 200 steps of 16, G lr 1e-3, GAN from 150
        # cpu_smoke's adaptive GAN weight (a toy model against the full-size D) and D warm-up
        # stay; 200 steps are too few for a 0.999 weight EMA, whose eval would show the init.
        config.optimizer.ema_decay = 0.9
    return config
