"""Tests for fqgan_jax.data: sources, decoding, ADM crops and the grain pipelines."""

import io
import json
import struct
import zlib

import grain
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageFile

from fqgan_jax import data
from fqgan_jax.data import sources


def make_data_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        source="photos", tfds_name="imagenet2012", tfds_data_dir="", train_split="train",
        eval_split="validation", train_dir="", eval_dir="", image_size=32, augment="crop",
        crop_scale=(0.15, 0.6), random_flip=True, num_workers=0, read_threads=2,
        prefetch_batches=2, prefetch_buffer=8))
    config.update(overrides)
    return config


def encode(image: Image.Image, image_format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **kwargs)
    return buffer.getvalue()


def encode_png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG (gray or RGB) written by hand: Pillow cannot write 16-bit RGB."""
    height, width, channels = array.shape
    color_type = {1: 0, 3: 2}[channels]
    rows = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def take(iterator, count: int) -> list[dict]:
    return [next(iterator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# Photos source


def test_photos_source_records_and_fixed_eval_set():
    train, evaluation = sources.PhotosSource("train"), sources.PhotosSource("eval")
    assert len(train) == len(sources.PHOTO_TRAIN) * sources.PHOTO_REPEATS
    record = train[0]
    assert record["image"].dtype == np.uint8 and record["image"].ndim == 3
    assert record["image"].shape[-1] == 3
    assert len(evaluation) == 32
    assert {evaluation[i]["name"].split("[")[0] for i in range(32)} == set(sources.PHOTO_EVAL)
    again = sources.PhotosSource("eval")
    for index in range(len(evaluation)):
        crop = evaluation[index]["image"]
        assert crop.shape[0] == crop.shape[1] and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, again[index]["image"])
    train_names = {train[i]["name"] for i in range(len(train))}
    assert not train_names & set(sources.PHOTO_EVAL)  # held-out photos never trained on


def test_photos_train_order_deterministic_per_seed():
    config = make_data_config()

    def first_batches(seed):
        iterator = data.make_train_iterator(config, global_batch_size=8, seed=seed)
        batches = take(iterator, 2)
        iterator.close()
        return np.stack([batch["image"] for batch in batches])

    first = first_batches(0)
    assert first.shape == (2, 8, 32, 32, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, first_batches(0))
    assert not np.array_equal(first, first_batches(1))


# ---------------------------------------------------------------------------------------------
# Decoding


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (8, 6))
    image.putpalette([200, 10, 10] * 256)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("encoded, expected_pixel", [
    (encode(Image.new("L", (8, 6), 77), "PNG"), (77, 77, 77)),
    (encode(Image.new("1", (8, 6), 1), "PNG"), (255, 255, 255)),
    (encode(Image.new("P", (8, 6), 3), "PNG"), None),
    (encode(_palette_with_transparency(), "PNG"), (255, 255, 255)),  # fully transparent
    (encode(Image.new("LA", (8, 6), (0, 0)), "PNG"), (255, 255, 255)),
    # Half-transparent red over white: (255 * a + 255 * (255 - a)) / 255 for R, 255 - a for G/B.
    (encode(Image.new("RGBA", (8, 6), (255, 0, 0, 128)), "PNG"), (255, 127, 127)),
    (encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)),
    (encode_png16(np.full((6, 8, 1), 65535, np.uint16)), (255, 255, 255)),
    (encode_png16(np.full((6, 8, 1), 32896, np.uint16)), (128, 128, 128)),  # scaled, not clipped
    (encode_png16(np.full((6, 8, 3), [65535, 32896, 256], np.uint16)), (255, 128, 1)),
    (encode(Image.fromarray(np.full((6, 8), 65535, np.int32)), "TIFF"), (255, 255, 255)),
], ids=["L", "1", "P", "P-transparent", "LA", "RGBA", "CMYK", "I16-max", "I16-mid", "RGB16",
        "I32"])
def test_decode_converts_to_rgb(encoded, expected_pixel):
    image, converted = data.decode_image(encoded)
    assert converted
    assert image.shape == (6, 8, 3) and image.dtype == np.uint8
    if expected_pixel is not None:
        assert tuple(image[3, 4]) == pytest.approx(expected_pixel, abs=1)


def test_decode_rgb_needs_no_conversion_and_cmyk_jpeg_decodes():
    rgb = random_rgb(6, 8)
    image, converted = data.decode_image(encode(Image.fromarray(rgb), "PNG"))
    np.testing.assert_array_equal(image, rgb)
    assert not converted
    passed_through, converted = data.decode_image(rgb)
    assert passed_through is rgb and not converted  # uint8 RGB arrays are not copied
    cmyk, converted = data.decode_image(encode(Image.new("CMYK", (8, 6), (0, 0, 0, 0)), "JPEG"))
    assert converted and cmyk.shape == (6, 8, 3)


def _truncated(image_format: str) -> bytes:
    encoded = encode(Image.fromarray(random_rgb(64, 64)), image_format)
    return encoded[:len(encoded) // 2]


@pytest.mark.parametrize("encoded", [
    b"", b"not an image at all" * 10, _truncated("JPEG"), _truncated("PNG"),
], ids=["zero-byte", "garbage", "truncated-jpeg", "truncated-png"])
def test_decode_rejects_bad_data(encoded):
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(data.BadImage):
        data.decode_image(encoded)


# ---------------------------------------------------------------------------------------------
# Image folder with bad and unusual files

# File name prefix -> kind: "good" (8-bit RGB), "conv" (decodes after conversion), "bad".
FOLDER_FILES = {
    "class_a/good_rgb.jpg": lambda: encode(Image.fromarray(random_rgb(40, 56, 1)), "JPEG"),
    "class_a/good_upper.PNG": lambda: encode(Image.fromarray(random_rgb(48, 36, 2)), "PNG"),
    "class_b/good_lossless.webp": lambda: encode(Image.fromarray(random_rgb(36, 36, 3)), "WEBP",
                                                 lossless=True),
    "class_b/deeper/good_nested.jpeg": lambda: encode(Image.fromarray(random_rgb(50, 40, 4)),
                                                      "JPEG"),
    "class_a/bad_corrupt.jpg": lambda: b"\xff\xd8\xff\xe0 definitely not a jpeg" * 5,
    "class_a/bad_truncated.jpg": lambda: _truncated("JPEG"),
    "class_b/bad_empty.png": lambda: b"",
    "class_c/conv_gray.png": lambda: encode(Image.new("L", (40, 40), 90), "PNG"),
    "class_c/conv_rgba.png": lambda: encode(Image.new("RGBA", (40, 44), (9, 9, 9, 100)), "PNG"),
    "class_c/conv_cmyk.jpg": lambda: encode(Image.new("CMYK", (44, 40), (5, 60, 9, 0)), "JPEG"),
    "class_c/conv_gray16.png": lambda: encode_png16(np.full((40, 40, 1), 4000, np.uint16)),
}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for relative, make_bytes in FOLDER_FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_bytes())
    (root / "class_a" / "notes.txt").write_text("not an image: ignored")
    return root


def _kind(source, index: int) -> str:
    return source[index]["name"].rsplit("/", 1)[-1].split("_")[0]


def _expected_rows(source, seed, num_positions):
    """Per stream position (num_skipped, num_converted, record name), by replaying the global
    shuffle: a bad record's position takes the next good record of the stream."""
    kinds = [_kind(source, index) for index in range(len(source))]
    order = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat(None)
    rows = []
    for position in range(num_positions):
        skipped = 0
        while kinds[order[position + skipped]] == "bad":
            skipped += 1
        record = order[position + skipped]
        rows.append((skipped, int(kinds[record] == "conv"), source[record]["name"]))
    return rows


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_train_substitutes_and_counts_bad_images_exactly(image_folder, num_workers):
    config = make_data_config(source="folder", train_dir=str(image_folder), augment="adm",
                              crop_scale=(0.8, 1.0), num_workers=num_workers)
    source = sources.make_source(config, "train")
    assert len(source) == len(FOLDER_FILES)  # notes.txt ignored, nested and .PNG found
    num_batches = 12  # several epochs, so every bad file is consumed often
    iterator = data.make_train_iterator(config, global_batch_size=3, seed=5)
    batches = take(iterator, num_batches)
    iterator.close()
    for batch in batches:
        assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.uint8
    actual = [(int(skipped), int(converted)) for batch in batches
              for skipped, converted in zip(batch["num_skipped"], batch["num_converted"])]
    expected = _expected_rows(source, 5, 3 * num_batches)
    assert actual == [row[:2] for row in expected]
    assert sum(skipped for skipped, _ in actual) > 0
    # A substitute is the next good record itself: the same pixels before augmentation.
    position = next(i for i, row in enumerate(expected) if row[0] > 0)
    name = expected[position][2]
    assert "bad_" not in name and name in {source[i]["name"] for i in range(len(source))}


