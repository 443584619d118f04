r"""Makes VQGAN-LC's initial codebook: k-means centers of frozen-encoder patch features over the
training images (spec large_codebooks.md §A.1).

    python -m fqgan_jax.tools.init_codebook --config=configs/lc.py[:preset] \
        [--config.KEY=VALUE ...] --output=PATH.npy [--overwrite]

then train with --config.model.lc.codebook_path=PATH.npy. The config is the training run's
(same data, codebook_size, lc.* keys), so one file describes both steps:

1. Images: the train split of `config.data`, all of it or a seeded random subset of
   `lc.init_max_images`. Each is resized (short side) and center-cropped to the encoder's input
   size (official: CLIP's Resize + CenterCrop to 224) with the pipeline's own ADM resize
   (data/transforms.py), then normalized with CLIP's mean and std (`clip_vision.preprocess`).
   The bundled photos are the exception: their train split repeats 6 photos, so each record
   gets the random crop the training pipeline would (`data.crop_scale`) instead of one center
   crop that would repeat 64 times.
2. Features: `lc.init_encoder`'s patch tokens after post_layernorm and the visual projection
   (`clip_vision` with_projection; 768-d for clip_vit_l14), as a grid, average-pooled
   `lc.init_pool` x `lc.init_pool` (official: 16 x 16 -> 4 x 4 = 16 features per image).
   Batched and jitted, the batch split over all devices.
3. Clustering (quantizers/kmeans.py, Lloyd on device, `lc.init_iterations` iterations):
   "per_class" (official) runs one k-means of K / num_classes centers on each class's features
   and concatenates them in class order; "global" runs one k-means of K centers over all
   features and needs no labels (unlabeled data such as FFHQ: upstream issue #12). Labels are
   TFDS's `label` feature, the top-level folder of a `folder` source, and the photo for the
   bundled photos.

Memory: the pooled features are kept on disk, not in RAM, in an np.memmap in a temporary folder
beside the output (removed at the end): float32, or float16 when float32 would exceed
4 GiB (ImageNet: 1.28M images x 16 x 768 = 20.5M features, 31.5 GB in float16 instead of 63 GB;
float16 keeps CLIP features to ~3 significant digits, far below the spread of a cluster). Make
sure that folder's disk has the room, or cap the images with `lc.init_max_images`. Per-class
k-means reads one class at a time (~20k features); global k-means streams the memmap through
the device in 1 GiB chunks on every iteration (at K = 100,000 and 20M features each iteration
is ~3e15 FLOPs, minutes on one accelerator in float32, plus reading the 31.5 GB memmap; a subset
via init_max_images is the quicker path).

Output: PATH.npy, float32 [codebook_size, feature_dim], written atomically, and PATH.json, a
manifest (encoder, pooling, clustering, K, images, features, inertia, seed). An existing PATH.npy
is refused unless --overwrite. Every config problem (feature_dim vs the encoder's width, a pool
that does not divide the patch grid, per-class clustering of data without labels or with a K
that the classes do not divide, too few features) is reported before any feature is computed.
Single-process: run it on one host (all of its devices are used).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from fqgan_jax import config_lib, run_log
from fqgan_jax.atomic_file import atomic_write
from fqgan_jax.data import sources
from fqgan_jax.data.transforms import (
    BadImage,
    BadRecord,
    center_crop,
    decode_record,
    random_resized_crop,
)
from fqgan_jax.frozen import clip_vision, teachers, weights
from fqgan_jax.quantizers import kmeans

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:preset].",
                                          lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the codebook (.npy); a .json "
                              "manifest is written beside it.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing output.")

AXIS = "data"
FLOAT32_STORE_LIMIT = 4 * 2**30  # bytes of float32 features above which they are kept float16
KMEANS_CHUNK_BYTES = 2**30  # float32 features on device at once in global k-means
NO_LABEL = -1


class InitCodebookError(config_lib.ConfigError):
    """A config, dataset or output that init_codebook cannot work with."""


# ------------------------------------------------------------------------------------------------
# The images and their classes.


class LabeledRecords:
    """The train source's records as {"image", "name", "label", "index"}; `labels` holds every
    record's class up front where the source knows it without reading images (folder, photos),
    else None (TFDS: read with each record). `no_labels` says why there are none, if so."""

    def __init__(self, data_config):
        self.source = sources.make_source(data_config, "train")
        self.kind = data_config.source
        self.labels, self.num_classes, self.no_labels = _labels(self.source, self.kind)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        if self.kind == "tfds":
            # TfdsSource drops the label; its underlying data source (a private attribute of
            # data/sources.py) has it, read with the image in one access.
            record = self.source._source[index]  # pylint: disable=protected-access
            return {"image": record["image"], "name": f"train[{index}]", "index": index,
                    "label": int(record["label"]) if "label" in record else NO_LABEL}
        label = NO_LABEL if self.labels is None else int(self.labels[index])
        return {**self.source[index], "label": label, "index": index}


def _labels(source, kind: str) -> tuple[np.ndarray | None, int, str]:
    """(labels or None, number of classes, why there are none)."""
    if kind == "photos":  # each bundled photo is its own class
        names = [source[i]["name"] for i in range(len(source))]
        labels = np.array([sources.PHOTO_TRAIN.index(name) for name in names])
        return labels, len(sources.PHOTO_TRAIN), ""
    if kind == "folder":
        top = [os.path.relpath(p, source.root).split(os.sep) for p in source.paths]
        if any(len(parts) == 1 for parts in top):
            return None, 0, (f"{source.root} has images outside class folders (labels are the "
                             "top-level folder names)")
        classes = sorted({parts[0] for parts in top})
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[parts[0]] for parts in top]), len(classes), ""
    info = getattr(source._source, "dataset_info", None)  # pylint: disable=protected-access
    label = None
    if info is not None and "label" in info.features.keys():
        label = info.features["label"]
    if label is None or not hasattr(label, "num_classes"):
        return None, 0, f"TFDS dataset {source.name!r} has no class-label feature 'label'"
    return None, int(label.num_classes), ""


def image_indices(num_records: int, max_images: int, seed: int) -> np.ndarray:
    """All record indices, or a seeded random subset of `max_images` (sorted, for reads in
    order). A subset rather than the first records: folder sources are sorted by class."""
    if not max_images or max_images >= num_records:
        return np.arange(num_records)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_records, max_images, replace=False))


class _Subset:
    """`records` restricted to `indices` (a picklable grain source)."""

    def __init__(self, records, indices: np.ndarray):
        self.records, self.indices = records, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        return self.records[int(self.indices[position])]


class EncoderView(grain.transforms.Map):
    """Decode one record and crop it to the encoder's input: center crop, or with `crop_scale`
    the training pipeline's random crop, seeded by (seed, record index)."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float] | None, seed: int):
        self.image_size, self.crop_scale, self.seed = image_size, crop_scale, seed

    def map(self, record: dict):
        try:
            image, _ = decode_record(record)
        except BadImage as error:
            return BadRecord(name=record["name"], reason=str(error))
        if self.crop_scale is None:
            image = center_crop(image, self.image_size)
        else:
            rng = np.random.default_rng([self.seed, record["index"]])
            image = random_resized_crop(image, self.image_size, rng, self.crop_scale)
        return {"image": image, "label": record["label"]}


