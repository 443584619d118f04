"""grain input pipelines: an elastic, checkpointable train iterator and finite eval batches.

Train (jax_stack.md §2.5):
    MapDataset.source -> seed/shuffle -> repeat(None)   # one global permutation per epoch
    -> DecodeOrSubstitute                   # a bad record is replaced by the next good one
    -> random_map(TrainAugment)             # crop/flip keyed by the global position
    -> grain.experimental.ElasticIterator   # host slice [next + process_index::process_count],
                                            # batch, threads, optional worker processes

The iterator's whole state is the global position `{"global_next_index": n}`, the same on every
host. Global batch t always holds the records at positions [t * B, (t + 1) * B) of the
permutation, whatever the number of hosts, so a checkpoint resumes on any host count with the
same records in every later batch (exactly the same batches on the same host count). Reads are
whole host batches: `data.read_threads` at once and `data.prefetch_batches` buffered, per process
or per worker (`data.num_workers`); workers take turns by batch, so they do not change the order.

A bad record (corrupt, truncated, empty) never stops training and never shifts the stream: its
position gets the next good record of the permutation instead, decoded afresh and augmented with
that position's randomness. Each element counts the bad records it stood in for
('num_skipped') and whether it was converted ('num_converted'); batches carry these per row.
"""

import math
from typing import Iterator

import grain
import numpy as np
from absl import logging
from PIL import ImageFile

from fqgan_jax.data import sources
from fqgan_jax.data.transforms import (
    BadImage,
    BadRecord,
    EvalTransform,
    TrainAugment,
    decode_record,
)

# A stream with nothing but bad records would otherwise search for a good one forever.
MAX_CONSECUTIVE_BAD_RECORDS = 1000


class DecodeOrSubstitute(grain.MapDataset):
    """Position i -> `{"image", "num_converted", "num_skipped"}`: the decoded record at i, or, when
    it is bad, the first good record at i + 1, i + 2, ... ('num_skipped' = how many were bad).

    One element per position keeps the stream's positions fixed (no filter), which makes the
    iterator state a plain global index (`grain.experimental.ElasticIterator`). The cost: a
    substitute appears twice in the epoch, once at its own position; bad records are rare."""

    def __init__(self, parent: grain.MapDataset,
                 max_consecutive_bad: int = MAX_CONSECUTIVE_BAD_RECORDS):
        super().__init__(parent)
        self._max_consecutive_bad = max_consecutive_bad

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        for offset in range(self._max_consecutive_bad):
            record = self._parent[index + offset]
            try:
                image, converted = decode_record(record)
            except BadImage as error:
                logging.warning("Skipping bad image %s: %s", record["name"], error)
                continue
            return {"image": image, "num_converted": int(converted), "num_skipped": offset}
        raise sources.DataError(
            f"{self._max_consecutive_bad} consecutive images could not be decoded (last: "
            f"{record['name']}). Check that the data is images.")

    def __str__(self) -> str:
        return "DecodeOrSubstitute"


