"""Random-access image sources: TFDS ArrayRecord datasets, image folders and bundled photos.

Every source is a picklable sequence (`__len__`, `__getitem__`) of records
`{"image": bytes | uint8 ndarray, "name": str}`; grain's `MapDataset.source` reads it by index and
pickles it into `mp_prefetch` workers (jax_stack.md §2.5). Sources never decode: `transforms.py`
does, so that corrupt data is skipped and counted in one place. A source that cannot read a file
puts the reason into an `"error"` entry instead of raising inside a grain worker.

`make_source` validates everything it can (dataset names, splits, folders) up front, so that a
typo fails in seconds with a `DataError` naming the fix, before any model is compiled.
"""

import difflib
import functools
import os

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
SOURCES = ("tfds", "folder", "photos")
SPLITS = ("train", "eval")


class DataError(ValueError):
    """The configured data cannot be used; the message names the problem and the fix."""


class TfdsSource:
    """A prepared TFDS dataset read through `tfds.data_source` (no TensorFlow needed).

    The 'image' feature is read with `SkipDecoding`, so records carry the encoded bytes and our
    own decoder handles conversion and bad files (jax_stack.md §2.6).
    """

    def __init__(self, name: str, split: str, data_dir: str = ""):
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        self.name, self.split = name, split
        self._source = _open_tfds(tfds, name, split, data_dir or None)
        if len(self._source) == 0:
            raise DataError(f"TFDS dataset {name!r} split {split!r} is empty.")
        features = set(self._source[0])
        if "image" not in features:
            raise DataError(f"TFDS dataset {name!r} has no 'image' feature (it has "
                            f"{sorted(features)}); choose an image dataset.")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[index]
        name = record.get("file_name")
        name = _as_text(name) if name is not None else f"{self.name}/{self.split}[{index}]"
        return {"image": record["image"], "name": name}


def _open_tfds(tfds, name: str, split: str, data_dir: str | None):
    """`tfds.data_source` with our error messages; `download=False` because preparation needs
    TensorFlow and, for ImageNet, manual downloads (jax_stack.md §2.6)."""
    where = data_dir or "the TFDS default data dir"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        matches = difflib.get_close_matches(base, sorted(set(tfds.list_builders())), n=5)
        suggestion = f" Close matches: {', '.join(matches)}." if matches else ""
        raise DataError(
            f"Unknown TFDS dataset {name!r}.{suggestion} Fix config.data.tfds_name; any TFDS "
            f"image dataset works once prepared as array_record in an environment with "
            f"TensorFlow (`tfds build NAME --file_format=array_record --data_dir=DIR`) and "
            f"config.data.tfds_data_dir=DIR points at it.") from None  # TFDS lists ~1,300 names
    except ValueError as error:
        if "split" not in str(error).lower():
            raise
        raise DataError(f"TFDS dataset {name!r} has no split {split!r}: {error} Set "
                        f"config.data.train_split / eval_split accordingly.") from error
    except (NotImplementedError, OSError) as error:  # OSError covers FileNotFoundError
        raise DataError(
            f"TFDS dataset {name!r} split {split!r} is not prepared as array_record in {where}. "
            f"Prepare it in an environment with TensorFlow: `tfds build {name} "
            f"--file_format=array_record --data_dir=DIR`, then set config.data.tfds_data_dir=DIR."
            f" (TFDS said: {type(error).__name__}: {error})") from error


def _as_text(value) -> str:
    value = np.asarray(value).item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ImageFolderSource:
    """All jpg/jpeg/png/webp files under `root` (any depth), sorted for a deterministic order."""

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        accepted = ", ".join(IMAGE_EXTENSIONS)
        if not os.path.exists(self.root):
            raise DataError(f"Image folder {self.root} does not exist. Point config.data."
                            f"train_dir / eval_dir at a folder of {accepted} images.")
        if not os.path.isdir(self.root):
            raise DataError(f"Image folder {self.root} is a file, not a folder. Point config."
                            f"data.train_dir / eval_dir at a folder of {accepted} images.")
        self.paths = _scan_images(self.root)
        if not self.paths:
            raise DataError(f"Image folder {self.root} contains no images with extensions "
                            f"{accepted} (searched recursively, case-insensitive).")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        name = os.path.relpath(path, self.root)
        try:
            # Bytes are read lazily, in the worker that decodes them.
            with open(path, "rb") as image_file:
                return {"image": image_file.read(), "name": name}
        except OSError as error:  # vanished or unreadable file: skip it, don't kill the worker
            return {"image": b"", "name": name, "error": f"unreadable: {error}"}


