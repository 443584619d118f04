"""Learning-rate schedules of `config.optimizer` and `config.gan.optimizer`, as optax schedules.

`schedule` picks one; all start with an optional linear warm-up from warmup_init_ratio x lr to lr
over warmup_steps (warmup_init_ratio 0, the default, is the plain ramp from 0):

* "constant": the official FQGAN recipe (spec fqgan.md §4.3), lr after the warm-up.
* "warmup_cosine": optax's cosine decay to min_lr_ratio x lr at num_steps.
* "annealing": FVQ's learning annealing (spec large_codebooks.md §B.5), which bounds the
  one-step-behind lag of the codebook (§B.6): the full rate for the first `annealing_plateau` of
  the post-warm-up steps, then a linear ("linear") or cosine ("cos") decay to min_lr_ratio x lr
  at the final step. FVQ: 4-epoch warm-up from 0.005, plateau 0.3, floor 0.01, applied to the
  generator and the discriminator alike.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The schedule `opt.schedule` names for a run of `num_steps` updates (see above)."""
    if opt.schedule == "annealing":
        return annealing_schedule(opt, num_steps)
    init_value = opt.warmup_init_ratio * opt.learning_rate
    if opt.schedule == "constant":
        constant = optax.constant_schedule(opt.learning_rate)
        if opt.warmup_steps == 0:  # optax warns about a 0-step ramp
            return constant
        return optax.join_schedules(
            [optax.linear_schedule(init_value, opt.learning_rate, opt.warmup_steps), constant],
            [opt.warmup_steps])
    if opt.warmup_steps == 0:  # optax's own warm-up-cosine, without its 0-step ramp
        return optax.cosine_decay_schedule(
            opt.learning_rate, max(num_steps, 1),
            alpha=opt.learning_rate * opt.min_lr_ratio / opt.learning_rate
            if opt.learning_rate else 0.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=init_value, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=max(num_steps, opt.warmup_steps + 1),
        end_value=opt.learning_rate * opt.min_lr_ratio)


def _check_annealing(opt: ml_collections.ConfigDict) -> None:
    if not 0 <= opt.annealing_plateau < 1:
        raise ValueError(f"annealing_plateau={opt.annealing_plateau} must be in [0, 1): the "
                         "fraction of post-warm-up steps at the full rate.")
    for key in ("warmup_init_ratio", "min_lr_ratio"):
        if not 0 <= opt[key] <= 1:
            raise ValueError(f"{key}={opt[key]} must be in [0, 1] (a fraction of "
                             "learning_rate).")
    if opt.annealing_shape not in ("linear", "cos"):
        raise ValueError(f"annealing_shape={opt.annealing_shape!r} must be 'linear' or 'cos'.")


def annealing_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """FVQ's `combined_lr_lambda` (spec §B.5) times learning_rate, its constants generalized:

      step < W:  r0 + (1 - r0) step / W                          (r0 = warmup_init_ratio)
      else, s = (step - W) / (num_steps - 1 - W):
        s < T:   1                                                (T = annealing_plateau)
        else:    m + (1 - m) (1 - s) / (1 - T)   ("linear")       (m = min_lr_ratio)
                 m + (1 - m) (1 + cos(pi (s - T) / (1 - T))) / 2   ("cos")

    The count is optax's (0 for the first update), as the official LambdaLR's step, so the
    final update, num_steps - 1, runs at exactly m x lr; later counts stay there.
    """
    _check_annealing(opt)
    peak, init, floor = opt.learning_rate, opt.warmup_init_ratio, opt.min_lr_ratio
    warmup, plateau, cosine = opt.warmup_steps, opt.annealing_plateau, opt.annealing_shape == "cos"
    decay_span = max(num_steps - 1 - warmup, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        ramp = init + (1 - init) * step / max(warmup, 1)
        done = (step - warmup) / decay_span  # s
        decayed = jnp.clip((done - plateau) / (1 - plateau), 0.0, 1.0)  # 1 - (1 - s) / (1 - T)
        shape = 0.5 * (1 + jnp.cos(jnp.pi * decayed)) if cosine else 1 - decayed
        multiplier = jnp.where(step < warmup, ramp,
                               jnp.where(done < plateau, 1.0, floor + (1 - floor) * shape))
        return peak * multiplier

    return schedule
