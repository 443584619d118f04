"""Frozen pretrained networks that the losses use: LPIPS now, the DINOv2/CLIP teachers later.

Their weights come from files the user converts once (`python -m fqgan_jax.tools.convert`).
They are passed to the train step as one replicated pytree, `frozen`: never trained, never
checkpointed. Every file is found and shape-checked here, before anything compiles.
"""

from __future__ import annotations

import copy
import os

import jax
import ml_collections
from absl import logging
from flax import nnx

from fqgan_jax import pretrained, sharding
from fqgan_jax.models import lpips


def lpips_path(loss_config: ml_collections.ConfigDict) -> str:
    """config.loss.lpips_weights, or the default location the converter writes to."""
    return os.path.expanduser(loss_config.lpips_weights) or pretrained.default_path(
        lpips.WEIGHTS_FILENAME)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config this run trains with, after looking for the weight files it names.

    A missing LPIPS file is an error, unless `config.loss.lpips_required` is False (the smoke
    presets): then the run goes on without LPIPS, says so in the log, and records
    perceptual_weight 0 in its config.json. The caller's config is not modified.
    """
    if config.loss.perceptual_weight <= 0:
        return config
    path = lpips_path(config.loss)
    if os.path.isfile(path):
        return config
    if config.loss.lpips_required:
        raise pretrained.PretrainedError(
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


def load(config: ml_collections.ConfigDict, mesh) -> dict:
    """{name: params} of every frozen network the resolved config uses, replicated on `mesh`."""
    frozen = {}
    if config.loss.perceptual_weight > 0:
        path = lpips_path(config.loss)
        frozen["lpips"] = nnx.state(lpips.load_lpips(path, dtype=config.model.dtype), nnx.Param)
        logging.info("LPIPS weights: %s", path)
    return jax.device_put(frozen, sharding.replicated(mesh))


def shardings(frozen: dict, mesh) -> dict:
    return jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