def _check_pipeline_args(batch_size: int, process_index: int, process_count: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive per-process batch, got {batch_size}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this Pillow flag set, truncated files decode silently as partly grey images.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (something set it "
                           "globally); truncated images would be trained on. Leave it False.")


def make_train_iterator(data_config, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Infinite iterator of this process's part of each global batch: `{"image": uint8 [b, S, S,
    3], "num_skipped": int [b], "num_converted": int [b]}` with b = global_batch_size /
    process_count. Deterministic per seed; `get_state()` / `set_state()` give the global
    position, valid on any process count (module docstring)."""
    if global_batch_size % process_count:
        raise ValueError(f"The global batch ({global_batch_size}) must divide by the process "
                         f"count ({process_count}).")
    _check_pipeline_args(global_batch_size // process_count, process_index, process_count)
    source = sources.make_source(data_config, "train")
    augment = TrainAugment(data_config.image_size, data_config.augment, data_config.crop_scale,
                           data_config.random_flip)
    dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    dataset = DecodeOrSubstitute(dataset).random_map(augment)
    workers = None
    if data_config.num_workers > 0:
        workers = grain.MultiprocessingOptions(num_workers=data_config.num_workers)
    elastic = grain.experimental.ElasticIterator(
        dataset, global_batch_size,
        grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count),
        # ElasticIterator batches before it reads: each read (thread) is a whole host batch.
        read_options=grain.ReadOptions(num_threads=data_config.read_threads,
                                       prefetch_buffer_size=data_config.prefetch_batches),
        multiprocessing_options=workers)
    return iter(elastic)


class EvalBatches:
    """Finite, re-iterable eval batches `{"image": uint8 [b, S, S, 3], "mask": bool [b],
    "index": int32 [b], "num_skipped": int}`; `index` is each image's record number in the eval
    split (-1 on padding rows), which fixes e.g. its Inception Score split on any host count.

    Each process takes `[process_index::process_count]` of the first `num_images` records and
    center-crops them (spec §5.1). Every process yields the same number of batches (`len(self)`),
    padding with mask=False rows, because each eval step is one SPMD program over all hosts.
    Bad images are skipped, logged and counted in 'num_skipped' of the batch that consumed them.
    """

    def __init__(self, data_config, *, batch_size: int, num_images: int | None = None,
                 process_index: int = 0, process_count: int = 1):
        _check_pipeline_args(batch_size, process_index, process_count)
        source = sources.make_source(data_config, "eval")
        if num_images is not None and num_images < 1:
            raise ValueError(f"num_images must be positive or None (all), got {num_images}.")
        self.num_images = len(source) if num_images is None else min(num_images, len(source))
        self.batch_size = batch_size
        self.image_size = data_config.image_size
        self._read_options = grain.ReadOptions(
            num_threads=data_config.read_threads,
            prefetch_buffer_size=data_config.prefetch_buffer)
        dataset = grain.MapDataset.source(source)[:self.num_images]
        self._dataset = dataset[process_index::process_count].map(
            EvalTransform(data_config.image_size))
        self._process_index, self._process_count = process_index, process_count
        self._num_batches = math.ceil(math.ceil(self.num_images / process_count) / batch_size)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[dict]:
        elements = self._dataset.to_iter_dataset(self._read_options).__iter__()
        try:
            yield from self._batches(elements)
        finally:  # also runs when a caller abandons the generator early
            elements.close()

    def _batches(self, elements: Iterator) -> Iterator[dict]:
        images, indices, num_skipped, total_skipped, num_yielded = [], [], 0, 0, 0
        for position, element in enumerate(elements):
            if isinstance(element, BadRecord):
                logging.warning("Skipping bad eval image %s: %s", element.name, element.reason)
                num_skipped += 1
                total_skipped += 1
                continue
            images.append(element["image"])
            indices.append(self._process_index + position * self._process_count)
            if len(images) == self.batch_size:
                yield self._make_batch(images, indices, num_skipped)
                images, indices, num_skipped, num_yielded = [], [], 0, num_yielded + 1
        # Pad up to the shared batch count. Trailing skips always land in a yielded batch: a
        # process never has more than len(self) * batch_size records, so if all batches were
        # already full there were no bad records left to count.
        for _ in range(self._num_batches - num_yielded):
            yield self._make_batch(images, indices, num_skipped)
            images, indices, num_skipped = [], [], 0
        if total_skipped:
            logging.warning("Eval skipped %d bad images in this process.", total_skipped)

    def _make_batch(self, images: list, indices: list, num_skipped: int) -> dict:
        padded = np.zeros((self.batch_size, self.image_size, self.image_size, 3), np.uint8)
        index = np.full((self.batch_size,), -1, np.int32)
        if images:
            padded[:len(images)] = np.stack(images)
            index[:len(images)] = indices
        mask = np.arange(self.batch_size) < len(images)
        return {"image": padded, "mask": mask, "index": index, "num_skipped": num_skipped}


def make_eval_batches(data_config, *, batch_size: int, num_images: int | None = None,
                      process_index: int = 0, process_count: int = 1) -> EvalBatches:
    """Finite eval batches over the eval split; see `EvalBatches`."""
    return EvalBatches(data_config, batch_size=batch_size, num_images=num_images,
                       process_index=process_index, process_count=process_count)


def describe(data_config) -> str:
    """One line for the logs, e.g. "tfds imagenet2012: train 1,281,167 records, ..."."""
    train = sources.make_source(data_config, "train")
    evaluation = sources.make_source(data_config, "eval")
    where = f"at {data_config.image_size}px, augment={data_config.augment}"
    if data_config.source == "photos":
        return (f"photos: {len(sources.PHOTO_TRAIN)} train photos ({len(train):,} records per "
                f"epoch), {len(evaluation)} eval crops {where}")
    if data_config.source == "folder":
        return (f"folder: train {train.root} ({len(train):,} images), eval {evaluation.root} "
                f"({len(evaluation):,} images) {where}")
    return (f"tfds {data_config.tfds_name}: {data_config.train_split} {len(train):,} records, "
            f"{data_config.eval_split} {len(evaluation):,} records {where}")
