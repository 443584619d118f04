"""Image decoding, ADM-style crops and the grain transforms built from them.

Decoding is ours (sources hand over raw bytes) so that every dataset gets the same conversion
rules, and a corrupt file is never an exception that kills a grain worker: training substitutes
the next good record for it, eval skips it as a `BadRecord` marker (see `pipeline.py`).

Crops follow the official FQGAN recipe, which inherits them from ADM (guided-diffusion):
`adm_random_crop` for training (fqgan.md §4.3) and `center_crop` for evaluation (§5.1). They are
re-implemented here from the spec's description and work on uint8 [H, W, 3] arrays. All
randomness comes from the per-element `np.random.Generator` that grain's `random_map` provides,
so the same seed and index always produce the same crop, whatever the worker layout.

Transforms are top-level, picklable classes because `mp_prefetch` spawns worker processes
(jax_stack.md §2.5).
"""

import io
import math
from typing import NamedTuple

import grain
import numpy as np
from PIL import Image

# Pillow modes holding more than 8 bits per sample; their values are 16-bit (I;16*) or, for
# "I", 32-bit integers that 16-bit PNGs and TIFFs decode into with a 0..65535 range.
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)


class BadImage(ValueError):
    """Raised for image data that cannot be decoded: corrupt, truncated or empty."""


class BadRecord(NamedTuple):
    """Marker a transform returns instead of an image, so bad data is skipped, not fatal."""

    name: str
    reason: str


def decode_image(data: bytes | np.ndarray) -> tuple[np.ndarray, bool]:
    """Decodes encoded bytes (or converts an array) to uint8 RGB.

    Returns `(image [H, W, 3] uint8, converted)`, where `converted` tells whether the source was
    not already 8-bit RGB. Conversions:
      * grayscale (L, 1, I;16, I) and palette (P) -> RGB by replicating / looking up;
      * 16-bit data -> 8-bit by scaling 0..65535 onto 0..255 (rounded), never by clipping;
      * images with alpha (RGBA, LA, transparent P) are composited onto WHITE. Dropping the alpha
        channel instead would expose whatever colour sits under transparent pixels (often black
        or garbage); white matches how such images are normally displayed;
      * CMYK, YCbCr, LAB, HSV -> RGB through Pillow.
    EXIF orientation is deliberately ignored, as in the official PIL-based loader.

    Raises:
      BadImage: for empty, corrupt or truncated data. Truncated files raise because Pillow's
        `ImageFile.LOAD_TRUNCATED_IMAGES` is False (checked by the pipeline) and we call
        `.load()` here instead of decoding lazily later.
    """
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and data.ndim == 3 and data.shape[-1] == 3:
            return data, False
        try:
            image = Image.fromarray(data)
        except (TypeError, ValueError) as error:
            raise BadImage(f"unsupported array {data.dtype}{list(data.shape)}: {error}") from error
        return _to_rgb_uint8(image, pillow_reduced_depth=False)
    image, pillow_reduced_depth = _open_fully(data)
    try:
        return _to_rgb_uint8(image, pillow_reduced_depth)
    except (OSError, ValueError) as error:  # e.g. a mode Pillow cannot convert
        raise BadImage(f"cannot convert mode {image.mode} to RGB: {error}") from error


def _open_fully(data: bytes) -> tuple[Image.Image, bool]:
    """Opens and fully decodes `data`, so that truncation surfaces here and not later."""
    if data is None or len(data) == 0:
        raise BadImage("zero-byte image data")
    try:
        image = Image.open(io.BytesIO(data))
        # Pillow turns 16-bit RGB(A) PNGs into 8-bit on its own (keeping the high byte, i.e.
        # scaling); its tile raw mode is the only trace of that, and it is gone after load().
        pillow_reduced_depth = any(";16" in str(tile.args) for tile in image.tile)
        image.load()
    except Image.DecompressionBombError as error:
        raise BadImage(f"image too large to decode safely: {error}") from error
    except Exception as error:  # pylint: disable=broad-except
        # Pillow's plugins raise many types on malformed input (OSError, SyntaxError,
        # struct.error, EOFError, IndexError...); all of them mean "this file is bad".
        raise BadImage(f"{type(error).__name__}: {error}") from error
    return image, pillow_reduced_depth