class ImageBatches:
    """(uint8 images [batch_size, S, S, 3] zero-padded, labels int32 [n], n) per batch of the
    records at `indices`; bad images are skipped, logged and counted in `num_bad`."""

    def __init__(self, records, indices, data_config, *, image_size: int, batch_size: int,
                 seed: int):
        crop_scale = tuple(data_config.crop_scale) if data_config.source == "photos" else None
        dataset = grain.MapDataset.source(_Subset(records, indices)).map(
            EncoderView(image_size, crop_scale, seed))
        self.dataset = dataset.to_iter_dataset(grain.ReadOptions(
            num_threads=data_config.read_threads,
            prefetch_buffer_size=data_config.prefetch_buffer))
        if data_config.num_workers > 0:
            self.dataset = self.dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=data_config.num_workers))
        self.batch_size = batch_size
        self.num_bad = 0

    def __iter__(self):
        images, labels = [], []
        for element in self.dataset:
            if isinstance(element, BadRecord):
                logging.warning("Skipping bad image %s: %s", element.name, element.reason)
                self.num_bad += 1
                continue
            images.append(element["image"])
            labels.append(element["label"])
            if len(images) == self.batch_size:
                yield _pad(images, self.batch_size), np.array(labels, np.int32), len(images)
                images, labels = [], []
        if images:
            yield _pad(images, self.batch_size), np.array(labels, np.int32), len(images)


