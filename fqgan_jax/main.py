r"""Entry point: `python -m fqgan_jax.main --config=configs/dual.py --workdir=DIR`.

  --mode=train   trains (resuming from DIR if it holds a checkpoint), evaluating along the way
  --mode=eval    evaluates the latest checkpoint in DIR on the eval split
  --distributed  multi-host: every host runs the same command (launch/ has the scripts)
  --config.x=y   overrides any config key (see fqgan_jax/config_lib.py)
  --log=all      shows every library's INFO lines, not only the run's own (fqgan_jax/run_log.py)
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fqgan_jax import run_log

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evals.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU). Without the "
    "three flags below JAX finds the cluster itself (TPU pod metadata, SLURM, Open MPI).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for --distributed on a cluster JAX "
    "does not detect (env JAX_COORDINATOR_ADDRESS also works).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's rank, 0-based.")
_LOG = flags.DEFINE_enum(
    "log", run_log.RUN, list(run_log.CHOICES), "Which INFO lines the log shows: 'run' (the "
    "run's own: fqgan_jax's, clu's metrics, progress and parameter tables) or 'all' (every "
    "library's, as does -v 1). Warnings and errors always show. See fqgan_jax/run_log.py.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """Checks `--config.*` keys first, so a typo fails with close matches, not a traceback."""
    from fqgan_jax import config_lib  # noqa: PLC0415 (keeps `--help` fast)
    return config_lib.parse_flags(argv)


def main(argv):
    del argv
    run_log.configure(_LOG.value)
    # TensorFlow (imported by clu's writers and tfds) must never take the accelerators.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow only reads files here (tfds, TensorBoard); its oneDNN notices are noise.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import jax  # noqa: PLC0415
    if _DISTRIBUTED.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value,
                                   process_id=_PROCESS_ID.value)
    import tensorflow as tf  # noqa: PLC0415
    tf.config.set_visible_devices([], "GPU")
    from fqgan_jax import checkpointing, config_lib, data
    from fqgan_jax.eval import evaluate, fid
    from fqgan_jax.frozen import weights
    from fqgan_jax.training import loop
    logging.info("JAX process %d/%d, %d devices: %s", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices())
    user_errors = (config_lib.ConfigError, data.DataError, checkpointing.CheckpointError,
                   weights.PretrainedError, fid.FIDError, loop.NonFiniteError)
    try:
        if _MODE.value == "train":
            loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        else:
            evaluate.evaluate_workdir(_CONFIG.value, _WORKDIR.value)
    except user_errors as error:
        logging.error("%s", error)
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
