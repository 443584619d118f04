"""The run's log: other libraries' INFO lines off by default, the run's own and all warnings on."""

import contextlib
import importlib.util
import logging
import os

import pytest
from absl import logging as absl_logging

import fqgan_jax
from fqgan_jax import run_log


def _package_file(package, *parts):
    """A file of an installed package, found without importing the package."""
    return os.path.join(importlib.util.find_spec(package).submodule_search_locations[0], *parts)


# Files that records come from (they need not exist: logging only reads the caller's file name).
ORBAX = _package_file("orbax", "checkpoint", "checkpoint_manager.py")
XLA_BRIDGE = _package_file("jax", "_src", "xla_bridge.py")
OPTAX = _package_file("optax", "schedules", "_schedule.py")
CLU_WRITER = _package_file("clu", "metric_writers", "logging_writer.py")
CLU_PROGRESS = _package_file("clu", "platform", "local.py")
CLU_PARAMS = _package_file("clu", "parameter_overview.py")
CLU_OTHER = _package_file("clu", "periodic_actions.py")
FQGAN = os.path.join(fqgan_jax.__path__[0], "training", "loop.py")


def log_from(path, log, message):
    """Calls `log(message)` from a line of `path`, as that file's own code would: absl's logger
    and Python's take a record's pathname from the calling frame's code object."""
    exec(compile("log(message)", path, "exec"), {"log": log, "message": message})  # noqa: S102


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def root_collecting(level=logging.INFO):
    """The root logger at `level` (absl's verbosity follows it), its only handler one that collects
    records, as absl's handler is under `app.run`; every logging setting touched is restored.

    A context manager, not a fixture: pytest adds its own capture handlers to the root logger
    around each test's call, after fixtures are set up, and configure() must not reach them."""
    root = logging.getLogger()
    absl_logger = absl_logging.get_absl_logger()
    absl_handler = absl_logging.get_absl_handler()
    saved = (root.level, list(root.handlers), absl_logger.level, list(absl_handler.filters))
    collect = _Collect()
    root.handlers = [collect]
    root.setLevel(level)
    absl_logger.setLevel(logging.NOTSET)
    try:
        yield collect.records
    finally:
        root.handlers = saved[1]
        root.setLevel(saved[0])
        absl_logger.setLevel(saved[2])
        absl_handler.filters = saved[3]


def messages(records):
    return [record.getMessage() for record in records]


def test_run_drops_third_party_info_keeps_their_warnings():
    jax_logger = logging.getLogger("jax._src.xla_bridge")  # JAX logs through its own loggers
    with root_collecting() as records:
        assert run_log.configure(run_log.RUN) is not None
        log_from(ORBAX, absl_logging.info, "CheckpointManagerOptions=CheckpointManagerOptions(...)")
        log_from(XLA_BRIDGE, jax_logger.info, "Unable to initialize backend 'tpu'")
        log_from(OPTAX, absl_logging.info, "A polynomial schedule was set with ...")
        log_from(CLU_OTHER, absl_logging.info, "clu internals")
        log_from(ORBAX, absl_logging.warning, "orbax warning")
        log_from(XLA_BRIDGE, jax_logger.warning, "jax warning")
        log_from(XLA_BRIDGE, jax_logger.error, "jax error")
    assert [r.pathname for r in records] == [ORBAX, XLA_BRIDGE, XLA_BRIDGE]
    assert messages(records) == ["orbax warning", "jax warning", "jax error"]


def test_run_keeps_the_runs_own_info_lines():
    with root_collecting() as records:
        run_log.configure(run_log.RUN)
        log_from(FQGAN, absl_logging.info, "step 100: adversarial phase begins")
        log_from(CLU_WRITER, absl_logging.info, "[25] loss=0.5")
        log_from(CLU_PROGRESS, absl_logging.info, "Setting work unit notes: 0.7 steps/s")
        log_from(CLU_PARAMS, absl_logging.info, "| Name | Shape |")
    assert messages(records) == ["step 100: adversarial phase begins", "[25] loss=0.5",
                                 "Setting work unit notes: 0.7 steps/s", "| Name | Shape |"]
    assert all(r.levelno == logging.INFO for r in records)


def test_filter_sits_on_absl_handler():
    """Under app.run absl's handler is the root's; it gets the filter even when it is not."""
    orbax_info = logging.LogRecord("absl", logging.INFO, ORBAX, 1, "orbax info", None, None)
    ours = logging.LogRecord("absl", logging.INFO, FQGAN, 1, "ours", None, None)
    handler = absl_logging.get_absl_handler()
    with root_collecting():
        run_filter = run_log.configure(run_log.RUN)
        assert run_filter in handler.filters
        assert not handler.filter(orbax_info)
        assert handler.filter(ours)
    assert run_filter not in handler.filters  # root_collecting restored it


@pytest.mark.parametrize("level, lines", [(logging.INFO, run_log.ALL),  # --log=all
                                          (logging.DEBUG, run_log.RUN)])  # -v 1
def test_all_or_debug_verbosity_shows_everything(level, lines):
    jax_logger = logging.getLogger("jax._src.xla_bridge")
    with root_collecting(level) as records:
        run_log.configure(run_log.RUN)
        assert run_log.configure(lines) is None  # and configuring again replaces the filter
        filters = logging.root.handlers[0].filters
        assert not any(isinstance(f, run_log.RunLinesOnly) for f in filters)
        log_from(ORBAX, absl_logging.info, "orbax info")
        log_from(XLA_BRIDGE, jax_logger.info, "jax info")
        log_from(FQGAN, absl_logging.info, "ours")
        log_from(ORBAX, absl_logging.warning, "orbax warning")
    assert messages(records) == ["orbax info", "jax info", "ours", "orbax warning"]


def test_unknown_choice_is_refused():
    with root_collecting(), pytest.raises(ValueError, match="lines must be one of"):
        run_log.configure("quiet")