def _pad(images: list, batch_size: int) -> np.ndarray:
    batch = np.zeros((batch_size, *images[0].shape), np.uint8)
    batch[:len(images)] = np.stack(images)
    return batch


# ------------------------------------------------------------------------------------------------
# The encoder and its pooled patch features.


@dataclasses.dataclass(frozen=True)
class Encoder:
    module: clip_vision.CLIPVision
    kind: str
    path: str  # "" for a random-init kind
    width: int  # the projected feature width
    grid: int  # patches per side

    @property
    def image_size(self) -> int:
        return self.module.image_size


def encoder_spec(config) -> tuple[teachers.TeacherKind, str, int, int]:
    """(kind, path, feature width, patch grid side) of `lc.init_encoder`, from its config.json
    alone (no weights read), so width problems surface before anything loads."""
    lc = config.model.lc
    try:
        spec = teachers.kind(lc.init_encoder)
    except ValueError as error:
        raise InitCodebookError(f"config.model.lc.init_encoder: {error}") from error
    if spec.family != "clip":
        raise InitCodebookError(
            f"config.model.lc.init_encoder={lc.init_encoder!r} is a {spec.family} tower; the "
            "codebook features are CLIP's projected patch tokens (spec §A.1). Use a clip_* kind "
            "(clip_vit_l14 as the paper, clip_tiny for CPU smoke runs).")
    sizes = dict(spec.sizes)
    if spec.is_random:
        if lc.init_encoder_path:
            raise InitCodebookError(f"config.model.lc.init_encoder={lc.init_encoder!r} is a "
                                    "random-init tower and takes no weights; clear "
                                    "config.model.lc.init_encoder_path.")
        # A random tower's projection keeps its width (no checkpoint says otherwise).
        return spec, "", sizes["hidden_size"], sizes["image_size"] // sizes["patch_size"]
    path = os.path.expanduser(lc.init_encoder_path) or spec.default_path()
    if not os.path.exists(path):
        raise weights.PretrainedError(
            f"config.model.lc.init_encoder={lc.init_encoder!r}: {path} does not exist. "
            f"{spec.how_to_get(path)} (or pass --config.model.lc.init_encoder_path=DIR).")
    hf_config = weights.read_config(path)
    found = clip_vision.sizes_from_hf_config(hf_config)
    differ = [f"{key} {found.get(key)} (expected {value})" for key, value in sizes.items()
              if found.get(key) != value]
    if differ:
        raise weights.PretrainedError(f"{path} is not a {lc.init_encoder} tower ({spec.hf_id}): "
                                      f"{', '.join(differ)}.")
    width = clip_vision.projection_dim_from_hf_config(hf_config)
    return spec, path, width, found["image_size"] // found["patch_size"]


def load_encoder(config, spec: teachers.TeacherKind, path: str, width: int,
                 grid: int) -> Encoder:
    name = config.model.lc.init_encoder
    if spec.is_random:
        logging.warning("Codebook features from a RANDOM-INIT %s tower (a smoke-run stand-in): "
                        "the codebook clusters random features. The paper's encoder is "
                        "clip_vit_l14.", name)
        module = clip_vision.random_init(spec.sizes, config.seed, projection_dim=width)
    else:
        logging.info("Codebook features from %s at %s", name, path)
        module = clip_vision.load_clip_vision(path, with_projection=True)
    return Encoder(module=module, kind=name, path=path, width=width, grid=grid)


def pooled_features(graphdef, params, images: jax.Array, *, grid: int, pool: int) -> jax.Array:
    """uint8 images [B, S, S, 3] -> pooled projected patch features [B, (grid/pool)^2, F]."""
    tower = nnx.merge(graphdef, params)
    pixels = clip_vision.preprocess(images.astype(jnp.float32) / 127.5 - 1.0, tower.image_size)
    patches = tower(pixels)["patch_embeds"]  # [B, grid^2, F], row-major
    batch, _, width = patches.shape
    cells = grid // pool
    # torch AvgPool2d(pool) on the grid: non-overlapping pool x pool windows.
    patches = patches.reshape(batch, cells, pool, cells, pool, width)
    return jnp.mean(patches, axis=(2, 4)).reshape(batch, cells * cells, width)


