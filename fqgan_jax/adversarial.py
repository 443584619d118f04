"""The adversarial half of the train step: the generator's GAN term and the discriminator update.

Schedule (spec fqgan.md §4.1; steps count updates from 1, as the official global_step):
- the discriminator trains from step `gan.start - gan.disc_warmup_steps`;
- the generator's loss includes the GAN term from step `gan.start`.
Each phase sits in a `lax.cond`, so before its start no discriminator compute is spent at all
(not even a forward pass multiplied by a zero weight).

The discriminator always runs in train mode (batch statistics), as the official one does. Only its
own update records BatchNorm running statistics; the generator phase's forward pass through D
leaves them alone. Real and fake images go through D in separate calls (separate statistics).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from fqgan_jax import gan_losses


def generator_active(step: jax.Array, gan: ml_collections.ConfigDict) -> jax.Array:
    """`step` is TrainState.step, the number of updates done before this one."""
    return gan_losses.discriminator_weight(step, gan.start, 1.0) > 0


def discriminator_active(step: jax.Array, gan: ml_collections.ConfigDict) -> jax.Array:
    return gan_losses.discriminator_weight(step, gan.start - gan.disc_warmup_steps, 1.0) > 0


def _generator_loss_on_logits(logits: jax.Array, kind: str) -> jax.Array:
    if kind == "hinge":
        return gan_losses.hinge_generator_loss(logits)
    return gan_losses.non_saturating_generator_loss(
        logits, per_image=kind == "non_saturating_per_image")


def gan_generator_fn(disc_graphdef: nnx.GraphDef, disc_state, kind: str) -> Callable:
    """recon -> the unweighted generator GAN loss against the current (fixed) discriminator."""
    def loss(recon):
        disc = nnx.merge(disc_graphdef, disc_state.params, disc_state.batch_stats, copy=True)
        return _generator_loss_on_logits(disc(recon, train=True), kind)
    return loss


def last_layer_adaptive_weight(nll_fn: Callable, gan_fn: Callable, recon: jax.Array,
                               last_layer: tuple, features: jax.Array,
                               max_weight: float) -> jax.Array:
    """taming's adaptive weight |d nll / d W| / (|d gan / d W| + 1e-4), W = decoder.conv_out's
    kernel (spec large_codebooks.md §A.5).

    The gradient w.r.t. the last layer's kernel depends only on d loss / d recon and the layer's
    input, so it costs one more pass through LPIPS and D, not through the whole tokenizer.
    `last_layer` is (graphdef, params) of `decoder.conv_out`; `features` is its input.
    """
    recon, features = jax.lax.stop_gradient((recon, features))
    graphdef, params = last_layer
    _, pullback = jax.vjp(lambda p: nnx.merge(graphdef, p)(features).astype(jnp.float32),
                          jax.lax.stop_gradient(params))
    (nll_grads,) = pullback(jax.grad(nll_fn)(recon))
    (gan_grads,) = pullback(jax.grad(gan_fn)(recon))
    return gan_losses.adaptive_generator_weight(nll_grads["kernel"], gan_grads["kernel"],
                                                max_weight=max_weight)


def generator_gan_term(step, recon, *, disc_graphdef, disc_state, gan, adaptive=None):
    """(weighted term to add to the generator loss, unweighted term, weight); 0 before
    `gan.start`.

    `adaptive` is (nll_fn, last_layer, features) when `gan.adaptive_weight` is on.
    """
    nll_fn, (last_graphdef, last_params), features = adaptive or (None, (None, None), None)

    # Arrays and States enter the cond as operands rather than closures, so each branch traces
    # its own copies; functions and graphdefs are static and stay closures.
    def on(disc_state, recon, last_params, features):
        gan_fn = gan_generator_fn(disc_graphdef, disc_state, gan.generator_loss)
        term = gan_fn(recon)
        weight = jnp.float32(gan.weight)
        if gan.adaptive_weight:
            weight = weight * last_layer_adaptive_weight(
                nll_fn, gan_fn, recon, (last_graphdef, last_params), features,
                gan.adaptive_weight_max)
        return weight * term, term, weight

    def off(*_):
        zero = jnp.zeros((), jnp.float32)
        return zero, zero, zero

    return jax.lax.cond(generator_active(step, gan), on, off, disc_state, recon, last_params,
                        features)


def _discriminator_loss(params, disc_state, images, recon, *, disc_graphdef, gan):
    # copy=True: fresh variables of this trace, which BatchNorm may update (NNX refuses to
    # mutate variables that belong to an enclosing trace).
    disc = nnx.merge(disc_graphdef, params, disc_state.batch_stats, copy=True)
    real = disc(images, train=True)
    fake = disc(jax.lax.stop_gradient(recon), train=True)
    batch_stats = nnx.state(disc, nnx.BatchStat)
    hinge = gan_losses.hinge_discriminator_loss(real, fake)
    loss = gan.disc_loss_weight * hinge
    ema = disc_state.lecam_ema
    lecam = jnp.zeros((), jnp.float32)
    if gan.lecam_weight > 0:
        # Open-MAGVIT2 updates the EMAs with this step's logits before using them.
        ema = jnp.stack([gan_losses.update_lecam_ema(ema[0], real, gan.lecam_decay),
                         gan_losses.update_lecam_ema(ema[1], fake, gan.lecam_decay)])
        lecam = gan_losses.lecam_regularizer(real, fake, ema[0], ema[1])
        loss = loss + gan.lecam_weight * lecam
    metrics = {"disc/loss": loss, "disc/hinge": hinge, "disc/lecam": lecam,
               "disc/logits_real": jnp.mean(real), "disc/logits_fake": jnp.mean(fake)}
    return loss, (batch_stats, ema, metrics)


def discriminator_update(step, disc_state, images, recon, *, disc_graphdef, disc_tx, gan):
    """(new discriminator state, metrics). Identity before D's start.

    `recon` is this step's reconstruction from the generator phase, i.e. made before the
    generator's update (spec fqgan.md §4.1).
    """
    def on(disc_state, images, recon):
        grad_fn = jax.value_and_grad(_discriminator_loss, has_aux=True)
        (_, (batch_stats, ema, metrics)), grads = grad_fn(
            disc_state.params, disc_state, images, recon, disc_graphdef=disc_graphdef, gan=gan)
        updates, opt_state = disc_tx.update(grads, disc_state.opt_state, disc_state.params)
        params = optax.apply_updates(disc_state.params, updates)
        new_state = disc_state.replace(params=params, batch_stats=batch_stats,
                                       opt_state=opt_state, lecam_ema=ema)
        return new_state, {**metrics, "disc/grad_norm": optax.global_norm(grads)}

    def off(disc_state, *_):
        zero = jnp.zeros((), jnp.float32)
        metrics = {name: zero for name in ("disc/loss", "disc/hinge", "disc/lecam",
                                           "disc/logits_real", "disc/logits_fake",
                                           "disc/grad_norm")}
        return disc_state, metrics

    active = discriminator_active(step, gan)
    new_state, metrics = jax.lax.cond(active, on, off, disc_state, images, recon)
    return new_state, {**metrics, "disc/active": active.astype(jnp.int32)}
