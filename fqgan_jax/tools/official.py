"""The official PyTorch tokenizer checkpoint format (FQGAN, LlamaGen), in and out.

    python -m fqgan_jax.tools.convert official --ckpt=fqgan_dual_ds16.pt \
        --config=configs/dual.py --workdir=DIR [--use_ema]
    python -m fqgan_jax.tools.convert export --workdir=DIR --out=model.pt [--step=N]

The format itself (families, architecture inference, key mapping) is `official_format.py`.

The files (spec fqgan.md §7) are torch pickles: a training checkpoint {"model", maybe "ema",
"state_dict", "discriminator", "optimizer", "optimizer_disc", "steps", "args"}, or a bare state
dict. They are read by `weights.read_torch_checkpoint` (weights_only=True, argparse.Namespace
the only object allowed), never by an unrestricted unpickler. Torch is imported only by that
reader and by `write_torch_checkpoint`; training never needs it.

In (`import_checkpoint`). The tokenizer weights are "model" ("ema" with use_ema; a bare state
dict or "state_dict" also do); the PatchGAN's come from "discriminator" when there is one,
BatchNorm running statistics included. Before anything is written:
- the architecture is read off the keys and shapes (`infer_architecture`: branches from the
  quantize*/quant_conv* keys, ds16/ds8 from the encoder's levels, every width from a shape) and
  compared with the config; each difference is named with its fix (the official config file and
  preset for an official layout, else the --config.model overrides). Not in the shapes, so taken
  from the config: adapter_heads (official: 8) and the feature heads' depth and heads (3, 8);
- then every key must fill exactly one parameter of the config's model
  (`weights.fill_params`, which names missing, unexpected and wrong-shape keys).
`codebook_used` buffers are dropped (the spec says so: a rolling usage window, not a weight), as
is BatchNorm's `num_batches_tracked` (torch reads it only when momentum is None; taming's is 0.1).

Feature-prediction heads are training-only: encode and decode never read them. A head in the file
is imported when the config teaches that branch (loss.semantic_weight > 0 and a teacher of the
head's width). A head the config does not train is DROPPED with a printed note, not refused:
that is what the official code does itself (its code-extraction and reconstruction scripts build
the tokenizer without heads and load with strict=False), and it is exactly what a user who
evaluates, or fine-tunes without representation learning (--config.loss.semantic_weight=0),
means; refusing would force them to fake teachers they do not use. A head of another width than
the config's teacher is refused (the teacher kind is wrong), and so is a head the config trains
but the file lacks (LlamaGen files, inference-only exports): no weights to start it from, and a
silently random head would be a surprise; the message gives both fixes. Likewise the
discriminator: a config without a GAN (gan.weight 0) drops the file's with a note, and a config
with one starts from a fresh discriminator (with a note) when the file has none.

The workdir gets config.json (the config as given: weight files are not looked for, since writing
the checkpoint needs neither LPIPS nor the teachers) and an orbax checkpoint at step 0 holding a
whole TrainState from `build_run(config, frozen={})`: fresh optimizer states and counters, the
imported params (also as ema_params when the config keeps an EMA) and discriminator, and the
data position 0. `load_tokenizer(DIR)`, `--mode=eval` and `--mode=train` (which starts at step 0
from these weights) read it like any run's.

Out (`export_checkpoint`). The inverse: {"model": state_dict} of the workdir's params, plus "ema"
when the run keeps an EMA (the official training checkpoint's layout: official eval scripts prefer
"ema") and "discriminator" when the state has one, in the official key names and torch layouts.
`codebook_used` is written as the float32 zeros the official module registers ([65536], or
[K + 1] for K >= 65536 as FVQ does) and `num_batches_tracked` as int64 0, so the official code's
strict load_state_dict accepts the file. Importing an export gives back the same arrays, bit for
bit.

FVQ (large_codebooks.md §B): its exported checkpoints have LlamaGen's layout with code_dim 256
and no l2-normalized search: --config=configs/vqgan.py --config.model.code_dim=256
--config.model.l2_normalize=False (plus --config.model.codebook_size=65536 or 262144). Exporting
a VQGAN-LC or FVQ workdir trained here writes that same layout: the mapped codebook is computed
once and written as the plain codebook (`materialized`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from fqgan_jax import architecture, checkpointing, config_lib, materialize, sharding
from fqgan_jax.atomic_file import atomic_write
from fqgan_jax.frozen import weights
from fqgan_jax.frozen.weights import PretrainedError
from fqgan_jax.tools.official_format import (
    Architecture,
    check_architecture,
    discriminator_architecture,
    discriminator_state_dict,
    discriminator_variables,
    infer_architecture,
    plan_heads,
    tokenizer_params,
    tokenizer_state_dict,
    without_unused,
)
from fqgan_jax.training import train_state
from fqgan_jax.training.build import build_run

# ------------------------------------------------------------------------------------------------
# Import: file -> checked variables -> workdir.


MODEL_ENTRIES = ("model", "state_dict")  # where a training checkpoint keeps the tokenizer


@dataclasses.dataclass(frozen=True)
class Imported:
    """One official checkpoint's variables, fitted to a config; nothing written yet."""
    params: nnx.State
    disc: tuple[nnx.State, nnx.State] | None  # (params, batch_stats), None: fresh or no GAN
    architecture: Architecture
    entry: str  # which entry of the file the tokenizer came from
    notes: tuple[str, ...]  # what was dropped or started fresh, for the user

    def summary(self) -> str:
        count = sum(np.size(leaf) for leaf in jax.tree.leaves(self.params))
        disc = " and its discriminator" if self.disc is not None else ""
        return (f"{self.architecture.describe()}, {count:,} parameters from {self.entry}{disc}")


