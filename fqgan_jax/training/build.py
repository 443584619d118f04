"""`build_run(config, mesh)`: the one sequence that turns a config into a runnable training run.

weight files resolved -> config checked -> mesh -> frozen networks -> components (graphdefs,
optimizers) -> the state's abstract shapes and shardings -> the phased train step. The loop,
restore, `benchmarks/train_step.py` and the test fixtures all start here, so a run is built the
same way wherever it runs. Nothing is compiled yet: `Run.compile_step_phases` compiles the step's
programs ahead of time, with their memory report.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging

from fqgan_jax import config_lib, sharding
from fqgan_jax.frozen import networks
from fqgan_jax.training import train_state
from fqgan_jax.training.train_step import PhasedTrainStep


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a training run builds once; read, never mutated."""
    config: object  # as resolved by frozen.networks.resolve (LPIPS may be off: logged)
    mesh: jax.sharding.Mesh
    components: train_state.Components
    frozen: dict  # params of the frozen networks (LPIPS, teachers), placed on the mesh
    state_target: train_state.TrainState  # ShapeDtypeStructs with the state's shardings
    train_step: PhasedTrainStep

    @property
    def state_shardings(self):
        return jax.tree.map(lambda leaf: leaf.sharding, self.state_target)

    def init_state(self) -> train_state.TrainState:
        """A fresh state from config.seed, created directly with its shardings, with the
        quantizer's file-initialized variables (VQGAN-LC's codebook) read in."""
        state = train_state.create_train_state(self.config, self.components,
                                               self.state_shardings)
        return train_state.with_quantizer_files(state, self.config)

    def batch_target(self) -> dict:
        """The global train batch's shape, dtype and sharding."""
        size = self.config.data.image_size
        return {"image": jax.ShapeDtypeStruct(
            (self.config.train.batch_size, size, size, 3), np.uint8,
            sharding=sharding.batch_sharding(self.mesh))}

    def compile_step_phases(self, first_step: int) -> dict:
        """Compiles the program of every adversarial phase that steps first_step ..
        num_steps - 1 go through, and logs each one's device memory; returns {phase: compiled}.
        A config whose later phase does not fit fails here, not hours into the run."""
        compiled = {}
        for phase, step in self.train_step.phase_starts(
                first_step, self.config.train.num_steps).items():
            compiled[phase] = self.train_step.compile_ahead(
                step, self.state_target, self.batch_target(), self.frozen)
            _log_memory(f"train step {phase} from step {step + 1}", compiled[phase])
        return compiled


def build_run(config, mesh: jax.sharding.Mesh | None = None, *, frozen: dict | None = None
              ) -> Run:
    """The run `config` describes on `mesh` (default: `config.mesh` over all devices). `frozen`
    replaces the frozen networks' params (benchmarks and tests pass random ones); then no weight
    file is looked for."""
    if frozen is None:
        config = networks.resolve(config)  # weight files first: a missing one stops us here
    config_lib.check_config(config, jax.device_count() if mesh is None else mesh.size)
    mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    frozen = networks.load(config, mesh) if frozen is None else frozen
    components = train_state.make_components(config)
    target = train_state.state_target(config, components, mesh)
    step = PhasedTrainStep(config, components, mesh,
                           jax.tree.map(lambda leaf: leaf.sharding, target),
                           jax.tree.map(lambda leaf: leaf.sharding, frozen))
    return Run(config=config, mesh=mesh, components=components, frozen=frozen,
               state_target=target, train_step=step)


def _log_memory(what: str, compiled) -> None:
    memory = compiled.memory_analysis()
    if memory is None:  # not every backend reports it
        return
    gib = lambda n: n / 2**30  # noqa: E731
    logging.info("%s: memory per device: arguments %.2f GiB, outputs %.2f GiB, temporaries "
                 "%.2f GiB", what, gib(memory.argument_size_in_bytes),
                 gib(memory.output_size_in_bytes), gib(memory.temp_size_in_bytes))
