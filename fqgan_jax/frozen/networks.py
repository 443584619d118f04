"""Frozen pretrained networks that the losses use: LPIPS, and the CLIP/DINOv2 teachers.

LPIPS weights come from a file the user converts once (`python -m fqgan_jax.tools.convert`);
teachers load straight from Hugging Face snapshots. They reach the train step as one pytree,
`frozen` = {"lpips": params, "teachers": {branch: params}}: never trained, never checkpointed,
replicated or (config.mesh.shard_frozen) split over the devices. Every file is found and
shape-checked here, before anything compiles.
"""

from __future__ import annotations

import copy
import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from fqgan_jax import config_lib, sharding
from fqgan_jax.frozen import lpips, teachers, weights


def lpips_path(loss_config: ml_collections.ConfigDict) -> str:
    """config.loss.lpips_weights, or the default location the converter writes to."""
    return os.path.expanduser(loss_config.lpips_weights) or weights.default_path(
        lpips.WEIGHTS_FILENAME)


def teacher_path(config: ml_collections.ConfigDict, branch: str) -> str:
    """config.teachers.<branch>.path, or the default location of its kind's snapshot."""
    entry = config.teachers[branch]
    return os.path.expanduser(entry.path) or teachers.kind(entry.kind).default_path()


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config this run trains with, after looking for the weight files it names.

    A missing teacher snapshot is an error. A missing LPIPS file is one too, unless
    `config.loss.lpips_required` is False (the smoke presets): then the run goes on without
    LPIPS, says so in the log, and records perceptual_weight 0 in its config.json. The caller's
    config is not modified.
    """
    _check_teacher_paths(config)
    if config.loss.perceptual_weight <= 0:
        return config
    path = lpips_path(config.loss)
    if os.path.isfile(path):
        return config
    if config.loss.lpips_required:
        raise weights.PretrainedError(
            f"config.loss.perceptual_weight={config.loss.perceptual_weight} needs the LPIPS "
            f"weights, but {path} does not exist. {lpips.HOW_TO_MAKE} Then pass "
            f"--config.loss.lpips_weights=PATH (or write it to the default {path}); or set "
            "--config.loss.perceptual_weight=0 to train without LPIPS.")
    logging.warning(
        "LPIPS weights not found at %s: training WITHOUT the perceptual loss "
        "(config.loss.perceptual_weight set to 0 for this run). To turn it on: %s", path,
        lpips.HOW_TO_MAKE)
    config = copy.deepcopy(config)
    config.loss.perceptual_weight = 0.0
    return config


def _check_teacher_paths(config: ml_collections.ConfigDict) -> None:
    for branch, name in config_lib.taught_branches(config).items():
        spec = teachers.KINDS.get(name)
        if spec is None or spec.is_random:
            continue  # unknown kinds are check_config's to report
        path = teacher_path(config, branch)
        if not os.path.exists(path):
            raise weights.PretrainedError(
                f"Branch {branch!r} is taught by {name} ({spec.hf_id}), but {path} does not "
                f"exist. {spec.how_to_get(path)} (or pass --config.teachers.{branch}.path=DIR "
                "to a snapshot you have); or set --config.loss.semantic_weight=0 to train "
                "without representation learning.")


def load(config: ml_collections.ConfigDict, mesh) -> dict:
    """{name: params} of every frozen network the resolved config uses, placed on `mesh`."""
    frozen = {}
    if config.loss.perceptual_weight > 0:
        path = lpips_path(config.loss)
        frozen["lpips"] = nnx.state(lpips.load_lpips(path, dtype=config.model.dtype), nnx.Param)
        logging.info("LPIPS weights: %s", path)
    taught = config_lib.taught_branches(config)
    if taught:
        frozen["teachers"] = {branch: nnx.state(_teacher(config, branch, name, index), nnx.Param)
                              for index, (branch, name) in enumerate(taught.items())}
    return jax.device_put(frozen, shardings(frozen, mesh, shard=config.mesh.shard_frozen))


def _teacher(config, branch: str, name: str, index: int) -> nnx.Module:
    if teachers.kind(name).is_random:
        logging.warning(
            "Teacher of branch %r is a RANDOM-INIT %s tower (a smoke-run stand-in): InfoNCE "
            "aligns it with random features. The paper's teachers are in configs/dual.py and "
            "configs/triple.py (README: Teacher weights).", branch, name)
        return teachers.random_teacher(name, seed=config.seed * 1000 + index,
                                       dtype=config.model.dtype)
    path = teacher_path(config, branch)
    logging.info("Teacher of branch %r: %s from %s", branch, name, path)
    return teachers.load_teacher(name, path, dtype=config.model.dtype)


def shardings(frozen: dict, mesh, *, shard: bool = False) -> dict:
    """Replicated, or with `shard` each large weight split over all devices (FSDP-style: the
    compiler gathers it where it is used)."""
    return jax.tree.map(lambda leaf: sharding.frozen_sharding(leaf, mesh, shard), frozen)