def test_stream_of_only_bad_records_fails_clearly_instead_of_spinning():
    bad = [{"name": f"broken_{i}.jpg", "image": b""} for i in range(5)]
    stream = data.DecodeOrSubstitute(grain.MapDataset.source(bad).repeat(None),
                                     max_consecutive_bad=20)
    with pytest.raises(data.DataError, match="20 consecutive images could not be decoded"):
        stream[0]


def test_folder_eval_counts_each_good_image_once(image_folder):
    config = make_data_config(source="folder", eval_dir=str(image_folder))
    batches = list(data.make_eval_batches(config, batch_size=3))
    assert len(batches) == 4  # ceil(11 records / 3): bad records only shrink the last batch
    assert sum(int(batch["mask"].sum()) for batch in batches) == 8
    assert sum(batch["num_skipped"] for batch in batches) == 3
    source = sources.make_source(config, "eval")
    good = [i for i in range(len(source)) if "bad_" not in source[i]["name"]]
    # Indices are record numbers: a skipped image leaves a gap, it does not shift the rest.
    assert [i for b in batches for i in b["index"][b["mask"]]] == good
    for batch in batches:
        assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert not batch["image"][~batch["mask"]].any()  # padding rows are zeros


# ---------------------------------------------------------------------------------------------
# Configuration errors


