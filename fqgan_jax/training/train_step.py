"""The pure train step, `train_step(state, batch, frozen) -> (state, metrics)`, and its compiling.

Design notes:
- One step holds both updates: the generator's, then the discriminator's on the same
  reconstructions (spec fqgan.md §4.3 "training loop per step"). It is compiled once per
  adversarial phase (no GAN / D warming up / full GAN), see `adversarial.py`.
- Non-finite guard: a non-finite loss, gradient or updated parameter, in either phase, skips the
  whole update (params, optimizers, EMA, discriminator stay as they were); the step is counted.
  The outer loop stops the run after `max_nonfinite_steps` consecutive skips, so no bad state is
  ever checkpointed.
- Codebook health is computed on the global batch (jit semantics over sharded arrays), so the
  numbers are already reduced across devices and hosts.
- Running usage keeps, per code, the last step it was assigned; usage = share of codes seen in the
  last `usage_window_steps` steps. Unlike the official 65,536-assignment rolling window (spec
  large_codebooks.md §E), it can read 100% at any codebook size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from fqgan_jax import sharding
from fqgan_jax.architecture import merge_model
from fqgan_jax.data.pixels import images_to_float
from fqgan_jax.frozen import teachers
from fqgan_jax.objectives import adversarial, infonce, losses
from fqgan_jax.training.train_state import Components, TrainState


def _select(keep_new: jax.Array, new, old):
    # lax.cond rather than a per-leaf jnp.where: the where-form made XLA compile ~5x slower.
    return jax.lax.cond(keep_new, lambda: new, lambda: old)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def codebook_health(indices, stats, last_seen, step, window):
    """The quantizer's batch statistics per sub-codebook, and the running usage estimate."""
    flat = indices.reshape(-1, indices.shape[-1])
    seen = jax.vmap(lambda ls, idx: ls.at[idx].set(step))(last_seen, flat.T)
    metrics = {}
    for i in range(flat.shape[-1]):
        for name, values in stats.items():
            metrics[f"codebook/{i}/{name}"] = values[i]
        metrics[f"codebook/{i}/running_usage"] = jnp.mean(
            (step - seen[i] < window).astype(jnp.float32))
    return seen, metrics


def _perceptual_fn(components: Components, frozen: dict, loss_config, rng):
    """(images, recon) -> batch-mean LPIPS with the frozen VGG16, or None when LPIPS is off."""
    if components.lpips_graphdef is None:
        return None

    def perceptual(images, recon):
        lpips = nnx.merge(components.lpips_graphdef, frozen["lpips"])
        # The official loss module stays in train mode, so its heads' Dropout(0.5) is live.
        return jnp.mean(lpips(images, recon,
                              dropout_rng=rng if loss_config.lpips_dropout else None))
    return perceptual


def teacher_features(images, frozen: dict, *, components: Components, config) -> dict:
    """{taught branch: its frozen teacher's CLS feature [B, W]}, constants of the step."""
    return {branch: teachers.cls_features(graphdef, frozen["teachers"][branch],
                                          config.teachers[branch].kind, images)
            for branch, graphdef in components.teacher_graphdefs.items()}


def _generator_loss(params, state: TrainState, images, frozen, teacher_cls, rng, *, components,
                    config, gan_on: bool, num_shards: int):
    """The tokenizer's total loss (spec fqgan.md §4.1) and (metrics, indices, the quantizer's
    health stats, reconstruction)."""
    model = merge_model(components.graphdef, params, state.model_state)
    dropout_rng, lpips_rng = jax.random.split(rng)
    # Dropout (off in the official recipe) draws from the state's key, folded with the step.
    rngs = nnx.Rngs(dropout=dropout_rng) if config.model.dropout > 0 else None
    quantized = model.encode(images, with_entropy=config.loss.entropy_weight > 0, rngs=rngs)
    features = model.decode_features(quantized.quantized, rngs=rngs)
    recon = model.decoder.conv_out(features).astype(jnp.float32)
    perceptual_fn = _perceptual_fn(components, frozen, config.loss, lpips_rng)
    total, terms = losses.generator_loss(images, recon, quantized, config.loss, perceptual_fn,
                                         quantizer_weights=model.quantize.loss_weights(config.loss))
    if teacher_cls:
        semantic, semantic_terms = infonce.semantic_loss(
            model.predict_teacher_features(quantized.quantized), teacher_cls, config.loss,
            num_groups=num_shards if config.loss.infonce_negatives == "shard" else 1)
        total, terms = total + semantic, {**terms, **semantic_terms}
    if state.disc is not None:
        zero = jnp.zeros((), jnp.float32)
        weighted, terms["gan"], terms["generator_gan_weight"] = zero, zero, zero
        if gan_on:
            adaptive = None
            if config.gan.adaptive_weight:
                nll_fn = lambda r: losses.nll_loss(  # noqa: E731
                    images, r, config.loss, perceptual_fn)[0]
                adaptive = (nll_fn, nnx.split(model.decoder.conv_out), features)
            weighted, terms["gan"], terms["generator_gan_weight"] = \
                adversarial.generator_gan_term(
                    recon, disc_graphdef=components.disc_graphdef, disc_state=state.disc,
                    gan=config.gan, adaptive=adaptive, step=state.step)
        total = total + weighted
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    return total, (metrics, quantized.indices, quantized.stats, recon)


