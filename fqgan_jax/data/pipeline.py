"""grain input pipelines: an infinite, checkpointable train iterator and finite eval batches.

Train (jax_stack.md §2.5):
    MapDataset.source -> seed/shuffle -> repeat(None) -> [process_index::process_count]
    -> random_map(decode + augment)            # bad data -> BadRecord marker, never an exception
    -> to_iter_dataset(ReadOptions)            # threads decode in parallel
    -> SkipBadRecordsIterDataset               # drops markers, attaches per-element counts
    -> batch(drop_remainder, collate_train_batch)  # sums the counts per batch
    -> mp_prefetch(num_workers)                # optional worker processes

Bad images are skipped where they are consumed, so each batch reports exactly the bad and
converted records consumed to produce it, even when several worker processes produce batches
in turn; the trainer sums these numbers. The skipping iterator keeps no buffer, so its state is
its parent's state and grain's `get_state()`/`set_state()` (and hence
`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume the exact same batches.
"""

import math
from typing import Iterator, Sequence

from absl import logging
import grain
import numpy as np
from PIL import ImageFile

from fqgan_jax.data import sources
from fqgan_jax.data.transforms import BadRecord, EvalTransform, TrainTransform

# An infinite train stream that yields nothing but bad records would otherwise spin forever.
MAX_CONSECUTIVE_BAD_RECORDS = 1000


class SkipBadRecordsIterDataset(grain.IterDataset):
    """Drops `BadRecord` markers (logging each) and annotates the next good element with how
    many markers preceded it ('num_skipped') and whether it was converted ('num_converted')."""

    def __init__(self, parent: grain.IterDataset,
                 max_consecutive_bad: int = MAX_CONSECUTIVE_BAD_RECORDS):
        super().__init__(parent)
        self._max_consecutive_bad = max_consecutive_bad

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipBadRecordsIterator(self._parent.__iter__(), self._max_consecutive_bad)

    def __str__(self) -> str:
        return "SkipBadRecordsIterDataset"


class _SkipBadRecordsIterator(grain.DatasetIterator):
    """Stateless apart from its parent: a marker is consumed and counted in the same call that
    returns the following good element, so no count is ever lost across a checkpoint."""

    def __init__(self, parent: grain.DatasetIterator, max_consecutive_bad: int):
        super().__init__(parent)
        self._max_consecutive_bad = max_consecutive_bad

    def __next__(self) -> dict:
        num_skipped = 0
        while True:
            element = next(self._parent)
            if not isinstance(element, BadRecord):
                return {"image": element["image"], "num_skipped": num_skipped,
                        "num_converted": int(element["converted"])}
            num_skipped += 1
            logging.warning("Skipping bad image %s: %s", element.name, element.reason)
            if num_skipped >= self._max_consecutive_bad:
                raise sources.DataError(
                    f"{num_skipped} consecutive images could not be decoded (last: "
                    f"{element.name}: {element.reason}). Check that the data is images.")

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return "SkipBadRecordsDatasetIterator"


def collate_train_batch(elements: Sequence[dict]) -> dict:
    """Stacks images and sums the per-element counts (top-level: pickled into workers)."""
    return {"image": np.stack([element["image"] for element in elements]),
            "num_skipped": sum(element["num_skipped"] for element in elements),
            "num_converted": sum(element["num_converted"] for element in elements)}


def _check_pipeline_args(batch_size: int, process_index: int, process_count: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive per-process batch, got {batch_size}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With this Pillow flag set, truncated files decode silently as partly grey images.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (something set it "
                           "globally); truncated images would be trained on. Leave it False.")


def make_train_iterator(data_config, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """Infinite iterator of `{"image": uint8 [batch_size, S, S, 3], "num_skipped": int,
    "num_converted": int}`, where `batch_size` is per process. Deterministic per seed (and per
    num_workers); checkpoint it with `grain.checkpoint.CheckpointSave/CheckpointRestore`."""
    _check_pipeline_args(batch_size, process_index, process_count)
    source = sources.make_source(data_config, "train")
    transform = TrainTransform(data_config.image_size, data_config.augment,
                               data_config.crop_scale, data_config.random_flip)
    # Global shuffle, then host slicing: every process sees a disjoint part of one permutation.
    dataset = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    dataset = dataset[process_index::process_count].random_map(transform)
    dataset = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=data_config.read_threads, prefetch_buffer_size=data_config.prefetch_buffer))
    dataset = SkipBadRecordsIterDataset(dataset).batch(
        batch_size, drop_remainder=True, batch_fn=collate_train_batch)
    if data_config.num_workers > 0:
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=data_config.num_workers))
    return iter(dataset)


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
