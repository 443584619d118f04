"""The train state pytree, the optimizer, and sharded state creation.

The model is split at the jit boundary into a static `graphdef` and pytrees of variables (spec
jax_stack.md §2.1), so every step is a pure function of `TrainState`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from fqgan_jax import architecture, checkpointing, config_lib, sharding
from fqgan_jax.frozen import lpips, teachers
from fqgan_jax.quantizers import registry
from fqgan_jax.training.schedules import learning_rate_schedule

# Codes never assigned carry this "last seen" step, far outside any usage window.
NEVER_SEEN = -(2**30)


@flax.struct.dataclass
class DiscriminatorState:
    params: nnx.State
    batch_stats: nnx.State  # BatchNorm running statistics (tracked; the official D never uses them)
    opt_state: Any
    lecam_ema: jax.Array  # float32 [2]: EMAs of the mean real and fake logits (LeCam)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates attempted
    params: nnx.State  # trainable parameters, always float32
    model_state: nnx.State  # non-trainable model variables (empty for the tokenizer)
    opt_state: Any
    rng: jax.Array  # typed PRNG key; each step folds in its step number
    ema_params: nnx.State | None  # None when config.optimizer.ema_decay == 0
    code_last_seen: jax.Array  # int32 [k, K]: step at which each code was last assigned
    nonfinite_streak: jax.Array  # int32: consecutive skipped updates
    nonfinite_total: jax.Array  # int32: all skipped updates
    disc: DiscriminatorState | None  # None without a discriminator (config_lib.has_discriminator)

    def params_for_eval(self) -> nnx.State:
        """The EMA params when the run keeps them, else the params (what eval and export use)."""
        return self.ema_params if self.ema_params is not None else self.params


@dataclasses.dataclass(frozen=True)
class Components:
    """The static halves of training, built once per run: model structures and optimizers."""
    graphdef: nnx.GraphDef  # the tokenizer
    tx: optax.GradientTransformation
    learning_rate: optax.Schedule  # the tokenizer's, as `tx` applies it (logged by the step)
    disc_graphdef: nnx.GraphDef | None
    disc_tx: optax.GradientTransformation | None
    lpips_graphdef: nnx.GraphDef | None  # None when config.loss.perceptual_weight == 0
    teacher_graphdefs: dict[str, nnx.GraphDef]  # per taught branch; see config_lib.taught_branches


def make_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
    """Adam(0.9, 0.95) with global-norm clipping (spec fqgan.md §4.3), for `config.optimizer`
    (the tokenizer) or `config.gan.optimizer` (the discriminator)."""
    if opt.weight_decay > 0:
        adam = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay)
    else:
        adam = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adam)


def make_components(config: ml_collections.ConfigDict) -> Components:
    with_gan = config_lib.has_discriminator(config)
    schedule = learning_rate_schedule(config.optimizer, config.train.num_steps)
    disc_schedule = learning_rate_schedule(config.gan.optimizer, config.train.num_steps)
    return Components(
        graphdef=architecture.model_graphdef(config),
        tx=make_optimizer(config.optimizer, schedule),
        learning_rate=schedule,
        disc_graphdef=architecture.graphdef(
            lambda r: architecture.create_discriminator(config, r)) if with_gan else None,
        disc_tx=make_optimizer(config.gan.optimizer, disc_schedule) if with_gan else None,
        lpips_graphdef=lpips.abstract_params(config.model.dtype)[0]
        if config.loss.perceptual_weight > 0 else None,
        teacher_graphdefs={branch: teachers.abstract(name, config.model.dtype)[0]
                           for branch, name in config_lib.taught_branches(config).items()})


def _initial_disc_state(config, disc_tx, rng) -> DiscriminatorState:
    _, params, batch_stats = nnx.split(
        architecture.create_discriminator(config, nnx.Rngs(params=rng)),
                                       nnx.Param, nnx.BatchStat)
    return DiscriminatorState(params=params, batch_stats=batch_stats,
                              opt_state=disc_tx.init(params),
                              lecam_ema=jnp.zeros((2,), jnp.float32))


def initial_state(config: ml_collections.ConfigDict, components: Components,
                  rng: jax.Array) -> TrainState:
    """A fresh state; meant to run under jit with out_shardings, so it is built sharded."""
    init_rng, state_rng, disc_rng = jax.random.split(rng, 3)
    model = architecture.create_model(config, nnx.Rngs(params=init_rng))
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    num_codebooks = len(config.model.branches)
    tx = components.tx
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        rng=state_rng,
        ema_params=params if config.optimizer.ema_decay > 0 else None,
        code_last_seen=jnp.full((num_codebooks, config.model.codebook_size), NEVER_SEEN,
                                jnp.int32),
        nonfinite_streak=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
        disc=_initial_disc_state(config, components.disc_tx, disc_rng)
        if components.disc_tx is not None else None,
    )


def with_quantizer_files(state: TrainState, config) -> TrainState:
    """`state` with the quantizer variables that `registry.initial_values` reads from files
    (VQGAN-LC's codebook) in place of their random init, in params, EMA params or model state,
    wherever the variable lives, each placed with its leaf's sharding."""
    values = registry.initial_values(config.model)
    if not values:
        return state
    replaced = set()

    def fill(tree):
        if tree is None:
            return None
        flat = dict(nnx.to_flat_state(tree))
        for path, value in values.items():
            key = ("quantize", *path)
            if key in flat:
                leaf = flat[key]
                if tuple(value.shape) != tuple(leaf.value.shape):
                    raise ValueError(f"quantize/{'/'.join(map(str, path))}: the file holds "
                                     f"{tuple(value.shape)}, the model needs "
                                     f"{tuple(leaf.value.shape)}.")
                flat[key] = leaf.replace(jax.device_put(
                    jnp.asarray(value, leaf.value.dtype), leaf.value.sharding))
                replaced.add(path)
        return nnx.from_flat_state(flat)

    state = state.replace(params=fill(state.params), ema_params=fill(state.ema_params),
                          model_state=fill(state.model_state))
    missing = set(values) - replaced
    if missing:
        raise ValueError(f"Quantizer file values for {sorted(missing)} match no variable of "
                         "the model.")
    return state


def abstract_state(config, components: Components) -> TrainState:
    """Shapes and dtypes of the state, without computing it."""
    return jax.eval_shape(lambda: initial_state(config, components, jax.random.key(0)))


def create_train_state(config, components: Components, shardings) -> TrainState:
    """Initializes the state directly with its target shardings (no full copy on device 0)."""
    init = jax.jit(lambda: initial_state(config, components, jax.random.key(config.seed)),
                   out_shardings=shardings)
    return init()


def state_target(config, components: Components, mesh) -> TrainState:
    """The abstract state with its shardings on `mesh` (config.mesh's rules): what a fresh state
    is created as and what a checkpoint restores into, on any mesh."""
    abstract = abstract_state(config, components)
    return checkpointing.with_shardings(
        abstract, sharding.state_shardings(abstract, mesh, config.mesh))


def restore_state(workdir: str, config, mesh, step: int | None = None) -> TrainState:
    """The whole TrainState at checkpoint `step` (default: the latest) of `workdir`, on `mesh`,
    without the data position (the loop restores that with its iterator)."""
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              async_save=False)
    try:
        step = checkpointer.existing_step(step)
        state, _ = checkpointer.restore(step, state_target(config, make_components(config), mesh))
    finally:
        checkpointer.close()
    return state
