"""Reconstruction evaluation: PSNR, SSIM, exact per-sub-codebook usage, rFID and IS.

Protocol (spec fqgan.md §5.1, with its SSIM bug fixed; README "Evaluation protocol"):
center-cropped eval images, reconstructed and converted to uint8; PSNR with data range 1 on
[0, 1] images, averaged per image; SSIM with skimage's defaults and `config.eval.ssim_data_range`
(1.0; the official code used 2.0). Usage is exact: the number of distinct codes assigned over the
whole eval set divided by K, per sub-codebook. rFID and IS stream through the FID Inception in
the same pass (`inception_metrics.py`) when its weights are there. Results go to
`WORKDIR/eval/<step>.json` (with the protocol that produced them) with a PNG grid of originals
(top row) above reconstructions (bottom row), and the per-sub-codebook analysis of FQGAN's
Figures 3 and 4 (`codebook_analysis.py`): `<step>_single_codebook.png` (columns original | all |
only-i, k > 1) and `<step>_tsne.png`.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from clu import metric_writers

from fqgan_jax import architecture, checkpointing, config_lib, data, quantizers, sharding
from fqgan_jax.architecture import merge_model
from fqgan_jax.atomic_file import atomic_write
from fqgan_jax.data.pixels import images_to_float, to_uint8
from fqgan_jax.eval import codebook_analysis, image_grid, image_metrics, inception_metrics


def eval_step(params, model_state, batch, *, graphdef, config):
    """The batch's metric sums and code histogram (padded rows masked out), reduced over the
    mesh and hosts, and the uint8 reconstructions."""
    model = merge_model(graphdef, params, model_state)
    recon, quantized = model(images_to_float(batch["image"]))
    recon_u8 = to_uint8(recon, legacy_offset=config.eval.legacy_uint8_offset)
    reference = batch["image"].astype(jnp.float32) / 255.0
    reconstruction = recon_u8.astype(jnp.float32) / 255.0
    mask = batch["mask"]
    masked_sum = lambda per_image: jnp.sum(jnp.where(mask, per_image, 0.0))  # noqa: E731
    return {
        "psnr": masked_sum(image_metrics.psnr(reference, reconstruction)),
        "ssim": masked_sum(image_metrics.ssim(reference, reconstruction,
                                              data_range=config.eval.ssim_data_range)),
        "count": jnp.sum(mask.astype(jnp.int32)),
        "counts": quantizers.code_histogram(quantized.indices, config.model.codebook_size,
                                          mask=mask),
        "recon": recon_u8,
    }


def compile_eval_step(config, graphdef, mesh):
    step = functools.partial(eval_step, graphdef=graphdef, config=config)
    replicated = sharding.replicated(mesh)
    out = {"psnr": replicated, "ssim": replicated, "count": replicated, "counts": replicated,
           "recon": sharding.batch_sharding(mesh)}
    return sharding.under_mesh(jax.jit(step, out_shardings=out), mesh)


def analysis_step(params, model_state, images, *, graphdef, config):
    """Single-sub-codebook reconstructions of `images` (uint8 [k+1, B, H, W, 3]) and the
    codebook as the decoder sees it ([k, K, d])."""
    single = codebook_analysis.single_codebook_step(
        params, model_state, images, graphdef=graphdef, fill=config.eval.single_codebook_fill,
        legacy_offset=config.eval.legacy_uint8_offset)
    codebook = codebook_analysis.decoder_codebook(merge_model(graphdef, params, model_state),
                                                  as_numpy=False)
    return {"single": single, "codebook": codebook}


def compile_analysis_step(config, graphdef, mesh):
    step = functools.partial(analysis_step, graphdef=graphdef, config=config)
    return sharding.under_mesh(jax.jit(step, out_shardings={
        "single": sharding.replicated(mesh), "codebook": sharding.replicated(mesh)}), mesh)


def evaluate(config, params, model_state, *, eval_fn, mesh, step: int, workdir: str,
             writer=None, analysis_fn=None, inception=None) -> dict:
    """Runs `eval_fn` over the eval split; writes JSON, PNG grid and scalars; returns results.
    With `analysis_fn` (compile_analysis_step), also the Figure 3 grid and Figure 4 t-SNE; with
    `inception` (inception_metrics.load), also rFID and IS."""
    per_process = config.eval.batch_size // jax.process_count()
    batches = data.make_eval_batches(
        config.data, batch_size=per_process, num_images=config.eval.num_images or None,
        process_index=jax.process_index(), process_count=jax.process_count())
    inception_pass = (None if inception is None else
                      inception_metrics.EvalPass(inception, mesh, batches.num_images))
    totals = {"psnr": 0.0, "ssim": 0.0, "n": 0}
    counts, grid, first, first_inputs = None, None, None, None
    for batch in _progress(batches, config, step):
        inputs = sharding.to_global_batch(
            {"image": batch["image"], "mask": batch["mask"], "index": batch["index"]},
            sharding.batch_sharding(mesh))
        out = eval_fn(params, model_state, {"image": inputs["image"], "mask": inputs["mask"]})
        if inception_pass is not None:
            inception_pass.add(out["recon"], inputs["image"], inputs["mask"], inputs["index"])
        counts = out["counts"] if counts is None else counts + out["counts"]
        for name in ("psnr", "ssim"):  # float64 across batches, on the host
            totals[name] += float(out[name])
        totals["n"] += int(out["count"])
        if grid is None:  # every process joins the gather; process 0 writes
            first = {name: sharding.gather_to_host(inputs[name]) for name in ("image", "mask")}
            grid = _grid(first["image"], sharding.gather_to_host(out["recon"]), first["mask"],
                         config.eval.grid_images)
            first_inputs = inputs
    if totals["n"] == 0:
        raise ValueError("The eval split produced no images; check config.data.")
    stats = jax.device_get(quantizers.usage_stats(counts))
    results = {
        "step": int(step),
        "psnr": totals["psnr"] / totals["n"],
        "ssim": totals["ssim"] / totals["n"],
        "usage": [float(u) for u in stats["usage"]],
        "perplexity": [float(p) for p in stats["perplexity"]],
        "num_images": totals["n"],
        "branches": list(config.model.branches),
        "protocol": _protocol(config, batches.num_images, inception),
    }
    if inception_pass is not None:
        results.update(inception_pass.results())
    if jax.process_index() == 0:
        _write(results, grid, workdir, step, writer)
    if analysis_fn is not None and any(_analysis_outputs(config)):
        _write_analysis(config, analysis_fn(params, model_state, first_inputs["image"]), first,
                        counts, workdir, step, writer)
    return results


def _analysis_outputs(config) -> tuple[bool, bool]:
    """Whether eval writes (the Figure 3 grid, the Figure 4 t-SNE); the grid needs k > 1."""
    return (len(config.model.branches) > 1 and config.eval.single_codebook_images > 0,
            config.eval.tsne_points > 0)


def _write_analysis(config, out, inputs, counts, workdir, step, writer):
    """Figure 3 (k > 1) and Figure 4 PNGs of the first eval batch and the codebook."""
    if jax.process_index() != 0:
        return
    eval_dir = os.path.join(workdir, "eval")
    names = list(config.model.branches)
    with_grid, with_tsne = _analysis_outputs(config)
    keep = np.flatnonzero(inputs["mask"])[:config.eval.single_codebook_images]
    if with_grid and len(keep):
        grid = codebook_analysis.single_codebook_grid(
            inputs["image"][keep], np.asarray(jax.device_get(out["single"]))[:, keep])
        image_grid.save_png(grid, os.path.join(eval_dir, f"{step}_single_codebook.png"))
        if writer is not None:
            writer.write_images(step, {"eval/single_codebook": grid[None]})
    if with_tsne:
        used = np.asarray(jax.device_get(counts)) > 0 if config.eval.tsne_used_only else None
        try:
            codebook_analysis.tsne_png(
                np.asarray(jax.device_get(out["codebook"])), names,
                os.path.join(eval_dir, f"{step}_tsne.png"),
                max_points_per_codebook=config.eval.tsne_points, seed=config.seed, used=used)
        except ValueError as error:  # e.g. a collapsed codebook with < 2 used codes
            logging.warning("eval step %d: no t-SNE plot: %s", step, error)


def _grid(images, recon, mask, num):
    keep = np.flatnonzero(mask)[:num]
    return image_grid.make_grid([images[keep], recon[keep]])


def _progress(batches, config, step):
    """A progress bar on process 0 (redrawn at most every 30 s when stderr is not a terminal)."""
    return tqdm.tqdm(batches, total=len(batches), desc=f"eval step {step}", unit="batch",
                     file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 30,
                     disable=not config.eval.progress or jax.process_index() != 0)


def _protocol(config, num_images: int, inception) -> dict:
    return {"split": f"{config.data.source}:{config.data.eval_split}",
            "num_images": num_images,  # records read; results' num_images counts decoded ones
            "image_size": config.data.image_size,
            "crop": "center (ADM center_crop_arr: box-halve, bicubic short side, center crop)",
            "value_range": "uint8 [0, 255] in; the model sees x / 127.5 - 1",
            "ssim_data_range": config.eval.ssim_data_range,
            "dtype": config.eval.dtype,  # the model's compute dtype in eval
            "uint8": "legacy +128" if config.eval.legacy_uint8_offset else "round",
            "usage": "exact: distinct codes over all eval images / K, per sub-codebook",
            "fid": inception_metrics.protocol(inception, config.eval)}


def _write(results, grid, workdir, step, writer):
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    path = os.path.join(eval_dir, f"{step}.json")
    with atomic_write(path, "w") as f:
        json.dump(results, f, indent=2)
    image_grid.save_png(grid, os.path.join(eval_dir, f"{step}.png"))
    extra = (f" rfid {results['rfid']:.4f} is {results['is']:.3f}" if "rfid" in results
             else " (no rFID/IS: " + results["protocol"]["fid"]["skipped"] + ")")
    logging.info("eval step %d: psnr %.3f ssim %.4f usage %s%s -> %s", step, results["psnr"],
                 results["ssim"], results["usage"], extra, path)
    if writer is not None:
        scalars = {"eval/psnr": results["psnr"], "eval/ssim": results["ssim"]}
        for name in ("rfid", "is"):
            if name in results:
                scalars[f"eval/{name}"] = results[name]
        for name, usage in zip(results["branches"], results["usage"]):
            scalars[f"eval/usage/{name}"] = usage
        writer.write_scalars(step, scalars)
        writer.write_images(step, {"eval/reconstructions": grid[None]})


def evaluate_workdir(config, workdir: str) -> dict:
    """`--mode=eval`: evaluates the latest checkpoint of `workdir` (EMA params if present),
    writing `eval/<step>.json`, its PNGs and TensorBoard scalars."""
    config_lib.check_config(config, jax.device_count())
    mesh = sharding.make_mesh(config.mesh)
    checkpointing.check_config_matches(workdir, config)
    inception = inception_metrics.load(config, mesh)  # a bad file stops us before restoring
    params, model_state, step = checkpointing.restore_model(workdir, config, mesh)
    graphdef = architecture.eval_graphdef(config)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    try:
        return evaluate(config, params, model_state, eval_fn=compile_eval_step(
            config, graphdef, mesh), mesh=mesh, step=step, workdir=workdir, writer=writer,
            analysis_fn=compile_analysis_step(config, graphdef, mesh), inception=inception)
    finally:
        writer.close()
