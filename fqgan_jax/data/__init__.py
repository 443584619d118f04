"""Input data: sources (TFDS, image folders, bundled photos), decoding/augmentation, grain
pipelines for training and evaluation."""

from fqgan_jax.data.pipeline import (
    DecodeOrSubstitute,
    EvalBatches,
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
    TrainAugment,
    adm_random_crop,
    center_crop,
    decode_image,
    decode_record,
    random_horizontal_flip,
    random_resized_crop,
)

__all__ = [
    "BadImage",
    "BadRecord",
    "DataError",
    "DecodeOrSubstitute",
    "EvalBatches",
    "EvalTransform",
    "IMAGE_EXTENSIONS",
    "ImageFolderSource",
    "PhotosSource",
    "SOURCES",
    "TfdsSource",
    "TrainAugment",
    "adm_random_crop",
    "center_crop",
    "decode_image",
    "decode_record",
    "describe",
    "make_eval_batches",
    "make_source",
    "make_train_iterator",
    "random_horizontal_flip",
    "random_resized_crop",
]