# ------------------------------------------------------------------------------------------------
# Checks before any compute.


@dataclasses.dataclass(frozen=True)
class Plan:
    clustering: str
    codebook_size: int
    num_classes: int  # 0 for global
    clusters_per_class: int  # 0 for global
    cells: int  # pooled features per image
    indices: np.ndarray  # records to read


def output_paths(output: str, overwrite: bool) -> tuple[str, str]:
    """(codebook .npy, manifest .json); refuses an existing codebook without `overwrite`."""
    if not output:
        raise InitCodebookError("--output=PATH.npy is required: where to write the codebook.")
    output = os.path.abspath(os.path.expanduser(output))
    if not output.endswith(".npy"):
        raise InitCodebookError(f"--output={output} must end in .npy (numpy's format, which "
                                "config.model.lc.codebook_path reads).")
    if os.path.exists(output) and not overwrite:
        raise InitCodebookError(f"{output} already exists; pass --overwrite to replace it, or "
                                "choose another --output.")
    return output, output[:-len(".npy")] + ".json"


def check_settings(config) -> None:
    lc = config.model.lc
    problems = []
    if config.model.quantizer != "lc":
        problems.append(f"config.model.quantizer={config.model.quantizer!r}: init_codebook "
                        "makes VQGAN-LC's codebook; use configs/lc.py (quantizer 'lc').")
    for key in ("init_pool", "init_iterations", "init_batch_size"):
        if lc[key] < 1:
            problems.append(f"config.model.lc.{key} must be >= 1, got {lc[key]}.")
    if lc.init_max_images < 0:
        problems.append(f"config.model.lc.init_max_images must be >= 0 (0 = all), got "
                        f"{lc.init_max_images}.")
    if problems:
        raise InitCodebookError("Invalid config:\n  " + "\n  ".join(problems))


