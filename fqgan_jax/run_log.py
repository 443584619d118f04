"""What the run's log shows: the run's own lines, and other libraries' only when they matter.

`python -m fqgan_jax.main` calls `configure(FLAGS.log)` first thing. With `--log=run` (the
default) the log keeps:

* every record at WARNING or above, whatever library it comes from;
* INFO records logged from the fqgan_jax package: config and data summary, missing-weights
  notes, memory per train step, adversarial phases, evals, checkpoint restores;
* INFO records of the three clu modules that report for the run:
  `clu/metric_writers/logging_writer.py` (the scalars: losses, codebook statistics,
  steps_per_sec; and the "Got images" notes), `clu/platform/local.py` (the progress line:
  steps/s, percent done, ETA) and `clu/parameter_overview.py` (the parameter tables).

It drops the INFO and DEBUG records of every other library: orbax's checkpoint internals (the
`CheckpointManagerOptions` dump, handler registries, a few dozen thread, rename and throughput
lines per save), JAX's backend probe ("Unable to initialize backend 'tpu'"), optax's schedule
notes, matplotlib's font cache, grain's and TensorFlow Datasets' chatter.

`--log=all`, or absl's `-v 1` (debug), shows every library's lines, as without this module.

How: absl's `logging.info` of every library goes through the one `absl` Python logger (its
`findCaller` sets each record's `pathname` to the calling file), while JAX, matplotlib and
others log through loggers of their own; all of them propagate to the root logger's handlers,
where `app.run` put absl's handler. So the filter sits on the root logger's handlers (a filter
on a logger misses records propagated from its children) and sorts records by the file they
come from. A library's logger level could not do it: orbax logs through the shared `absl` logger.

Not covered: text that native code writes to stderr itself (TensorFlow's oneDNN notice when it
is imported), tqdm's eval progress bars (the run's own), and handlers that a library attaches to
its own logger when asked to (JAX_LOGGING_LEVEL): those print what was asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import os

from absl import logging as absl_logging

RUN = "run"
ALL = "all"
CHOICES = (RUN, ALL)

# clu modules, relative to the clu package, whose INFO records are the run's report.
CLU_MODULES = ("metric_writers/logging_writer.py", "platform/local.py", "parameter_overview.py")


class RunLinesOnly(logging.Filter):
    """Passes records at WARNING or above, and INFO/DEBUG records logged from the given files or
    from files under the given folders."""

    def __init__(self, folders, files):
        super().__init__()
        self._folders = tuple(os.path.join(os.path.realpath(f), "") for f in folders)
        self._files = frozenset(os.path.realpath(f) for f in files)
        self._keep = {}  # record.pathname -> bool; a handful of files, looked up at every record

    def is_run_file(self, pathname: str) -> bool:
        keep = self._keep.get(pathname)
        if keep is None:
            path = os.path.realpath(pathname)
            keep = path in self._files or path.startswith(self._folders)
            self._keep[pathname] = keep
        return keep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self.is_run_file(record.pathname)


def run_sources() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(folders, files) whose INFO records are the run's own: fqgan_jax, and CLU_MODULES."""
    import fqgan_jax  # noqa: PLC0415
    # find_spec locates clu without importing its writers (they import TensorFlow).
    clu = importlib.util.find_spec("clu")
    clu_folders = list(clu.submodule_search_locations or []) if clu else []
    files = tuple(os.path.join(folder, module) for folder in clu_folders for module in CLU_MODULES)
    return tuple(fqgan_jax.__path__), files


def _handlers() -> list[logging.Handler]:
    """The root logger's handlers and absl's (one and the same under `app.run`)."""
    handlers = list(logging.root.handlers)
    absl_handler = absl_logging.get_absl_handler()
    if absl_handler not in handlers:
        handlers.append(absl_handler)
    return handlers


def configure(lines: str = RUN) -> RunLinesOnly | None:
    """Makes the log show `lines`: "run" (see the module docstring) or "all".

    Call it after absl parsed the flags: `-v 1` (debug) also means "all". Calling it again
    replaces the earlier choice. Returns the installed filter, None when every line shows.
    """
    if lines not in CHOICES:
        raise ValueError(f"lines must be one of {CHOICES}, not {lines!r}")
    handlers = _handlers()
    for handler in handlers:
        for old in [f for f in handler.filters if isinstance(f, RunLinesOnly)]:
            handler.removeFilter(old)
    # -v 1 (absl sets the root logger's level, which absl's logger inherits) or set_verbosity.
    if lines == ALL or absl_logging.get_absl_logger().getEffectiveLevel() <= logging.DEBUG:
        return None
    run_filter = RunLinesOnly(*run_sources())
    for handler in handlers:
        handler.addFilter(run_filter)
    return run_filter
