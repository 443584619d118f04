"""rFID and Inception Score of reconstructions, accumulated batch by batch inside the eval loop.

Protocol (README "Evaluation protocol"): the FID InceptionV3 of pytorch-fid (weights
`pt_inception-2015-12-05`, converted once by `python -m fqgan_jax.tools.convert inception`)
sees uint8 images / 255, resized to 299 as `config.eval.fid_preprocess` says. rFID compares the
pool3 Gaussian of the reconstructions with that of

* the eval originals themselves (`config.eval.fid_reference=""`, FQGAN's rFID), or
* a reference statistics file (`fid_reference=PATH`: pytorch-fid stats or an ADM batch).

IS is over the reconstructions, `config.eval.is_splits` splits in dataset order. Without the
Inception weights (none configured and none at the default path) eval still runs, says why rFID
and IS are missing, and records that in the JSON's protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from fqgan_jax import sharding
from fqgan_jax.eval import fid, inception_score
from fqgan_jax.frozen import inception, networks, weights

PREPROCESS = {
    "pytorch_fid": "bilinear resize to 299x299 (torch, align_corners=False, no antialias), "
                   "then 2x - 1 (pytorch-fid)",
    "tf1": "TF1 resize_bilinear to 299x299 (align_corners=False, half_pixel_centers=False), "
           "then (255x - 128) / 128 (the TF graph of the ADM evaluator; torch-fidelity)",
}


@dataclasses.dataclass(frozen=True)
class InceptionEval:
    """The loaded network and everything fixed for a run's rFID / IS."""
    path: str
    graphdef: object
    params: object  # placed on the mesh
    reference: tuple[np.ndarray, np.ndarray] | None  # (mu, sigma) of fid_reference, else None
    preprocess: str
    method: str  # fid.frechet_distance's
    splits: int
    updates: dict  # with_real -> jitted `update_step`
    # The eval originals' (mu, sigma) by image count, once a pass has computed them: later evals
    # of the run send only the reconstructions through the network (half the cost).
    originals: dict = dataclasses.field(default_factory=dict)


def weights_path(eval_config) -> str:
    """config.eval.inception_weights, or where the converter writes by default."""
    return (os.path.expanduser(eval_config.inception_weights)
            or weights.default_path(inception.WEIGHTS_FILENAME))


def resolve(eval_config) -> str | None:
    """The Inception weights file, or None when none is configured or found at the default path.
    Cheap (no file is read), so setup calls it first: a path the user set that does not exist,
    or a reference statistics file that does not, is an error before anything else runs."""
    path = weights_path(eval_config)
    reference = eval_config.fid_reference
    if not os.path.isfile(path) and (eval_config.inception_weights or reference):
        wanted = ("config.eval.inception_weights" if eval_config.inception_weights
                  else f"config.eval.fid_reference={reference}")
        raise weights.PretrainedError(
            f"{wanted} needs the FID Inception weights, but {path} does not exist. "
            f"{inception.HOW_TO_MAKE} Or leave config.eval.inception_weights and "
            "config.eval.fid_reference empty to evaluate without rFID and IS.")
    if reference and not os.path.isfile(os.path.expanduser(reference)):
        fid.load_stats(reference, inception.POOL3_DIM)  # raises, naming the file and the fix
    return path if os.path.isfile(path) else None


def skipped_reason(eval_config) -> str:
    return (f"no FID Inception weights at {weights_path(eval_config)} "
            "(python -m fqgan_jax.tools.convert inception)")


def load(config, mesh) -> InceptionEval | None:
    """Loads the weights and the reference statistics (every file checked before compiling)."""
    path = resolve(config.eval)
    if path is None:
        logging.warning("No FID Inception weights at %s: eval reports PSNR, SSIM and usage but "
                        "NOT rFID or IS. To add them: %s", weights_path(config.eval),
                        inception.HOW_TO_MAKE)
        return None
    reference = (fid.load_stats(config.eval.fid_reference, inception.POOL3_DIM)
                 if config.eval.fid_reference else None)
    graphdef, params = nnx.split(inception.load_inception(path), nnx.Param)
    params = jax.device_put(params, networks.shardings(params, mesh,
                                                          shard=config.mesh.shard_frozen))
    logging.info("FID Inception weights: %s; rFID against %s", path,
                 config.eval.fid_reference or "the eval originals")
    updates = {with_real: jax.jit(
        functools.partial(update_step, graphdef=graphdef, preprocess=config.eval.fid_preprocess,
                          with_real=with_real),
        out_shardings=sharding.replicated(mesh), donate_argnums=1) for with_real in (False, True)}
    return InceptionEval(path=path, graphdef=graphdef, params=params, reference=reference,
                         preprocess=config.eval.fid_preprocess, method=config.eval.fid_method,
                         splits=config.eval.is_splits, updates=updates)


