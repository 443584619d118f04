"""Input data: sources (TFDS, image folders, bundled photos), decoding/augmentation, grain
pipelines for training and evaluation."""

from fqgan_jax.data.pipeline import (
    EvalBatches,
    SkipBadRecordsIterDataset,
    collate_train_batch,
    describe,
    make_eval_batches,
    make_train_iterator,
)
from fqgan_jax.data.sources import (
    IMAGE_EXTENSIONS,
    SOURCES,
    DataError,
    ImageFolderSource,
    PhotosSource,
    TfdsSource,
    make_source,
)
from fqgan_jax.data.transforms import (
    BadImage,
    BadRecord,
    EvalTransform,
    TrainTransform,
    adm_random_crop,
    center_crop,
    decode_image,
    random_horizontal_flip,
    random_resized_crop,
)

__all__ = [
    "BadImage",
    "BadRecord",
    "DataError",
    "EvalBatches",
    "EvalTransform",
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "PhotosSource",
    "SOURCES",
    "SkipBadRecordsIterDataset",
    "TfdsSource",
    "TrainTransform",
    "adm_random_crop",
    "center_crop",
    "collate_train_batch",
    "decode_image",
    "describe",
    "make_eval_batches",
    "make_source",
    "make_train_iterator",
    "random_horizontal_flip",
    "random_resized_crop",
]
