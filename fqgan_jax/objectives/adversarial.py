"""The adversarial half of the train step: the generator's GAN term and the discriminator update.

Schedule (spec fqgan.md §4.1; steps count updates from 1, as the official global_step):
- the discriminator trains from step `gan.start - gan.disc_warmup_steps`;
- the generator's loss includes the GAN term from step `gan.start`.
`phase(step)` says which parts a step runs. The train step is compiled once per phase (at most
three programs), so before its start no discriminator compute is spent at all. A `lax.cond` would
do the same in one program, but XLA:CPU runs convolutions inside conditional branches ~30x
slower (measured: a D gradient 0.12 s plain, 3.6 s in a cond), which would make CPU runs crawl.

The discriminator always runs in train mode (batch statistics), as the official one does. Only its
own update records BatchNorm running statistics; the generator phase's forward pass through D
leaves them alone. Real and fake images go through D in separate calls (separate statistics).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from fqgan_jax.objectives import gan_losses


@dataclasses.dataclass(frozen=True)
class Phase:
    """Which adversarial parts a step runs; a static argument of the compiled step."""
    discriminator: bool  # the discriminator update
    generator: bool  # the GAN term in the generator's loss

    def __str__(self) -> str:
        if self.generator:
            return "GAN"
        return "discriminator warm-up" if self.discriminator else "no GAN"


def phase(step: int, gan: ml_collections.ConfigDict) -> Phase:
    """The phase of the update after `step` updates (TrainState.step); no GAN if its weight is
    0 (then the state has no discriminator either)."""
    if gan.weight <= 0:
        return Phase(False, False)
    global_step = step + 1  # the official loop's global_step
    return Phase(discriminator=global_step >= gan.start - gan.disc_warmup_steps,
                 generator=global_step >= gan.start)


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


def ramp(step: jax.Array, gan: ml_collections.ConfigDict) -> jax.Array:
    """The GAN weight's ramp factor at train step `step`: (global step - start + 1) / ramp_steps,
    clipped to [0, 1], so the first GAN step has 1 / ramp_steps of the weight and the full
    weight arrives after ramp_steps steps. 1 when gan.ramp_steps is 0 (the official jump)."""
    if gan.ramp_steps <= 0:
        return jnp.float32(1.0)
    global_step = jnp.asarray(step, jnp.float32) + 1.0
    return jnp.clip((global_step - gan.start + 1.0) / gan.ramp_steps, 0.0, 1.0)


def generator_gan_term(recon, *, disc_graphdef, disc_state, gan, adaptive=None, step=None):
    """(weighted term to add to the generator loss, unweighted term, weight).

    `adaptive` is (nll_fn, last_layer, features) when `gan.adaptive_weight` is on; `step` (the
    train step) is needed for `gan.ramp_steps`.
    """
    gan_fn = gan_generator_fn(disc_graphdef, disc_state, gan.generator_loss)
    term = gan_fn(recon)
    weight = jnp.float32(gan.weight)
    if gan.ramp_steps > 0:
        weight = weight * ramp(step, gan)
    if gan.adaptive_weight:
        nll_fn, last_layer, features = adaptive
        weight = weight * last_layer_adaptive_weight(nll_fn, gan_fn, recon, last_layer, features,
                                                     gan.adaptive_weight_max)
    return weight * term, term, weight


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


DISC_METRICS = ("disc/loss", "disc/hinge", "disc/lecam", "disc/logits_real", "disc/logits_fake",
                "disc/grad_norm")


def discriminator_update(disc_state, images, recon, *, disc_graphdef, disc_tx, gan,
                         step: jax.Array | None = None):
    """(new discriminator state, metrics).

    `recon` is this step's reconstruction from the generator phase, i.e. made before the
    generator's update (spec fqgan.md §4.1). `step` is the train step (updates before this
    one), needed for `gan.official_disc_adam_count`.
    """
    grad_fn = jax.value_and_grad(_discriminator_loss, has_aux=True)
    (_, (batch_stats, ema, metrics)), grads = grad_fn(
        disc_state.params, disc_state, images, recon, disc_graphdef=disc_graphdef, gan=gan)
    opt_state = disc_state.opt_state
    if gan.official_disc_adam_count:
        # The official loop steps D's optimizer at every step from step 1, with a zero loss
        # before disc_start: the moments stay 0 but Adam's count (and a schedule's) is the
        # global step. Setting the counts to it is the same, without any compute before.
        opt_state = optax.tree_utils.tree_set(opt_state, count=jnp.asarray(step, jnp.int32))
    updates, opt_state = disc_tx.update(grads, opt_state, disc_state.params)
    params = optax.apply_updates(disc_state.params, updates)
    new_state = disc_state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                                   lecam_ema=ema)
    return new_state, {**metrics, "disc/grad_norm": optax.global_norm(grads)}
