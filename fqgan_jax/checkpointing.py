"""Orbax checkpoints of the train state and small JSON metadata, with the data position.

One step directory holds two items: `state` (the TrainState pytree, written by all hosts
together) and `meta` (counters, and under "data" the train iterator's global position, which is
the same on every host and valid on any host count; see data/pipeline.py). Saves are
asynchronous; orbax writes to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact. Restores always pass an abstract target
with shardings, so a checkpoint loads onto whatever mesh and host count the run has (spec
jax_stack.md §2.4).
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from absl import logging

from fqgan_jax import architecture, config_lib, sharding


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into this run."""


def with_shardings(abstract_tree, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager`, so the V1 migration stays in this file."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def existing_step(self, step: int | None = None) -> int:
        """`step`, or the latest one when None; a CheckpointError when there is none."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(
                f"No checkpoint in {self.directory}. Train first (--mode=train) or pass the "
                "workdir of a finished run.")
        return step

    def save(self, step: int, state, data_iterator, meta: dict) -> None:
        if data_iterator is not None:
            meta = {**meta, "data": data_iterator.get_state()}
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, target, data_iterator=None):
        """Restores into `target` (ShapeDtypeStructs with shardings) and moves `data_iterator`
        to the saved position; returns (state, meta)."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
            raise CheckpointError(
                f"Checkpoint {self.directory}/{step} does not match this run's config: {error}. "
                "Resume with the config the run was trained with (saved as config.json in the "
                "workdir), or start from a fresh --workdir.") from error
        meta = dict(restored.meta)
        if data_iterator is not None:
            if "data" not in meta:
                raise CheckpointError(
                    f"Checkpoint {self.directory}/{step} holds no data position (it predates "
                    "elastic data positions, or was saved without an iterator), so training "
                    "cannot continue its data order. Evaluate it with --mode=eval, or train in "
                    "a fresh --workdir.")
            data_iterator.set_state(meta["data"])
        logging.info("Restored checkpoint %s/%d", self.directory, step)
        return restored.state, meta

    def restore_part(self, step: int, target: dict) -> dict:
        """Only the top-level fields of the saved state named in `target` (a dict of abstract
        trees with shardings), e.g. the params without the optimizer moments."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
            raise CheckpointError(
                f"Checkpoint {self.directory}/{step} does not match this run's config: {error}. "
                "Use the config the run was trained with (its config.json).") from error
        logging.info("Restored %s of checkpoint %s/%d", ", ".join(target), self.directory, step)
        return dict(restored.state)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def locate_workdir(path: str) -> tuple[str, int | None]:
    """(workdir, step or None for the latest) of a workdir, its checkpoints/ folder or one step
    folder inside it."""
    path = os.path.abspath(path)
    for candidate, step in ((path, None), (os.path.dirname(path), None),
                            (os.path.dirname(os.path.dirname(path)), os.path.basename(path))):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate, int(step) if step is not None and step.isdigit() else None
    raise CheckpointError(
        f"{path} is not a fqgan_jax workdir: no config.json found there or in its parents. Pass "
        "the --workdir of a training run, its checkpoints/ folder, or a step folder inside it.")


def read_config(workdir: str):
    """The config a workdir's run was trained with (its config.json), on the current schema."""
    with open(os.path.join(workdir, "config.json")) as f:
        return config_lib.config_from_dict(json.load(f))


def check_config_matches(workdir: str, config) -> None:
    """Refuses to resume a workdir whose saved model/loss config differs from this one."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    current = _architecture(json.loads(config.to_json()))
    saved = _architecture(saved)
    diffs = [f"{key}: saved {saved.get(key)!r}, now {value!r}"
             for key, value in current.items() if saved.get(key) != value]
    if diffs:
        raise CheckpointError(
            f"--workdir={workdir} holds a run with a different model:\n  " + "\n  ".join(diffs)
            + "\nUse a fresh --workdir, or pass the original config (see its config.json).")


# Model keys that change how the step computes, not what the checkpoint holds.
_HOW_NOT_WHAT = ("dtype", "shard_codebook", "remat", "search_memory_mb")


def _architecture(config: dict) -> dict:
    """What a checkpoint's shapes depend on: the model with its teacher heads, and the
    discriminator if any."""
    arch = {f"config.model.{key}": value for key, value in config.get("model", {}).items()
            if key not in _HOW_NOT_WHAT}
    full = config_lib.config_from_dict(config)
    arch["feature-prediction heads (config.teachers, loss.semantic_weight > 0)"] = \
        config_lib.taught_branches(full)
    gan = config.get("gan", {})
    arch["discriminator (config.gan.weight > 0)"] = config_lib.has_discriminator(full)
    if arch["discriminator (config.gan.weight > 0)"]:
        arch.update({f"config.gan.{key}": gan.get(key) for key in ("ndf", "n_layers")})
    return arch


def restore_model(workdir: str, config, mesh, step: int | None = None, *, only=None):
    """(params, model_state, step) of the tokenizer at checkpoint `step` (default: the latest) of
    `workdir`, laid out on `mesh`: the EMA params when the run kept them, else the params. The
    optimizer moments and the discriminator stay on disk. `only` (abstract params, a subset of
    the model's) restores just those."""
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = checkpointer.existing_step(step)
        params, model_state = architecture.abstract_model_variables(config)
        params = params if only is None else only
        field = "ema_params" if config.optimizer.ema_decay > 0 else "params"
        target = {field: params}
        if jax.tree.leaves(model_state):  # the tokenizer has none; a model with BatchNorm would
            target["model_state"] = model_state
        target = with_shardings(target, sharding.state_shardings(target, mesh, config.mesh))
        restored = checkpointer.restore_part(step, target)
    finally:
        checkpointer.close()
    return restored[field], restored.get("model_state", model_state), step