def train_step(state: TrainState, batch: dict, frozen: dict, *, components: Components,
               config: ml_collections.ConfigDict, phase: adversarial.Phase, num_shards: int = 1):
    """One generator update, then one discriminator update on the same reconstructions.

    `frozen` holds the parameters of the frozen networks (LPIPS, teachers); it is read, never
    trained. `phase` (static) says whether this step trains D and whether the generator sees
    the GAN. `num_shards` (static) is the number of devices the batch is split over: the
    InfoNCE negatives of "shard" mode.
    """
    images = images_to_float(batch["image"])
    rng = jax.random.fold_in(state.rng, state.step)
    # Outside the differentiated function: the teachers get no backward pass at all.
    teacher_cls = teacher_features(images, frozen, components=components, config=config)
    grad_fn = jax.value_and_grad(_generator_loss, has_aux=True)
    (loss, (loss_metrics, indices, stats, recon)), grads = grad_fn(
        state.params, state, images, frozen, teacher_cls, rng, components=components,
        config=config, gan_on=phase.generator, num_shards=num_shards)
    updates, new_opt_state = components.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_params)

    new_disc, disc_metrics = state.disc, {}
    if state.disc is not None:
        disc_metrics = {name: jnp.zeros((), jnp.float32) for name in adversarial.DISC_METRICS}
        if phase.discriminator:
            new_disc, disc_metrics = adversarial.discriminator_update(
                state.disc, images, recon, disc_graphdef=components.disc_graphdef,
                disc_tx=components.disc_tx, gan=config.gan, step=state.step)
            finite &= jnp.isfinite(disc_metrics["disc/loss"]) & _all_finite(
                (new_disc.params, new_disc.batch_stats))
        disc_metrics["disc/active"] = jnp.int32(phase.discriminator)

    ema = state.ema_params
    if ema is not None:
        decay = config.optimizer.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, new_params)
    # A non-finite generator or discriminator update skips both (see the module docstring).
    params, opt_state, ema, disc = _select(
        finite, (new_params, new_opt_state, ema, new_disc),
        (state.params, state.opt_state, state.ema_params, state.disc))
    last_seen, health = codebook_health(indices, stats, state.code_last_seen, state.step,
                                        config.train.usage_window_steps)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema,
        disc=disc,
        code_last_seen=last_seen,
        nonfinite_streak=(state.nonfinite_streak + 1) * skipped,
        nonfinite_total=state.nonfinite_total + skipped,
    )
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(state.params),
               "learning_rate": components.learning_rate(state.step), "skipped": skipped,
               "nonfinite_streak": new_state.nonfinite_streak,
               "nonfinite_total": new_state.nonfinite_total,
               **loss_metrics, **disc_metrics, **health}
    return new_state, metrics


class PhasedTrainStep:
    """The train step compiled per adversarial phase: `at(step)` is the program for the update
    after `step` updates. Each phase's program is jitted with explicit shardings, donates the old
    state (not the frozen params) and is traced under the run's mesh, so layers that look the
    mesh up by axis name (the sharded codebook search) find it. `compile_phases` compiles every
    phase a run will go through ahead of time; a phase not compiled ahead compiles when needed."""

    def __init__(self, config, components, mesh, state_shardings, frozen_shardings):
        self.config = config
        self.mesh = mesh
        self.num_shards = mesh.size  # InfoNCE's "shard" negatives: the batch is split over all
        self._jit = functools.partial(
            jax.jit, in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                   frozen_shardings),
            out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
        self._components = components
        self._programs = {}

    def phase(self, step: int) -> adversarial.Phase:
        return adversarial.phase(step, self.config.gan)

    def phase_starts(self, first: int, end: int) -> dict[adversarial.Phase, int]:
        """{phase: its first step} of the phases that steps first .. end - 1 go through."""
        gan = self.config.gan
        # A phase can only change where the discriminator or the generator's GAN term starts.
        boundaries = (gan.start - gan.disc_warmup_steps - 1, gan.start - 1)
        starts = {}
        for step in sorted({first, *(b for b in boundaries if first < b < end)}):
            starts.setdefault(self.phase(step), step)
        return starts

    def at(self, step: int):
        phase = self.phase(step)
        if phase not in self._programs:
            self._programs[phase] = sharding.under_mesh(self._jitted(phase), self.mesh)
        return self._programs[phase]

    def compile_ahead(self, step: int, *args):
        """Compiles the program of `step` for `args` (arrays or ShapeDtypeStructs) now, and
        keeps it; returns it."""
        with jax.set_mesh(self.mesh):
            compiled = self._jitted(self.phase(step)).lower(*args).compile()
        self._programs[self.phase(step)] = compiled
        return compiled

    def _jitted(self, phase: adversarial.Phase):
        return self._jit(functools.partial(train_step, components=self._components,
                                           config=self.config, phase=phase,
                                           num_shards=self.num_shards))
