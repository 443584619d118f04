"""Fine-tuning: a new run whose weights start from another run's (`config.train.init_from`).

The source is a workdir (its latest checkpoint) or one step folder of it, e.g. one that
`python -m fqgan_jax.tools.convert official` wrote from a released PyTorch checkpoint. This run
takes the source's evaluated params (its EMA when it kept one) and, when both runs have a
discriminator of the same shape, its discriminator's params and BatchNorm statistics. Optimizer
states, the step and the data position start fresh. Everything except the feature-prediction
heads must match in name and shape; a mismatch is refused with the differing shapes, before
anything compiles. Heads only this run has start from their init (representation learning
added in fine-tuning); heads only the source has are left out.
"""

from __future__ import annotations

import jax
from absl import logging
from flax import nnx

from fqgan_jax import architecture, checkpointing, config_lib

_OPTIONAL = "feat_pred_heads"  # the only params either side may lack


def check(run, path: str) -> nnx.State:
    """The source params this run takes (abstract); refuses another architecture, naming the
    differing shapes. Reads only config.json files: nothing is restored or compiled."""
    workdir, _ = checkpointing.locate_workdir(path)
    ours, _ = architecture.abstract_model_variables(run.config)
    theirs, _ = architecture.abstract_model_variables(checkpointing.read_config(workdir))
    return _shared_params(ours, theirs, path)


def load(run, path: str, state, shared: nnx.State):
    """`state` (a fresh TrainState of `run`) with the weights of the run at `path`; `shared` is
    what `check` returned for it."""
    workdir, step = checkpointing.locate_workdir(path)
    source_config = checkpointing.read_config(workdir)
    params, _, step = checkpointing.restore_model(workdir, source_config, run.mesh, step,
                                                  only=shared)
    merged = {**dict(nnx.to_flat_state(state.params)), **dict(nnx.to_flat_state(params))}
    params = nnx.from_flat_state(list(merged.items()))
    state = state.replace(params=params,
                          ema_params=params if state.ema_params is not None else None)
    if state.disc is not None:
        state = state.replace(disc=_discriminator(run, workdir, step, source_config, state.disc))
    logging.info("Initialized from %s step %d (fresh optimizer state, step 0).", workdir, step)
    return jax.device_put(state, run.state_shardings)


def _shared_params(ours: nnx.State, theirs: nnx.State, path: str) -> nnx.State:
    """The source params this run takes; refuses any other difference, naming the shapes."""
    ours, theirs = dict(nnx.to_flat_state(ours)), dict(nnx.to_flat_state(theirs))
    name = lambda key: "/".join(map(str, key))  # noqa: E731
    shape = lambda leaf: tuple(leaf.get_value().shape)  # noqa: E731
    problems = [f"{name(k)}: this run {shape(ours[k])}, {path} {shape(theirs[k])}"
                for k in ours.keys() & theirs.keys() if shape(ours[k]) != shape(theirs[k])]
    problems += [f"{name(k)}: only in this run" for k in ours.keys() - theirs.keys()
                 if k[0] != _OPTIONAL]
    problems += [f"{name(k)}: only in {path}" for k in theirs.keys() - ours.keys()
                 if k[0] != _OPTIONAL]
    if problems:
        shown = "\n  ".join(sorted(problems)[:10])
        raise checkpointing.CheckpointError(
            f"config.train.init_from={path} holds another architecture ({len(problems)} "
            f"differences):\n  {shown}\nUse a config with the source's model settings (its "
            "config.json), or train from scratch.")
    fresh = sorted({k[1] for k in ours.keys() - theirs.keys()})
    if fresh:
        logging.info("init_from: feature-prediction heads of %s start from their init.", fresh)
    return nnx.from_flat_state([(k, theirs[k]) for k in ours.keys() & theirs.keys()])


def _discriminator(run, workdir: str, step: int, source_config, disc):
    """This run's discriminator state with the source's weights, when it has a matching one."""
    same = config_lib.has_discriminator(source_config) and all(
        source_config.gan[key] == run.config.gan[key] for key in ("ndf", "n_layers"))
    if not same:
        logging.info("init_from: %s has no discriminator of this shape; D starts from its "
                     "init.", workdir)
        return disc
    checkpointer = checkpointing.Checkpointer(f"{workdir}/checkpoints", async_save=False)
    try:
        target = {"disc": {"params": disc.params, "batch_stats": disc.batch_stats}}
        target = checkpointing.with_shardings(target, jax.tree.map(
            lambda leaf: leaf.sharding, target))
        restored = checkpointer.restore_part(step, target)["disc"]
    finally:
        checkpointer.close()
    return disc.replace(params=restored["params"], batch_stats=restored["batch_stats"])