def check_encoder(config, width: int, grid: int) -> int:
    """Pooled features per image; the encoder must fit lc.feature_dim and lc.init_pool."""
    lc = config.model.lc
    if width != lc.feature_dim:
        raise InitCodebookError(
            f"config.model.lc.feature_dim={lc.feature_dim}, but {lc.init_encoder}'s projected "
            f"patch features are {width}-d. Set --config.model.lc.feature_dim={width} (the "
            "codebook's width, which training reads too).")
    if grid % lc.init_pool:
        divisors = [d for d in range(1, grid + 1) if grid % d == 0]
        raise InitCodebookError(
            f"config.model.lc.init_pool={lc.init_pool} does not divide {lc.init_encoder}'s "
            f"{grid} x {grid} patch grid; use one of {divisors}.")
    return (grid // lc.init_pool) ** 2


def plan_clustering(config, records: LabeledRecords, cells: int) -> Plan:
    """What to cluster; per-class needs labels and a K that the classes divide."""
    lc, size = config.model.lc, config.model.codebook_size
    indices = image_indices(len(records), lc.init_max_images, config.seed)
    plan = Plan("global", size, 0, 0, cells, indices)
    if lc.init_clustering == "per_class":
        plan = _per_class_plan(records, size, cells, indices)
    if len(indices) * cells < size:
        raise InitCodebookError(
            f"{len(indices)} images x {cells} pooled features = {len(indices) * cells} "
            f"features, fewer than codebook_size={size} centers. Use more images "
            "(config.model.lc.init_max_images) or a smaller config.model.lc.init_pool.")
    if plan.clustering == "per_class" and records.labels is not None:
        check_class_sizes(records.labels[indices], plan)
    return plan


def _per_class_plan(records: LabeledRecords, size: int, cells: int, indices) -> Plan:
    if records.no_labels:
        raise InitCodebookError(
            f"config.model.lc.init_clustering='per_class' needs class labels, but "
            f"{records.no_labels}. Use --config.model.lc.init_clustering=global (one k-means "
            "over all features, for unlabeled data).")
    if size % records.num_classes:
        raise InitCodebookError(
            f"config.model.lc.init_clustering='per_class' splits codebook_size={size} over "
            f"{records.num_classes} classes, which does not divide it. Use a multiple of "
            f"{records.num_classes} (the paper: 100 x 1000 classes) or init_clustering=global.")
    return Plan("per_class", size, records.num_classes, size // records.num_classes, cells,
                indices)


def check_class_sizes(labels: np.ndarray, plan: Plan) -> None:
    """Every class needs at least clusters_per_class features."""
    counts = np.bincount(labels, minlength=plan.num_classes) * plan.cells
    short = np.flatnonzero(counts < plan.clusters_per_class)
    if short.size:
        raise InitCodebookError(
            f"Per-class k-means of {plan.clusters_per_class} centers per class: "
            f"{short.size} classes have fewer features (class {short[0]}: {counts[short[0]]}). "
            "Use more images (config.model.lc.init_max_images) or init_clustering=global.")


# ------------------------------------------------------------------------------------------------
# Extraction into a memmap, then clustering.


def feature_store(directory: str, num_features: int, width: int) -> np.memmap:
    """The on-disk [N, F] feature array (module docstring: float16 above 4 GiB of float32)."""
    dtype = np.float32 if num_features * width * 4 <= FLOAT32_STORE_LIMIT else np.float16
    logging.info("Pooled features: %d x %d %s (%.2f GB) in %s", num_features, width,
                 np.dtype(dtype).name, num_features * width * np.dtype(dtype).itemsize / 1e9,
                 directory)
    return np.lib.format.open_memmap(os.path.join(directory, "features.npy"), mode="w+",
                                     dtype=dtype, shape=(num_features, width))


def extract(config, encoder: Encoder, records, plan: Plan, store: np.memmap, mesh
            ) -> tuple[np.ndarray, int]:
    """Writes each good image's pooled features to `store` (in read order); returns their
    labels [images] (NO_LABEL where unknown) and the number of bad images skipped."""
    lc = config.model.lc
    batch_size = -(-lc.init_batch_size // mesh.size) * mesh.size
    graphdef, params = nnx.split(encoder.module, nnx.Param)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    params = jax.device_put(params, replicated)
    extract_batch = jax.jit(functools.partial(pooled_features, graphdef, grid=encoder.grid,
                                              pool=lc.init_pool),
                            in_shardings=(replicated, split), out_shardings=split)
    batches = ImageBatches(records, plan.indices, config.data, image_size=encoder.image_size,
                           batch_size=batch_size, seed=config.seed)
    labels, written, start = [], 0, time.time()
    num_batches = math.ceil(len(plan.indices) / batch_size)
    for number, (images, batch_labels, count) in enumerate(batches, 1):
        features = np.asarray(jax.device_get(extract_batch(params, images)))[:count]
        rows = slice(written * plan.cells, (written + count) * plan.cells)
        store[rows] = features.reshape(-1, encoder.width)
        labels.append(batch_labels)
        written += count
        if number % max(1, num_batches // 20) == 0 or number == num_batches:
            elapsed = time.time() - start
            logging.info("Features: %d/%d images, %.1f images/s, ETA %.0f s", written,
                         len(plan.indices), written / elapsed,
                         (len(plan.indices) - written) * elapsed / max(written, 1))
    store.flush()
    labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
    return labels, batches.num_bad


def cluster(config, features: np.ndarray, labels: np.ndarray, plan: Plan, mesh
            ) -> tuple[np.ndarray, float]:
    """(codebook [K, F] float32, total inertia)."""
    lc = config.model.lc
    run = functools.partial(
        kmeans.kmeans, num_iterations=lc.init_iterations, mesh=mesh, axis=AXIS,
        memory_budget_bytes=int(config.model.search_memory_mb * 2**20))
    if plan.clustering == "global":
        chunk = max(1, KMEANS_CHUNK_BYTES // (4 * features.shape[1]))
        result = run(features, plan.codebook_size, seed=config.seed, chunk_rows=chunk,
                     log_every=1)
        _log_result("global", result)
        return result.centers, result.inertia
    feature_labels = np.repeat(labels, plan.cells)
    check_class_sizes(labels, plan)  # TFDS labels are known only now
    order = np.argsort(feature_labels, kind="stable")
    bounds = np.searchsorted(feature_labels[order], np.arange(plan.num_classes + 1))
    centers, inertia = [], 0.0
    for label in range(plan.num_classes):
        rows = np.sort(order[bounds[label]:bounds[label + 1]])
        seed = int(np.random.SeedSequence([config.seed, label]).generate_state(1)[0])
        result = run(features[rows], plan.clusters_per_class, seed=seed)
        centers.append(result.centers)
        inertia += result.inertia
        if (label + 1) % max(1, plan.num_classes // 20) == 0 or label + 1 == plan.num_classes:
            logging.info("Per-class k-means: %d/%d classes", label + 1, plan.num_classes)
        if result.num_empty:
            logging.warning("Class %d: %d of %d clusters are empty (duplicate features).",
                            label, result.num_empty, plan.clusters_per_class)
    return np.concatenate(centers), inertia


def _log_result(what: str, result: kmeans.KMeansResult) -> None:
    logging.info("%s k-means: inertia %.6g after %d iterations, %d re-seeded, %d empty", what,
                 result.inertia, result.num_iterations, result.num_reseeded, result.num_empty)
    if result.num_empty:
        logging.warning("%d clusters are empty: the data has fewer distinct features than "
                        "centers.", result.num_empty)


# ------------------------------------------------------------------------------------------------
# The whole command.


def make_codebook(config, output: str, *, overwrite: bool = False,
                  mesh: jax.sharding.Mesh | None = None) -> dict:
    """Writes the codebook and its manifest (module docstring); returns the manifest."""
    start = time.time()
    codebook_path, manifest_path = output_paths(output, overwrite)
    check_settings(config)
    spec, path, width, grid = encoder_spec(config)
    cells = check_encoder(config, width, grid)
    records = LabeledRecords(config.data)
    plan = plan_clustering(config, records, cells)
    mesh = mesh or jax.make_mesh((jax.device_count(),), (AXIS,))
    encoder = load_encoder(config, spec, path, width, grid)
    with _scratch_dir(os.path.dirname(codebook_path)) as scratch:
        store = feature_store(scratch, len(plan.indices) * cells, width)
        labels, num_bad = extract(config, encoder, records, plan, store, mesh)
        features = store[:len(labels) * cells]
        codebook, inertia = cluster(config, features, labels, plan, mesh)
        manifest = _manifest(config, encoder, plan, len(labels), num_bad, store.dtype,
                             inertia, time.time() - start)
    _write(codebook_path, manifest_path, codebook, manifest)
    logging.info("Wrote %s %s and %s", codebook_path, codebook.shape, manifest_path)
    return manifest


@contextlib.contextmanager
def _scratch_dir(parent: str):
    os.makedirs(parent, exist_ok=True)
    directory = tempfile.mkdtemp(prefix=".init_codebook_features.", dir=parent)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _manifest(config, encoder: Encoder, plan: Plan, num_images: int, num_bad: int,
              store_dtype, inertia: float, seconds: float) -> dict:
    lc, data = config.model.lc, config.data
    return {
        "encoder": encoder.kind, "encoder_path": encoder.path, "feature_dim": encoder.width,
        "image_size": encoder.image_size, "patch_grid": encoder.grid, "pool": lc.init_pool,
        "features_per_image": plan.cells, "clustering": plan.clustering,
        "codebook_size": plan.codebook_size, "num_classes": plan.num_classes,
        "clusters_per_class": plan.clusters_per_class, "num_images": num_images,
        "num_bad_images": num_bad, "num_features": num_images * plan.cells,
        "kmeans_iterations": lc.init_iterations, "kmeans_init": "kmeans++",
        "inertia": inertia, "mean_squared_distance": inertia / max(num_images * plan.cells, 1),
        "seed": config.seed, "feature_storage": np.dtype(store_dtype).name,
        "data": {"source": data.source, "tfds_name": data.tfds_name,
                 "train_split": data.train_split, "train_dir": data.train_dir},
        "seconds": round(seconds, 1)}


def _write(codebook_path: str, manifest_path: str, codebook: np.ndarray, manifest: dict):
    if not np.all(np.isfinite(codebook)):
        raise InitCodebookError("k-means produced non-finite centers; the features hold NaN "
                                "or inf (check the encoder weights).")
    with atomic_write(codebook_path) as f:
        np.save(f, np.asarray(codebook, np.float32))
    with atomic_write(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)


def main(argv):
    del argv
    run_log.configure(run_log.RUN)
    if _CONFIG.value is None:
        sys.exit("error: --config=configs/lc.py[:preset] is required.")
    try:
        make_codebook(_CONFIG.value, _OUTPUT.value, overwrite=_OVERWRITE.value)
    except (config_lib.ConfigError, sources.DataError, weights.PretrainedError) as error:
        logging.error("%s", error)
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
