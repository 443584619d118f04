"""VQGAN-LC: a 100,000 x 768 frozen codebook of clustered CLIP ViT-L/14 patch features, seen
through a trained linear projector to 8-d codes (spec large_codebooks.md §A; Zhu et al.,
NeurIPS 2024: 99.9% utilization, rFID 2.62 on ImageNet at f16).

Two steps: make the codebook once (k-means per ImageNet class, 100 centers x 1000 classes;
fqgan_jax/tools/init_codebook.py), then train with it. config.model.lc.codebook_path has no
default: a run without it stops with these instructions.
  python -m fqgan_jax.tools.init_codebook --config=configs/lc.py --output=/path/lc_100k.npy
  python -m fqgan_jax.main --config=configs/lc.py --workdir=/path/to/workdir \
      --config.model.lc.codebook_path=/path/lc_100k.npy
The first reads CLIP ViT-L/14 from $FQGAN_JAX_WEIGHTS_DIR/clip-vit-large-patch14 (or
--config.model.lc.init_encoder_path=DIR; `huggingface-cli download openai/clip-vit-large-patch14
--include config.json model.safetensors --local-dir DIR`). The official codebook-100K.pth works
too, as .npy: python -c "import numpy, torch; numpy.save('lc_100k.npy',
torch.load('codebook-100K.pth').float().numpy())".
f8 (1024 tokens; the codebook file is the same):
  python -m fqgan_jax.main --config=configs/lc.py:f8 --workdir=DIR \
      --config.model.lc.codebook_path=/path/lc_100k.npy
CPU smoke run on the scikit-image photos (a random-init tiny CLIP makes a 1024 x 64 codebook;
the preset reads it from /tmp/lc_codebook.npy):
  python -m fqgan_jax.tools.init_codebook --config=configs/lc.py:smoke \
      --output=/tmp/lc_codebook.npy
  python -m fqgan_jax.main --config=configs/lc.py:smoke --workdir=/tmp/lc_smoke

The recipe (spec §A.5-A.7), from vqgan-gpt-lc/training_vqgan.py and models_vq.py:
* VQ loss 0.1 x (commitment + 0.33 x projector term) (rate_q; quantizers/lc.py), L1 pixel
  loss, LPIPS 1, hinge GAN 0.1 x taming's adaptive weight (max 1e4) from step 50,000 (the
  official `iteration > disc_start` with 0-based iterations starts at 50,002), PatchGAN with
  2 layers, D's loss the 0.5-scaled hinge itself. float32 (autocast is commented out).
* Adam(0.5, 0.9, eps 1e-7) for G and D, no weight decay (0.05 is parsed, never used), no
  gradient clipping (the official NativeScaler is called without clip_grad: inf here), linear
  warm-up over 5 epochs, then half-cosine to 0. D's learning rate follows the same per-step
  schedule from step 1 although D trains only from disc_start, hence
  gan.official_disc_adam_count (D's Adam count is the global step; its first few updates
  differ from a fresh Adam's until the moments fill, ~10 steps at b2 = 0.9).
* Disagreements, settled by the released checkpoint (spec §A.7):
  - learning rate: 5e-4, the README's. The authors changed the README from 1e-4 to 5e-4 after
    the first release while runTrainVQ.sh kept 1e-4; a deliberate edit of the documented
    command is the better witness of what trained the released model.
  - length: the released checkpoint is "trained for 20 epochs" (README; StableVQ lists 20),
    so 20 epochs of 1,281,167 images at batch 256 (5,004 steps an epoch, drop_last) = 100,080
    steps, with the cosine ending there. The README's command says --epochs 100: if the
    checkpoint is epoch 20 of that run, its rate at the end was still ~94% of the peak; to
    replay that, set --config.train.num_steps=500400 and stop at step 100,080.
  - GAN start 50,000 (README and script; the argparse default is 10,000).
* Data: short side resized to 256, random 256 crop, no flip (ADM's resize with
  crop_scale (1, 1)); eval center crops, as everywhere here.
"""

from fqgan_jax import config_lib

IMAGENET_TRAIN_IMAGES = 1_281_167
BATCH_SIZE = 256
STEPS_PER_EPOCH = IMAGENET_TRAIN_IMAGES // BATCH_SIZE  # 5,004: the official drop_last=True
EPOCHS = 20  # the released checkpoint
WARMUP_EPOCHS = 5
SMOKE_CODEBOOK = "/tmp/lc_codebook.npy"  # where the docstring's smoke init_codebook writes


def _adam(optimizer, learning_rate: float, warmup_steps: int) -> None:
    """The official Adam and schedule (module docstring), for G's or D's optimizer."""
    optimizer.update(dict(learning_rate=learning_rate, b1=0.5, b2=0.9, eps=1e-7,
                          weight_decay=0.0, grad_clip_norm=float("inf"),
                          schedule="warmup_cosine", warmup_steps=warmup_steps,
                          min_lr_ratio=0.0))


def get_config(arg=None):
    preset = config_lib.preset(arg, ("", "f8", "smoke"))
    config = config_lib.base_config()  # every key and its meaning
    config.model.update(dict(quantizer="lc", branches=("vq",), adapter_layers=0,
                             l2_normalize=False, code_dim=8, codebook_size=100_000,
                             dtype="float32"))
    config.model.lc.update(dict(codebook_path="", feature_dim=768, projector="linear",
                                tuning_codebook=0, codebook_ratio=0.33,
                                init_encoder="clip_vit_l14", init_pool=4,
                                init_clustering="per_class"))
    # rate_q = 0.1 on commitment + 0.33 x codebook; commitment_beta is not read by LC.
    config.loss.update(dict(reconstruction="l1", reconstruction_weight=1.0,
                            perceptual_weight=1.0, codebook_weight=0.1, entropy_weight=0.0,
                            disentangle_weight=0.0, semantic_weight=0.0))
    config.gan.update(dict(weight=0.1, adaptive_weight=True, adaptive_weight_max=1e4,
                           start=50_000, disc_warmup_steps=0, generator_loss="hinge",
                           disc_loss_weight=1.0, n_layers=2, ndf=64,
                           official_disc_adam_count=True))
    warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH  # 25,020
    _adam(config.optimizer, 5e-4, warmup_steps)
    _adam(config.gan.optimizer, 5e-4, warmup_steps)
    config.train.update(dict(batch_size=BATCH_SIZE, num_steps=EPOCHS * STEPS_PER_EPOCH))
    config.data.update(dict(augment="adm", crop_scale=(1.0, 1.0), random_flip=False))

    if preset == "f8":  # 1024 tokens; the released f8 model is "f8-dim4" (LDM-LC's config)
        config.model.update(dict(ch_mult=(1, 2, 2, 4), code_dim=4))

    if preset == "smoke":  # a 64 px ds4 model, 1024 codes of a random tiny CLIP, float32
        config.model.update(dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=64,
                                 adapter_heads=4, codebook_size=1024))
        # clip_tiny: 64-d features on a 14 x 14 grid (pool 2 -> 49 per image); 1024 codes do
        # not split over the 6 photo classes, so one global k-means.
        config.model.lc.update(dict(feature_dim=64, init_encoder="clip_tiny", init_pool=2,
                                    init_clustering="global", init_iterations=10,
                                    init_batch_size=32, codebook_path=SMOKE_CODEBOOK))
        config_lib.cpu_smoke(config)  # photos, 200 steps of 16, lr 1e-3, GAN from 150
        config.optimizer.warmup_steps = 20
        config.gan.optimizer.warmup_steps = 20
    return config
