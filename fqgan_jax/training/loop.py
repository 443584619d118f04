"""The training loop: setup, restore-or-init, and the loop with its periodic side effects.

All side effects (I/O, logging, checkpoints, evals) live here; the step itself is pure
(`train_step.py`). Restore priority: the latest checkpoint in `workdir/checkpoints`, else a fresh
state from `config.seed`. A resumed run continues the same data order, RNG and counters, so its
results equal an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions

from fqgan_jax import architecture, checkpointing, data, sharding
from fqgan_jax.atomic_file import atomic_write
from fqgan_jax.eval import evaluate, image_grid, inception_metrics
from fqgan_jax.training import init_from
from fqgan_jax.training.build import Run, build_run
from fqgan_jax.training.gan_health import GanHealth


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclasses.dataclass
class Loop:
    """The training run and what the loop writes with, built once (only `gan_health` keeps a
    little history, for its warnings)."""
    run: Run
    workdir: str
    checkpointer: checkpointing.Checkpointer
    writer: object
    eval_fn: object  # jitted evaluate.eval_step
    analysis_fn: object  # jitted evaluate.analysis_step (FQGAN Figures 3-4)
    inception: object  # inception_metrics.InceptionEval for rFID / IS, or None (no weights)
    init_params: object = None  # init_from.check's params of config.train.init_from, or None
    gan_health: GanHealth = dataclasses.field(default_factory=GanHealth)

    @property
    def config(self):
        return self.run.config

    @property
    def mesh(self):
        return self.run.mesh


def setup(config, workdir: str) -> Loop:
    """Validates config, weight files, data and workdir before anything is compiled."""
    run = build_run(config)
    config = run.config
    inception = inception_metrics.load(config, run.mesh)  # a bad file stops us before any write
    for split in ("train", "eval"):
        data.make_source(config.data, split)  # raises DataError on missing data, early
    logging.info("data: %s", data.describe(config.data))
    checkpointing.check_config_matches(workdir, config)
    # Another architecture is refused now, before anything is written or compiled.
    init_params = init_from.check(run, config.train.init_from) if config.train.init_from else None
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with atomic_write(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    # Eval runs in eval.dtype; the training graphdef serves when the dtypes agree (building the
    # model's shapes again costs seconds at full size).
    graphdef = (run.components.graphdef if config.eval.dtype == config.model.dtype
                else architecture.eval_graphdef(config))
    return Loop(run=run, workdir=workdir,
                checkpointer=checkpointing.Checkpointer(
                    os.path.join(workdir, "checkpoints"),
                    max_to_keep=config.train.keep_checkpoints),
                writer=metric_writers.create_default_writer(
                    workdir, just_logging=jax.process_index() > 0, asynchronous=True),
                eval_fn=evaluate.compile_eval_step(config, graphdef, run.mesh),
                analysis_fn=evaluate.compile_analysis_step(config, graphdef, run.mesh),
                inception=inception, init_params=init_params)


def restore_or_init(loop: Loop, data_iterator):
    """Returns (state, meta) from the latest checkpoint, or a fresh state."""
    step = loop.checkpointer.latest_step()
    if step is None:
        state = loop.run.init_state()
        if loop.config.train.init_from:  # fine-tuning: another run's weights, step 0
            state = init_from.load(loop.run, loop.config.train.init_from, state,
                                   loop.init_params)
        return state, {"num_skipped_images": 0, "num_converted_images": 0}
    return loop.checkpointer.restore(step, loop.run.state_target, data_iterator)


def train_iterator(config):
    """This process's part of every global batch; its position is host-count independent."""
    return data.make_train_iterator(
        config.data, global_batch_size=config.train.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains to `config.train.num_steps`, evaluating along the way; returns the last eval."""
    loop = setup(config, workdir)
    iterator = train_iterator(loop.config)
    state, meta = restore_or_init(loop, iterator)
    _log_parameters(loop.workdir, state)
    # Every phase the run will reach, compiled now: a later phase that does not fit fails
    # before step 1 (each one's memory is logged).
    loop.run.compile_step_phases(int(jax.device_get(state.step)))
    try:
        return _loop(loop, state, meta, iterator, loop.run.train_step)
    finally:
        loop.checkpointer.close()
        loop.writer.close()
        if hasattr(iterator, "close"):
            iterator.close()


def _loop(loop: Loop, state, meta, iterator, step_fn) -> dict:
    config = loop.config
    step = int(jax.device_get(state.step))
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.train.num_steps,
                                             writer=loop.writer,
                                             every_steps=config.train.log_every)]
    last_eval = _maybe_eval(loop, state, step, force=step == 0)
    pending_streak, grid_inputs = None, _grid_inputs(loop)
    counters = DataCounters(meta)
    profiler = StepProfiler(loop.workdir, config.train.profile_first_step,
                            config.train.profile_steps)
    while step < config.train.num_steps:
        profiler.before(step + 1)
        batch = next(iterator)
        counters.add(batch)
        inputs = sharding.to_global_batch({"image": batch["image"]},
                                          sharding.batch_sharding(loop.mesh))
        if step_fn.phase(step) != step_fn.phase(step - 1):
            logging.info("step %d: adversarial phase %s begins", step + 1, step_fn.phase(step))
        state, metrics = step_fn.at(step)(state, inputs, loop.run.frozen)
        step += 1
        profiler.after(step, state)
        if pending_streak is not None:  # read one step late so the device queue stays full
            _check_finite(int(pending_streak), config)
        pending_streak = metrics["nonfinite_streak"]  # state's copy is donated next step
        for hook in hooks:
            hook(step)
        is_last = step == config.train.num_steps
        log = step % config.train.log_every == 0 or is_last
        save = step % config.train.checkpoint_every == 0 or is_last
        totals = counters.totals() if log or save else None  # a collective: once per step
        if log:
            _log_metrics(loop, step, metrics, totals)
        if step % config.train.image_every == 0:
            _write_train_grid(loop, state, step, grid_inputs)
        if step % config.train.eval_every == 0 or is_last:
            last_eval = _maybe_eval(loop, state, step, force=True)
        if save:
            _check_finite(int(state.nonfinite_streak), config)
            loop.checkpointer.save(step, state, iterator, totals)
    profiler.after(None, state)  # a run that ends inside the window still writes its trace
    loop.checkpointer.wait()
    return last_eval


def _log_parameters(workdir: str, state) -> None:
    """One line per network with its parameter count by top-level module; the full tables
    (shapes, dtypes, statistics) go to WORKDIR/parameters.txt rather than to the log."""
    networks = {"tokenizer": state.params}
    if state.disc is not None:
        networks["discriminator"] = state.disc.params
    path = os.path.join(workdir, "parameters.txt")
    tables = []
    for name, params in networks.items():
        params = jax.device_get(params.to_pure_dict())
        tables.append(f"{name}\n{parameter_overview.get_parameter_overview(params)}\n")
        sizes = {module: sum(leaf.size for leaf in jax.tree.leaves(tree))
                 for module, tree in params.items()}
        logging.info("%s: %s parameters (%s); table in %s", name, f"{sum(sizes.values()):,}",
                     ", ".join(f"{module} {size:,}" for module, size in sizes.items()), path)
    if jax.process_index() == 0:
        with atomic_write(path, "w") as f:
            f.write("\n".join(tables))


class StepProfiler:
    """A jax.profiler trace of steps first .. first + num - 1 (1-based) into WORKDIR/profile, on
    process 0 (TensorBoard's profile tab, or xprof). num = 0: off."""

    def __init__(self, workdir: str, first: int, num: int):
        self.directory = os.path.join(workdir, "profile")
        self.first, self.last = first, first + num - 1
        self.enabled = num > 0 and jax.process_index() == 0
        self.running = False

    def before(self, step: int) -> None:
        if self.enabled and not self.running and step == self.first:
            jax.profiler.start_trace(self.directory)
            self.running = True

    def after(self, step: int | None, state) -> None:
        if self.running and (step is None or step >= self.last):
            jax.block_until_ready(state)  # the trace must hold the steps' device work
            jax.profiler.stop_trace()
            self.running = False
            logging.info("Profile of steps %d-%d written to %s", self.first, self.last,
                         self.directory)


def _check_finite(streak: int, config) -> None:
    if streak >= config.train.max_nonfinite_steps:
        raise NonFiniteError(
            f"{streak} consecutive steps had a non-finite loss, gradient or update and were "
            "skipped; stopping. The last checkpoint (before these steps) is intact. Lower "
            "config.optimizer.learning_rate, add warmup, or use model.dtype='float32'.")


def _log_metrics(loop: Loop, step: int, metrics, totals: dict) -> None:
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    scalars["data/skipped_images"] = totals["num_skipped_images"]
    scalars["data/converted_images"] = totals["num_converted_images"]
    loop.writer.write_scalars(step, scalars)
    warning = loop.gan_health.observe_logits(step, scalars)
    if warning:
        logging.warning("%s", warning)


class DataCounters:
    """Bad and converted train images over all hosts since the run began. Each host counts its
    own batches; `totals()` adds the hosts' counts (a collective: every process calls it at the
    same steps, as the loop does)."""

    KEYS = ("num_skipped_images", "num_converted_images")

    def __init__(self, meta: dict):
        self.restored = np.array([meta.get(key, 0) for key in self.KEYS], np.int64)
        self.local = np.zeros(len(self.KEYS), np.int64)

    def add(self, batch: dict) -> None:
        self.local += [np.sum(batch["num_skipped"]), np.sum(batch["num_converted"])]

    def totals(self) -> dict:
        counts = self.local
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415

            # int32 on the wire (jax without x64); the sums stay int64 here.
            gathered = multihost_utils.process_allgather(counts.astype(np.int32))
            counts = np.asarray(gathered, np.int64).sum(axis=0)
        return dict(zip(self.KEYS, (self.restored + counts).tolist()))


def _maybe_eval(loop: Loop, state, step: int, *, force: bool):
    path = os.path.join(loop.workdir, "eval", f"{step}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if not force:
        return None
    return evaluate.evaluate(loop.config, state.params_for_eval(), state.model_state,
                             eval_fn=loop.eval_fn, analysis_fn=loop.analysis_fn,
                             inception=loop.inception, mesh=loop.mesh, step=step,
                             workdir=loop.workdir, writer=loop.writer)


def _grid_inputs(loop: Loop) -> dict:
    """The fixed held-out batch whose reconstructions are written every `image_every` steps."""
    config = loop.config
    per_process = config.eval.batch_size // jax.process_count()
    batch = next(iter(data.make_eval_batches(
        config.data, batch_size=per_process, num_images=config.eval.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())))
    return sharding.to_global_batch({"image": np.array(batch["image"]), "mask": batch["mask"]},
                                    sharding.batch_sharding(loop.mesh))


def _write_train_grid(loop: Loop, state, step: int, inputs: dict) -> None:
    """Reconstructions of a fixed held-out batch, for watching progress."""
    recon = sharding.gather_to_host(loop.eval_fn(state.params, state.model_state, inputs)["recon"])
    images = sharding.gather_to_host(inputs["image"])  # every process joins; process 0 writes
    count = loop.config.eval.grid_images
    grid = image_grid.make_grid([images[:count], recon[:count]])
    warning = loop.gan_health.observe_reconstructions(step, images, recon)
    if warning:
        logging.warning("%s", warning)
    if jax.process_index() == 0:
        image_grid.save_png(grid, os.path.join(loop.workdir, "images", f"{step}.png"))
        loop.writer.write_images(step, {"train/reconstructions": grid[None]})
