"""Adversarial loss terms on discriminator logits, and their weighting schedules.

Pure functions of arrays, usable inside a jitted step. All reduce in float32 whatever the logits'
dtype. Sources:
- hinge D/G losses: LlamaGen/taming `vq_loss.py` (spec fqgan.md §4.1); the schedule that
  switches them on is `adversarial.phase`;
- non-saturating G loss, LeCam: Open-MAGVIT2 `vqperceptual.py` (spec large_codebooks.md §C.3);
- `adaptive_generator_weight`: taming's `calculate_adaptive_weight` (VQGAN-LC, spec
  large_codebooks.md §A.5; present but unused in FQGAN, spec fqgan.md §4.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x̂))), before the disc_weight factor.

    Callers pass D(stop_gradient(x̂)) as `fake_logits` (spec fqgan.md §4.1).
    """
    loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(real_logits)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(fake_logits)))
    return 0.5 * (loss_real + loss_fake)


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """-mean D(x̂): the generator side of the hinge GAN (FQGAN, VQGAN-LC)."""
    return -jnp.mean(_f32(fake_logits))


def non_saturating_generator_loss(fake_logits: jax.Array, *,
                                  per_image: bool = False) -> jax.Array:
    """mean softplus(-D(x̂)) = -mean log sigmoid(D(x̂)), over the patch logits [B, ...].

    per_image=True first averages each image's patch logits, as Open-MAGVIT2's
    `non_saturate_gen_loss` does (spec large_codebooks.md §C.3); the default is taming's
    elementwise `vanilla_g_loss`.
    """
    logits = _f32(fake_logits)
    if per_image:
        logits = jnp.mean(logits.reshape(logits.shape[0], -1), axis=-1)
    return jnp.mean(jax.nn.softplus(-logits))


def lecam_regularizer(real_logits: jax.Array, fake_logits: jax.Array, ema_real: jax.Array,
                      ema_fake: jax.Array) -> jax.Array:
    """Open-MAGVIT2's LeCam term (spec large_codebooks.md §C.3, weight 0.05 there):

        mean(relu(D(x) - ema_fake)²) + mean(relu(ema_real - D(x̂))²).

    The EMAs are constants (the official code stores Python floats via `.item()`), so no gradient
    flows into them. Open-MAGVIT2 updates the EMAs with this step's logits *before* computing the
    term; call `update_lecam_ema` first to match.
    """
    ema_real = jax.lax.stop_gradient(_f32(ema_real))
    ema_fake = jax.lax.stop_gradient(_f32(ema_fake))
    real_term = jnp.mean(jnp.square(jax.nn.relu(_f32(real_logits) - ema_fake)))
    fake_term = jnp.mean(jnp.square(jax.nn.relu(ema_real - _f32(fake_logits))))
    return real_term + fake_term


def update_lecam_ema(ema: jax.Array, logits: jax.Array, decay: float) -> jax.Array:
    """ema * decay + mean(logits) * (1 - decay); Open-MAGVIT2 uses decay 0.999 and init 0.

    Apply once to the real and once to the fake logits, each with its own EMA. Stop-gradient, as
    the official code takes `.item()` of the mean.
    """
    mean = jax.lax.stop_gradient(jnp.mean(_f32(logits)))
    return _f32(ema) * decay + mean * (1.0 - decay)


def _global_norm(grads) -> jax.Array:
    """L2 norm over all leaves; for one array it is torch.norm's Frobenius norm."""
    leaves = jax.tree.leaves(grads)
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(leaf))) for leaf in leaves))


def adaptive_generator_weight(nll_grads, gan_grads, max_weight: float = 1e4,
                              eps: float = 1e-4) -> jax.Array:
    """taming's adaptive GAN weight: ||∇L_nll|| / (||∇L_gan|| + eps), clipped to [0, max_weight].

    Both gradients are taken w.r.t. the decoder's last layer (taming: `conv_out.weight` only; a
    pytree, e.g. kernel and bias, uses the global norm over its leaves). The result is a constant
    (stop-gradient, torch's `.detach()`); taming then multiplies it by the discriminator weight,
    which is left to the caller.
    """
    ratio = _global_norm(nll_grads) / (_global_norm(gan_grads) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))