def warn_if_few(num_images: int) -> None:
    if num_images <= inception.POOL3_DIM:
        logging.warning(
            "rFID over %d images (<= %d features) uses rank-deficient covariances: fine for "
            "tracking a run, not comparable to published rFID (ImageNet val, 50,000 images).",
            num_images, inception.POOL3_DIM)


class EvalPass:
    """rFID / IS over one pass of the eval loop: `add` each batch, then `results`."""

    def __init__(self, evaluator: InceptionEval, mesh, num_images: int):
        warn_if_few(num_images)
        self.evaluator, self.num_images = evaluator, num_images
        self.reference = evaluator.reference or evaluator.originals.get(num_images)
        acc = {"recon": fid.init_moments(inception.POOL3_DIM),
               "is": inception_score.init_sums(inception.NUM_CLASSES, evaluator.splits)}
        if self.reference is None:
            acc["real"] = fid.init_moments(inception.POOL3_DIM)
        replicated = sharding.replicated(mesh)
        self.acc = jax.device_put(acc, replicated)
        self.starts = jax.device_put(
            inception_score.split_starts(num_images, evaluator.splits), replicated)

    def add(self, recon, real, mask, index) -> None:
        """uint8 reconstructions and originals, mask and dataset index: global batch arrays."""
        update = self.evaluator.updates[self.reference is None]
        self.acc = update(self.evaluator.params, self.acc, recon, real, mask, index, self.starts)

    def results(self) -> dict:
        mu, sigma = fid.gaussian(self.acc["recon"])
        reference = self.reference
        if reference is None:
            reference = self.evaluator.originals[self.num_images] = fid.gaussian(self.acc["real"])
        is_mean, is_std = inception_score.score(self.acc["is"])
        return {"rfid": fid.frechet_distance(mu, sigma, *reference,
                                             method=self.evaluator.method),
                "is": is_mean, "is_std": is_std}


def update_step(params, acc: dict, recon, real, mask, index, starts, *, graphdef,
                preprocess: str, with_real: bool) -> dict:
    """Adds one batch: uint8 reconstructions (and originals, when they are the reference)."""
    images = jnp.concatenate([recon, real]) if with_real else recon
    out = inception.features(graphdef, params, images.astype(jnp.float32) / 255.0,
                             mode=preprocess)
    batch = recon.shape[0]
    acc = dict(acc)
    acc["recon"] = fid.update_moments(acc["recon"], out["pool3"][:batch], mask)
    if with_real:
        acc["real"] = fid.update_moments(acc["real"], out["pool3"][batch:], mask)
    acc["is"] = inception_score.update_sums(acc["is"], out["logits_unbiased"][:batch], mask,
                                            index, starts)
    return acc


def protocol(evaluator: InceptionEval | None, eval_config) -> dict:
    """What produced rfid / is, for the JSON (or why they are missing)."""
    if evaluator is None:
        return {"skipped": skipped_reason(eval_config)}
    return {"network": "FID InceptionV3 (pytorch-fid, pt_inception-2015-12-05), pool3",
            "weights": evaluator.path, "preprocess": PREPROCESS[evaluator.preprocess],
            "input": "uint8 images / 255 (reconstructions as uint8, like saved PNGs)",
            "reference": eval_config.fid_reference or "the eval originals (FQGAN rFID)",
            "frechet": ("pytorch-fid calculate_frechet_distance (scipy sqrtm)"
                        if evaluator.method == "sqrtm" else
                        "Tr sqrt(S1 S2) from eigvalsh(S1^1/2 S2 S1^1/2) (scipy eigh)"),
            "is": f"{evaluator.splits} splits in dataset order, unbiased logits (improved-gan)"}