def _to_rgb_uint8(image: Image.Image, pillow_reduced_depth: bool) -> tuple[np.ndarray, bool]:
    if image.mode == "RGB":
        return np.asarray(image), pillow_reduced_depth
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) * (255.0 / 65535.0)
        gray = np.round(gray).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1), True
    has_alpha = image.mode in _ALPHA_MODES or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB")), True
    return np.asarray(image.convert("RGB")), True


def _adm_resize(image: Image.Image, short_side: int) -> Image.Image:
    """ADM resize (fqgan.md §4.3, §5.1): BOX-halve while the short side is still at least twice
    the target, then bicubic so that the short side equals `short_side` exactly."""
    while min(image.size) >= 2 * short_side:
        image = image.resize(tuple(size // 2 for size in image.size), resample=Image.BOX)
    scale = short_side / min(image.size)
    return image.resize(tuple(round(size * scale) for size in image.size),
                        resample=Image.BICUBIC)


def adm_random_crop(image: np.ndarray, image_size: int, rng: np.random.Generator,
                    crop_scale: tuple[float, float] = (0.8, 1.0)) -> np.ndarray:
    """ADM `random_crop_arr` (fqgan.md §4.3): resize the short side to a random integer in
    [ceil(S / max_scale), ceil(S / min_scale)] ([256, 320] for S=256), then a random S x S crop.
    """
    min_scale, max_scale = crop_scale
    short_side = int(rng.integers(math.ceil(image_size / max_scale),
                                  math.ceil(image_size / min_scale) + 1))
    resized = np.asarray(_adm_resize(Image.fromarray(image), short_side))
    top = int(rng.integers(resized.shape[0] - image_size + 1))
    left = int(rng.integers(resized.shape[1] - image_size + 1))
    return resized[top:top + image_size, left:left + image_size]


def random_resized_crop(image: np.ndarray, image_size: int, rng: np.random.Generator,
                        crop_scale: tuple[float, float]) -> np.ndarray:
    """A random square covering `crop_scale` (a fraction range) of the short side, resized to
    S x S. Used for the photos quickstart, where ADM's near-whole-image crops would leave only a
    handful of distinct training views."""
    height, width = image.shape[:2]
    side = round(float(rng.uniform(*crop_scale)) * min(height, width))
    side = min(max(side, 1), height, width)
    top = int(rng.integers(height - side + 1))
    left = int(rng.integers(width - side + 1))
    square = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(_adm_resize(square, image_size))


def center_crop(image: np.ndarray, image_size: int) -> np.ndarray:
    """ADM `center_crop_arr` (fqgan.md §5.1): resize the short side to S, center S x S crop."""
    resized = np.asarray(_adm_resize(Image.fromarray(image), image_size))
    top = (resized.shape[0] - image_size) // 2
    left = (resized.shape[1] - image_size) // 2
    return resized[top:top + image_size, left:left + image_size]


def random_horizontal_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors left-right with probability 1/2 (fqgan.md §4.3)."""
    return image[:, ::-1] if rng.random() < 0.5 else image


AUGMENTATIONS = {"adm": adm_random_crop, "crop": random_resized_crop}


def decode_record(record: dict) -> tuple[np.ndarray, bool]:
    """Decodes a source record; sources report unreadable files through an 'error' entry."""
    if record.get("error"):
        raise BadImage(record["error"])
    return decode_image(record["image"])


class TrainAugment(grain.transforms.RandomMap):
    """Augment and flip one decoded train element (see `pipeline.DecodeOrSubstitute`)."""

    def __init__(self, image_size: int, augment: str, crop_scale: tuple[float, float],
                 random_flip: bool):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"Unknown augment {augment!r}; expected one of "
                             f"{sorted(AUGMENTATIONS)}.")
        self.image_size = image_size
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.random_flip = random_flip

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = AUGMENTATIONS[self.augment](element["image"], self.image_size, rng,
                                            self.crop_scale)
        if self.random_flip:
            image = random_horizontal_flip(image, rng)
        return {**element, "image": image}


class EvalTransform(grain.transforms.Map):
    """Decode and center-crop one record (no randomness, spec §5.1)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def map(self, element: dict):
        try:
            image, converted = decode_record(element)
        except BadImage as error:
            return BadRecord(name=element["name"], reason=str(error))
        return {"image": center_crop(image, self.image_size), "converted": converted}
