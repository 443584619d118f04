"""Training runs for the study scripts (gan_start.py, ablation.py): the real trainer, each run
in its own process and workdir, with its evals read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(config: str, overrides: list[str], workdir: str) -> tuple[dict[int, dict], float]:
    """Runs `python -m fqgan_jax.main --config=CONFIG OVERRIDES` to the end in `workdir`;
    returns ({step: eval JSON}, minutes). A finished workdir is only read again. The run's log
    is appended to `workdir/train.log`."""
    command = [sys.executable, "-m", "fqgan_jax.main", f"--config={config}",
               f"--workdir={workdir}", *overrides]
    # Runs of one study share their unchanged programs (eval, the phases before the GAN)
    # through JAX's persistent compilation cache, kept beside their workdirs.
    cache = os.path.join(os.path.dirname(os.path.abspath(workdir)), ".jax_cache")
    env = {"JAX_COMPILATION_CACHE_DIR": cache, **os.environ}
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "train.log"), "a") as log:  # steps/s, phases, warnings
        log.write(done.stderr)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    eval_dir = os.path.join(workdir, "eval")
    evals = {}
    for name in os.listdir(eval_dir):
        if name.endswith(".json"):
            with open(os.path.join(eval_dir, name)) as f:
                evals[int(name.split(".")[0])] = json.load(f)
    return evals, (time.perf_counter() - began) / 60