def _unprefixed(state: dict) -> dict:
    """Keys without the prefix DDP ("module.") or torch.compile ("_orig_mod.") puts on all."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def select_state_dicts(checkpoint: dict, *, use_ema: bool = False,
                       source: str = "The checkpoint") -> tuple[dict, dict | None, str]:
    """(tokenizer state dict, discriminator state dict or None, the entry's name) of a file."""
    if all(isinstance(value, np.ndarray) for value in checkpoint.values()):
        if use_ema:
            raise PretrainedError(f"{source} is a bare state dict, with no 'ema' entry: drop "
                                  "--use_ema.")
        return _unprefixed(checkpoint), None, "the bare state dict"
    entries = ("ema",) if use_ema else MODEL_ENTRIES
    name = next((entry for entry in entries if isinstance(checkpoint.get(entry), dict)), None)
    if name is None:
        hint = (" It has 'ema' weights: pass --use_ema." if "ema" in checkpoint and not use_ema
                else " Drop --use_ema to import its 'model'." if use_ema else "")
        raise PretrainedError(f"{source} has no {' or '.join(map(repr, entries))} state dict "
                              f"(its entries: {', '.join(map(repr, checkpoint))}).{hint}")
    disc = checkpoint.get("discriminator")
    return (_unprefixed(checkpoint[name]), _unprefixed(disc) if isinstance(disc, dict) else None,
            f"'{name}'")


def plan_discriminator(state: dict | None, config) -> tuple[bool, list[str], list[str]]:
    """(import the file's discriminator?, notes, problems): the policy of the module docstring."""
    if state is None:
        fresh = ("The checkpoint has no discriminator: GAN training starts from a fresh one "
                 "(config.seed).")
        return False, [fresh] if config_lib.has_discriminator(config) else [], []
    if not config_lib.has_discriminator(config):
        return False, ["Dropped the checkpoint's discriminator: the config trains no GAN "
                       f"(gan.weight={config.gan.weight})."], []
    problems = [f"the discriminator has {key} {value}, the config {config.gan[key]}; set "
                f"--config.gan.{key}={value}"
                for key, value in discriminator_architecture(state).items()
                if config.gan[key] != value]
    return not problems, [], problems


def convert_checkpoint(checkpoint: dict, config, *, use_ema: bool = False,
                       source: str = "The checkpoint", config_name: str = "the config"
                       ) -> Imported:
    """The variables of a checkpoint read by weights.read_torch_checkpoint, checked against
    `config` (PretrainedError naming every problem and its fix)."""
    model_state, disc_state, entry = select_state_dicts(checkpoint, use_ema=use_ema,
                                                        source=source)
    arch = infer_architecture(model_state)
    check_architecture(arch, config, config_name=config_name)
    heads, notes, problems = plan_heads(arch, config)
    with_disc, disc_notes, disc_problems = plan_discriminator(disc_state, config)
    if problems + disc_problems:
        raise PretrainedError(f"{source} does not fit --config={config_name}:\n  - "
                              + "\n  - ".join(problems + disc_problems))
    state = without_unused(model_state, arch.model["branches"],
                            set(arch.head_widths) - set(heads))
    params = tokenizer_params(state, config, source=f"{source} ({entry})")
    disc = discriminator_variables(disc_state, config, source=f"{source} ('discriminator')") \
        if with_disc else None
    if not use_ema and isinstance(checkpoint.get("ema"), dict):
        notes.append(f"Imported the {entry} weights; the file also has 'ema' weights, which "
                     "--use_ema imports instead.")
    return Imported(params=params, disc=disc, architecture=arch, entry=entry,
                    notes=tuple(notes + disc_notes + _search_notes(arch, config)))


def _search_notes(arch: Architecture, config) -> list[str]:
    """The one setting the shapes cannot tell: whether codes are searched l2-normalized (FQGAN,
    LlamaGen) or not (FVQ, large_codebooks.md §B.4, whose exports have LlamaGen's layout with
    code_dim 256)."""
    if arch.model["branches"] == ("vq",) and arch.model["code_dim"] != 8 \
            and config.model.l2_normalize:
        return [f"code_dim {arch.model['code_dim']} in LlamaGen's layout: if this is an FVQ "
                "export, its codes are searched without l2 normalization; re-import with "
                "--config.model.l2_normalize=False."]
    return []


def check_new_workdir(workdir: str) -> None:
    """Refuses a workdir that exists and is not empty: an import never overwrites a run."""
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise checkpointing.CheckpointError(
            f"--workdir={workdir} exists and is not empty. Import into a new (or empty) folder: "
            "the import writes config.json and checkpoints/0 and never overwrites a run.")


def import_checkpoint(ckpt: str, config, workdir: str, *, use_ema: bool = False,
                      config_name: str = "the config", mesh=None) -> Imported:
    """Reads the official checkpoint `ckpt`, checks it against `config`, and writes `workdir`
    (config.json and a step-0 TrainState; module docstring). Nothing is written unless every
    check passes. `mesh` defaults to config.mesh over all devices."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    check_new_workdir(workdir)
    config_lib.check_config(config, jax.device_count() if mesh is None else mesh.size)
    checkpoint = weights.read_torch_checkpoint(ckpt, flag="--ckpt")
    imported = convert_checkpoint(checkpoint, config, use_ema=use_ema,
                                  source=f"--ckpt={ckpt}", config_name=config_name)
    del checkpoint  # the file's arrays; the converted ones live on
    # frozen={}: no LPIPS or teacher file is looked for; writing the state needs neither.
    run = build_run(config, mesh, frozen={})
    write_workdir(workdir, run.config, initial_train_state(run, imported))
    return imported


def initial_train_state(run, imported: Imported):
    """`run.init_state()` with the imported params (also as ema_params when the run keeps them)
    and discriminator in place of the random ones: fresh optimizer moments, counters and RNG.
    One jitted program, so XLA drops the random init it replaces (the tiny test model's state
    compiles in seconds, not the ~40 s of init_state) and the state is built sharded."""
    config, components = run.config, run.components

    def build(params, disc):
        state = train_state.initial_state(config, components, jax.random.key(config.seed))
        if disc is not None:
            state = state.replace(disc=state.disc.replace(params=disc[0], batch_stats=disc[1]))
        return state.replace(params=params,
                             ema_params=None if state.ema_params is None else params)

    disc = imported.disc if components.disc_tx is not None else None
    return jax.jit(build, out_shardings=run.state_shardings)(imported.params, disc)


def write_workdir(workdir: str, config, state) -> None:
    """checkpoints/0 (data position 0, no images counted), then config.json, whose presence
    marks a complete workdir."""
    meta = {"num_skipped_images": 0, "num_converted_images": 0,
            "data": {"global_next_index": 0}}
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              async_save=False)
    try:
        checkpointer.save(0, state, None, meta)
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        with atomic_write(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


# ------------------------------------------------------------------------------------------------
# Export: workdir -> official file.


def restore_variables(workdir: str, config, step: int | None = None) -> tuple[dict, int]:
    """({"params", maybe "ema_params", maybe "disc": {"params", "batch_stats"}}, step) of
    checkpoint `step` (default: the latest), on one device; optimizer moments stay on disk."""
    mesh = sharding.make_mesh(config_lib.single_device_mesh(), jax.devices()[:1])
    params, model_state = architecture.abstract_model_variables(config)
    target = {"params": params}
    if jax.tree.leaves(model_state):  # VQGAN-LC's frozen codebook
        target["model_state"] = model_state
    if config.optimizer.ema_decay > 0:
        target["ema_params"] = params
    if config_lib.has_discriminator(config):
        disc = nnx.state(nnx.eval_shape(
            lambda: architecture.create_discriminator(config, nnx.Rngs(0))))
        disc_params, batch_stats = nnx.split_state(disc, nnx.Param, nnx.BatchStat)
        target["disc"] = {"params": disc_params, "batch_stats": batch_stats}
    target = checkpointing.with_shardings(
        target, sharding.state_shardings(target, mesh, config.mesh))
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              async_save=False)
    try:
        step = checkpointer.existing_step(step)
        return checkpointer.restore_part(step, target), step
    finally:
        checkpointer.close()


def official_checkpoint(variables: dict, config) -> dict[str, dict[str, np.ndarray]]:
    """{"model", maybe "ema", maybe "discriminator": official state dict} of restored
    variables."""
    branches = tuple(config.model.branches)
    checkpoint = {"model": tokenizer_state_dict(variables["params"], branches)}
    if "ema_params" in variables:
        checkpoint["ema"] = tokenizer_state_dict(variables["ema_params"], branches)
    if "disc" in variables:
        checkpoint["discriminator"] = discriminator_state_dict(
            variables["disc"]["params"], variables["disc"]["batch_stats"])
    return checkpoint


def export_checkpoint(workdir: str, out: str, *, step: int | None = None
                      ) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """Writes checkpoint `step` (default: the latest, or the step folder `workdir` names) of a
    workdir to `out` in the official format; returns (what was written, as numpy, the step)."""
    workdir, folder_step = checkpointing.locate_workdir(os.path.expanduser(workdir))
    config = checkpointing.read_config(workdir)
    variables, step = restore_variables(workdir, config, folder_step if step is None else step)
    config, variables = materialized(config, variables)
    checkpoint = official_checkpoint(variables, config)
    write_torch_checkpoint(out, checkpoint)
    return checkpoint, step


def materialized(config, variables: dict) -> tuple[object, dict]:
    """A VQGAN-LC or FVQ run's variables as the plain LlamaGen VQ they export to, with the
    mapped codebook computed once (`fqgan_jax/materialize.py`, FVQ's convert_fullvq2vq);
    other runs unchanged."""
    variables = dict(variables)
    model_state = variables.pop("model_state", nnx.State({}))
    if not materialize.is_mapped(config):
        return config, variables
    plain = config
    for field in ("params", "ema_params"):
        if field in variables:
            plain, variables[field], _ = materialize.materialize(config, variables[field],
                                                                 model_state)
    return plain, variables


def write_torch_checkpoint(path: str, checkpoint: dict[str, dict[str, np.ndarray]]) -> None:
    """torch.save of {entry: {key: tensor}}, atomically (no half-written file on failure)."""
    try:
        import torch  # noqa: PLC0415 (only the export writes torch files; training never does)
    except ImportError as error:
        raise PretrainedError("Writing an official (PyTorch) checkpoint needs torch: pip "
                              "install torch.") from error
    # from_numpy shares memory and wants a writeable array; device_get's are read-only.
    tensors = {entry: {key: torch.from_numpy(np.require(array, requirements=["C", "W"]))
                       for key, array in state.items()}
               for entry, state in checkpoint.items()}
    path = os.path.expanduser(path)
    try:
        with atomic_write(path) as f:
            torch.save(tensors, f)
    except OSError as error:
        raise PretrainedError(f"--out: cannot write {path} ({error}).") from error