def test_folder_errors_name_the_path_and_extensions(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    cases = [(empty, "contains no images"), (tmp_path / "missing", "does not exist"),
             (a_file, "is a file")]
    for root, problem in cases:
        config = make_data_config(source="folder", train_dir=str(root))
        with pytest.raises(data.DataError, match=problem) as error:
            data.make_train_iterator(config, global_batch_size=2, seed=0)
        assert str(root) in str(error.value) and ".webp" in str(error.value)
    with pytest.raises(data.DataError, match="eval_dir"):
        data.make_source(make_data_config(source="folder", train_dir=str(empty)), "eval")


def test_unknown_source_and_tfds_name_raise_data_error(tmp_path):
    with pytest.raises(data.DataError, match="valid sources: tfds, folder, photos"):
        data.make_source(make_data_config(source="webdataset"), "train")
    config = make_data_config(source="tfds", tfds_name="imagenet2013")
    with pytest.raises(data.DataError, match="imagenet2012") as error:
        data.make_source(config, "train")
    assert "array_record" in str(error.value) and "imagenet2013" in str(error.value)
    config = make_data_config(source="tfds", tfds_data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="not prepared as array_record"):
        data.make_source(config, "eval")


# ---------------------------------------------------------------------------------------------
# TFDS through tfds.testing.mock_data


def test_tfds_mock_train_and_eval():
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    config = make_data_config(source="tfds", augment="adm", crop_scale=(0.8, 1.0))
    with tfds.testing.mock_data(num_examples=10):
        assert "tfds imagenet2012: train 10 records" in data.describe(config)
        iterator = data.make_train_iterator(config, global_batch_size=4, seed=0)
        batches = take(iterator, 3)
        iterator.close()
        evaluation = list(data.make_eval_batches(config, batch_size=4))
    for batch in batches:
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert not batch["num_skipped"].any()
    assert [int(batch["mask"].sum()) for batch in evaluation] == [4, 4, 2]


# ---------------------------------------------------------------------------------------------
# Iterator state


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_round_trip(num_workers):
    config = make_data_config(num_workers=num_workers)
    iterator = data.make_train_iterator(config, global_batch_size=4, seed=3)
    assert isinstance(iterator, grain.DatasetIterator)
    take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # as the checkpoint's JSON holds it
    assert state == {"global_next_index": 12}
    expected = take(iterator, 3)
    iterator.close()
    restored = data.make_train_iterator(config, global_batch_size=4, seed=3)
    restored.set_state(state)
    for want, got in zip(expected, take(restored, 3)):
        for key in ("image", "num_skipped", "num_converted"):
            np.testing.assert_array_equal(want[key], got[key])
    restored.close()


def _global_batches(config, process_count, num_batches, state=None):
    """The global batches of `process_count` hosts (their parts concatenated in process
    order, as make_array_from_process_local_data lays them out), and the hosts' states."""
    iterators = [data.make_train_iterator(config, global_batch_size=8, seed=4,
                                          process_index=i, process_count=process_count)
                 for i in range(process_count)]
    if state is not None:
        for iterator in iterators:
            iterator.set_state(state)
    parts = [take(iterator, num_batches) for iterator in iterators]
    states = [iterator.get_state() for iterator in iterators]
    for iterator in iterators:
        iterator.close()
    return [np.concatenate([part[t]["image"] for part in parts]) for t in range(num_batches)], \
        states


def _rows(batch):
    """A global batch as the sorted multiset of its images (order within it aside)."""
    return sorted(image.tobytes() for image in batch)


def test_global_batches_and_resume_are_independent_of_the_host_count():
    """Every global batch holds the same images on 1, 2 or 4 hosts, and a position saved on 2
    hosts resumes on 1 or 4 with the batches an uninterrupted run would have had."""
    config = make_data_config(num_workers=0)
    one, _ = _global_batches(config, 1, 5)
    two, states = _global_batches(config, 2, 2)
    assert states[0] == states[1] == {"global_next_index": 16}  # the same on every host
    for t in range(2):
        assert _rows(two[t]) == _rows(one[t])
        assert not np.array_equal(two[t], one[t])  # the rows do come from different hosts
    for process_count in (1, 2, 4):
        resumed, _ = _global_batches(config, process_count, 3, state=states[0])
        for t in range(3):
            assert _rows(resumed[t]) == _rows(one[t + 2])
        if process_count == 2:  # the same host count: exactly the same batches
            again, _ = _global_batches(config, 2, 5)
            np.testing.assert_array_equal(np.stack(resumed), np.stack(again[2:]))
    with pytest.raises(ValueError, match="must divide by the process count"):
        data.make_train_iterator(config, global_batch_size=6, seed=0, process_count=4)


# ---------------------------------------------------------------------------------------------
# Augmentation


def _reference_adm_resize(image: np.ndarray, short_side: int) -> np.ndarray:
    """ADM's resize with PIL: BOX-halve while the short side is >= 2x, then bicubic."""
    pil_image = Image.fromarray(image)
    while min(*pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short_side / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    return np.array(pil_image)


def reference_random_crop_arr(image: np.ndarray, image_size: int, seed: int,
                              crop_scale=(0.8, 1.0)):
    """ADM random_crop_arr written directly with PIL, drawing from a Generator in ADM's order.
    Returns the crop and the short side it resized to."""
    rng = np.random.default_rng(seed)
    low = int(np.ceil(image_size / crop_scale[1]))
    high = int(np.ceil(image_size / crop_scale[0]))
    short_side = int(rng.integers(low, high + 1))
    array = _reference_adm_resize(image, short_side)
    top = int(rng.integers(array.shape[0] - image_size + 1))
    left = int(rng.integers(array.shape[1] - image_size + 1))
    return array[top:top + image_size, left:left + image_size], min(array.shape[:2])


def reference_center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
    """ADM center_crop_arr written directly with PIL."""
    array = _reference_adm_resize(image, image_size)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top:top + image_size, left:left + image_size]


def test_adm_random_crop_matches_reference_and_short_side_range():
    image = random_rgb(150, 203)
    short_sides = set()
    for seed in range(60):
        crop = data.adm_random_crop(image, 32, np.random.default_rng(seed), (0.8, 1.0))
        want, short_side = reference_random_crop_arr(image, 32, seed)
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
        np.testing.assert_array_equal(crop, want)
        short_sides.add(short_side)
    assert min(short_sides) == 32 and max(short_sides) == 40  # [S / 1.0, S / 0.8]
    astronaut = sources.load_photo("astronaut")  # 512^2 at S=256: short side in [256, 320]
    for seed in (0, 1):
        crop = data.adm_random_crop(astronaut, 256, np.random.default_rng(seed), (0.8, 1.0))
        want, short_side = reference_random_crop_arr(astronaut, 256, seed)
        np.testing.assert_array_equal(crop, want)
        assert crop.shape == (256, 256, 3) and 256 <= short_side <= 320


def test_random_horizontal_flip_flips_half_the_time():
    image = random_rgb(5, 7)
    outcomes = []
    for seed in range(40):
        flipped = data.random_horizontal_flip(image, np.random.default_rng(seed))
        mirrored = np.array_equal(flipped, image[:, ::-1])
        assert mirrored or np.array_equal(flipped, image)
        outcomes.append(mirrored)
    assert 5 < sum(outcomes) < 35
    transform = data.TrainAugment(16, "crop", (0.3, 0.9), random_flip=True)
    plain = data.TrainAugment(16, "crop", (0.3, 0.9), random_flip=False)
    record = {"image": random_rgb(40, 50), "name": "x"}
    flips = 0
    for seed in range(20):  # the flip draws after the crop, so the crop itself is unchanged
        with_flip = transform.random_map(record, np.random.default_rng(seed))["image"]
        without = plain.random_map(record, np.random.default_rng(seed))["image"]
        flips += np.array_equal(with_flip, without[:, ::-1]) and not np.array_equal(
            with_flip, without)
    assert 0 < flips < 20


@pytest.mark.parametrize("shape, image_size", [
    ((150, 203), 32), ((203, 150), 32), ((600, 401), 64), ((40, 40), 64), ((33, 90), 32),
])
def test_center_crop_matches_reference(shape, image_size):
    image = random_rgb(*shape)
    np.testing.assert_array_equal(data.center_crop(image, image_size),
                                  reference_center_crop_arr(image, image_size))


def test_random_resized_crop_shape_and_scale():
    image = random_rgb(60, 100)
    for seed in range(10):
        crop = data.random_resized_crop(image, 24, np.random.default_rng(seed), (0.2, 0.5))
        assert crop.shape == (24, 24, 3) and crop.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Eval batches


def test_eval_batches_pad_mask_and_cover_each_image_once():
    config = make_data_config()
    source = sources.PhotosSource("eval")
    expected = {data.center_crop(source[i]["image"], 32).tobytes() for i in range(len(source))}
    single = data.make_eval_batches(config, batch_size=12)
    batches = list(single)
    assert len(single) == 3 and [int(b["mask"].sum()) for b in batches] == [12, 12, 8]
    assert list(batches[-1]["mask"]) == [True] * 8 + [False] * 4
    for first, second in zip(batches, single):  # re-iterable and deterministic
        np.testing.assert_array_equal(first["image"], second["image"])
    assert list(batches[-1]["index"]) == list(range(24, 32)) + [-1] * 4
    seen, indices = [], []
    num_batches = set()
    for process_index in range(3):
        per_process = data.make_eval_batches(config, batch_size=5, process_index=process_index,
                                             process_count=3)
        process_batches = list(per_process)
        num_batches.add(len(process_batches))
        for batch in process_batches:
            seen.extend(image.tobytes() for image in batch["image"][batch["mask"]])
            indices.extend(batch["index"][batch["mask"]])
            for index, image in zip(batch["index"][batch["mask"]], batch["image"][batch["mask"]]):
                assert image.tobytes() == data.center_crop(source[index]["image"], 32).tobytes()
            assert (batch["index"][~batch["mask"]] == -1).all()
    assert num_batches == {3}  # ceil(ceil(32 / 3) / 5): equal on every process
    assert len(seen) == 32 and set(seen) == expected
    assert sorted(indices) == list(range(32))  # each record's own index, on every host count
    subset = list(data.make_eval_batches(config, batch_size=5, num_images=7))
    assert [int(b["mask"].sum()) for b in subset] == [5, 2]


def test_describe_photos_and_folder(image_folder):
    assert data.describe(make_data_config()).startswith(
        "photos: 6 train photos (384 records per epoch), 32 eval crops at 32px")
    folder = make_data_config(source="folder", train_dir=str(image_folder),
                              eval_dir=str(image_folder))
    assert f"folder: train {image_folder} (11 images)" in data.describe(folder)