def _scan_images(root: str) -> list[str]:
    paths = []
    for directory, subdirectories, files in os.walk(root, followlinks=True):
        subdirectories.sort()
        paths.extend(os.path.join(directory, name) for name in files
                     if name.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(paths)


# Bundled scikit-image RGB photos (no download). Two whole photos are held out for eval so the
# quickstart measures reconstruction on images the tokenizer never saw.
PHOTO_TRAIN = ("astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
               "stereo_motorcycle")
PHOTO_EVAL = ("chelsea", "rocket")
PHOTO_REPEATS = 64  # virtual train epoch: 6 photos x 64 = 384 records
PHOTO_EVAL_GRID = 4  # 4 x 4 grid of crops per held-out photo: 32 eval images


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One bundled photo as uint8 RGB, cached per process (workers load their own copy)."""
    from skimage import data as skimage_data  # pylint: disable=import-outside-toplevel
    photo = getattr(skimage_data, name)()
    if isinstance(photo, tuple):  # stereo_motorcycle returns (left, right, disparity)
        photo = photo[0]
    return np.ascontiguousarray(photo[..., :3], dtype=np.uint8)


class PhotosSource:
    """The CPU quickstart data set: bundled photos, repeated for train, fixed crops for eval.

    Train records are whole photos (the random crop happens in the transform). Eval records are
    a fixed grid of square crops, each half the photo's short side, so eval is reproducible.
    """

    def __init__(self, split: str):
        if split not in SPLITS:
            raise DataError(f"Unknown photos split {split!r}; expected one of {SPLITS}.")
        self.split = split
        if split == "train":
            self._items = [(name, None) for name in PHOTO_TRAIN] * PHOTO_REPEATS
        else:
            self._items = [(name, box) for name in PHOTO_EVAL for box in _grid_boxes(name)]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        name, box = self._items[index]
        photo = load_photo(name)
        if box is None:
            return {"image": photo, "name": name}
        top, left, side = box
        return {"image": photo[top:top + side, left:left + side],
                "name": f"{name}[{top}:{top + side},{left}:{left + side}]"}


def _grid_boxes(name: str) -> list[tuple[int, int, int]]:
    """Evenly spaced (top, left, side) squares covering the photo, row-major."""
    height, width = load_photo(name).shape[:2]
    side = min(height, width) // 2
    tops = np.linspace(0, height - side, PHOTO_EVAL_GRID).round().astype(int)
    lefts = np.linspace(0, width - side, PHOTO_EVAL_GRID).round().astype(int)
    return [(int(top), int(left), side) for top in tops for left in lefts]


def make_source(data_config, split: str):
    """The source for `split` ("train" | "eval") of `config.data`; raises `DataError` early."""
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; expected one of {SPLITS}.")
    source = data_config.source
    if source == "tfds":
        tfds_split = data_config.train_split if split == "train" else data_config.eval_split
        return TfdsSource(data_config.tfds_name, tfds_split, data_config.tfds_data_dir)
    if source == "folder":
        root = data_config.train_dir if split == "train" else data_config.eval_dir
        if not root:
            key = "train_dir" if split == "train" else "eval_dir"
            raise DataError(f"config.data.source='folder' needs config.data.{key}: a folder "
                            f"of {', '.join(IMAGE_EXTENSIONS)} images (nested folders are fine).")
        return ImageFolderSource(root)
    if source == "photos":
        return PhotosSource(split)
    raise DataError(f"Unknown config.data.source {source!r}; valid sources: "
                    f"{', '.join(SOURCES)}.")
