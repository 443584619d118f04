"""The pure train step, `train_step(state, batch) -> (state, metrics)`, and its compilation.

Design notes:
- Non-finite guard: a non-finite loss, gradient or updated parameter skips the whole update
  (params, optimizer, EMA stay as they were); the step is counted. The outer loop stops the run
  after `max_nonfinite_steps` consecutive skips, so no bad state is ever checkpointed.
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

from fqgan_jax import losses, quantize
from fqgan_jax.train_state import TrainState, learning_rate_schedule, merge_model


def images_to_float(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1]; float inputs are taken as already normalized."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def _select(keep_new: jax.Array, new, old):
    # lax.cond rather than a per-leaf jnp.where: the where-form made XLA compile ~5x slower.
    return jax.lax.cond(keep_new, lambda: new, lambda: old)


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def codebook_health(indices, last_seen, step, codebook_size, window):
    """Batch perplexity and top-code share, and the running usage estimate."""
    counts = quantize.code_histogram(indices, codebook_size)
    flat = indices.reshape(-1, indices.shape[-1])
    seen = jax.vmap(lambda ls, idx: ls.at[idx].set(step))(last_seen, flat.T)
    stats = quantize.usage_stats(counts)
    metrics = {}
    for i in range(counts.shape[0]):
        metrics[f"codebook/{i}/perplexity"] = stats["perplexity"][i]
        metrics[f"codebook/{i}/top_code_share"] = stats["top_code_share"][i]
        metrics[f"codebook/{i}/running_usage"] = jnp.mean(
            (step - seen[i] < window).astype(jnp.float32))
    return seen, metrics


def train_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
    images = images_to_float(batch["image"])
    with_entropy = config.loss.entropy_weight > 0

    # Dropout (off in the official recipe) draws from the state's key, folded with the step.
    rngs = nnx.Rngs(dropout=jax.random.fold_in(state.rng, state.step)) \
        if config.model.dropout > 0 else None

    def loss_fn(params):
        model = merge_model(graphdef, params, state.model_state)
        recon, quantized = model(images, with_entropy=with_entropy, rngs=rngs)
        total, terms = losses.generator_loss(images, recon, quantized, config.loss)
        return total, (terms, quantized.indices)

    (loss, (terms, indices)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_params)

    ema = state.ema_params
    if ema is not None:
        decay = config.optimizer.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, new_params)
    params, opt_state, ema = _select(finite, (new_params, new_opt_state, ema),
                                     (state.params, state.opt_state, state.ema_params))
    last_seen, health = codebook_health(indices, state.code_last_seen, state.step,
                                        config.model.codebook_size,
                                        config.train.usage_window_steps)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        ema_params=ema,
        code_last_seen=last_seen,
        nonfinite_streak=(state.nonfinite_streak + 1) * skipped,
        nonfinite_total=state.nonfinite_total + skipped,
    )
    schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(state.params),
               "learning_rate": schedule(state.step), "skipped": skipped,
               "nonfinite_streak": new_state.nonfinite_streak,
               "nonfinite_total": new_state.nonfinite_total,
               **{f"loss/{k}": v for k, v in terms.items()}, **health}
    return new_state, metrics


def compile_train_step(config, graphdef, tx, state_shardings, batch_sharding, replicated):
    """jit with explicit shardings; the old state is donated."""
    step_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, config=config)
    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
