"""Parity of the JAX PSNR / SSIM / uint8 conversion with skimage and the official formulas (§5.1),
plus the host-side grid / PNG helpers."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image
from skimage import data, filters, metrics

from fqgan_jax.data import pixels
from fqgan_jax.eval import image_grid, image_metrics

_SHAPES = [(7, 7), (16, 24), (37, 80), (64, 64), (128, 96)]


def _astronaut01() -> np.ndarray:
    return data.astronaut().astype(np.float64) / 255.0  # 512x512x3 natural image


def _image_pairs(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[10, H, W, 3] float64 reference / distorted pairs covering natural and random content."""
    rng = np.random.default_rng(seed)
    astro = _astronaut01()
    crops = np.stack([astro[60 * i : 60 * i + height, 90 * i : 90 * i + width] for i in range(3)])
    noisy = np.clip(crops + rng.normal(0.0, 0.05, crops.shape), 0.0, 1.0)
    blurred = np.stack([filters.gaussian(c, sigma=1.5, channel_axis=-1) for c in crops])
    quantized = np.round(noisy * 255.0) / 255.0  # the uint8 / 255 path of the protocol
    rand_a, rand_b = rng.uniform(size=(2, 2, height, width, 3))
    # Nearly flat images stress float32 cancellation in the variance terms.
    flat = np.full((1, height, width, 3), 0.5)
    flat_noisy = flat + rng.normal(0.0, 1e-3, flat.shape)
    ref = np.concatenate([crops, crops, crops, rand_a, flat])
    rec = np.concatenate([noisy, blurred, quantized, rand_b, flat_noisy])
    return ref, rec


def _sk_psnr(ref: np.ndarray, rec: np.ndarray) -> np.ndarray:
    pairs = zip(ref, rec, strict=True)
    return np.array([metrics.peak_signal_noise_ratio(a, b, data_range=1) for a, b in pairs])


def _sk_ssim(ref: np.ndarray, rec: np.ndarray, data_range: float) -> np.ndarray:
    return np.array(
        [
            metrics.structural_similarity(a, b, channel_axis=-1, data_range=data_range)
            for a, b in zip(ref, rec, strict=True)
        ]
    )


_jit_psnr = jax.jit(image_metrics.psnr)
_jit_ssim = jax.jit(image_metrics.ssim, static_argnames="data_range")


@pytest.mark.parametrize("shape", _SHAPES)
def test_psnr_matches_skimage(shape):
    ref, rec = _image_pairs(*shape)
    ours = np.asarray(_jit_psnr(ref, rec))
    assert ours.shape == (ref.shape[0],)
    np.testing.assert_allclose(ours, _sk_psnr(ref, rec), rtol=0, atol=1e-4)


@pytest.mark.parametrize("data_range", [1.0, 2.0])
@pytest.mark.parametrize("shape", _SHAPES)
def test_ssim_matches_skimage(shape, data_range):
    ref, rec = _image_pairs(*shape)
    ours = np.asarray(_jit_ssim(ref, rec, data_range=data_range))
    assert ours.shape == (ref.shape[0],)
    np.testing.assert_allclose(ours, _sk_ssim(ref, rec, data_range), rtol=0, atol=1e-5)


def test_official_data_range_bug_inflates_ssim():
    # Spec §5.1: data_range=2.0 on [0, 1] images shrinks the relative effect of distortion.
    ref, rec = _image_pairs(64, 64)
    correct = np.asarray(_jit_ssim(ref, rec, data_range=1.0))
    official = np.asarray(_jit_ssim(ref, rec, data_range=2.0))
    assert np.all(official > correct)


def test_identical_images():
    ref, _ = _image_pairs(32, 48)
    np.testing.assert_allclose(np.asarray(_jit_ssim(ref, ref)), 1.0, rtol=0, atol=1e-6)
    assert np.all(np.isposinf(np.asarray(_jit_psnr(ref, ref))))
    with np.errstate(divide="ignore"):
        assert np.all(np.isposinf(_sk_psnr(ref[:1], ref[:1])))  # skimage agrees on inf


def test_metrics_decrease_with_noise_level():
    rng = np.random.default_rng(1)
    crop = _astronaut01()[:96, 128:224]
    sigmas = [0.01, 0.03, 0.1, 0.3]
    noise = rng.normal(size=crop.shape)
    ref = np.stack([crop] * len(sigmas))
    rec = np.stack([np.clip(crop + s * noise, 0.0, 1.0) for s in sigmas])
    assert np.all(np.diff(np.asarray(_jit_psnr(ref, rec))) < 0)
    assert np.all(np.diff(np.asarray(_jit_ssim(ref, rec))) < 0)


def test_input_validation():
    small = np.zeros((1, 6, 32, 3), np.float32)
    with pytest.raises(ValueError, match="H, W >= 7"):
        image_metrics.ssim(small, small)
    with pytest.raises(TypeError, match="uint8_to_unit"):
        image_metrics.psnr(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="shape mismatch"):
        image_metrics.psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 9, 3)))


def test_to_uint8_default_round_trip_is_exact():
    levels = np.arange(256, dtype=np.uint8)
    as_float = levels.astype(np.float32) / 127.5 - 1.0
    for fn in (pixels.to_uint8, jax.jit(pixels.to_uint8)):
        out = np.asarray(fn(as_float))
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, levels)
    # XLA may divide via a reciprocal multiply: equal to numpy's u / 255 up to 1 ulp.
    np.testing.assert_allclose(
        np.asarray(image_metrics.uint8_to_unit(levels)), levels / 255.0, rtol=1e-7, atol=0
    )


def test_to_uint8_legacy_offset_hand_picked():
    # clamp(127.5 * x + 128, 0, 255) then truncate (spec §5.1):
    # -1 -> 0.5 -> 0; 1 -> 255.5 -> 255; 0 -> 128; 0.5 -> 191.75 -> 191; -0.5 -> 64.25 -> 64;
    # out of range values clamp; -0.999 -> 0.6275 -> 0; -0.99 -> 1.775 -> 1.
    x = np.array([-1.0, 1.0, 0.0, 0.5, -0.5, 2.0, -3.0, -0.999, -0.99], np.float32)
    expected = np.array([0, 255, 128, 191, 64, 255, 0, 0, 1], np.uint8)
    legacy = jax.jit(pixels.to_uint8, static_argnames="legacy_offset")
    np.testing.assert_array_equal(np.asarray(legacy(x, legacy_offset=True)), expected)


def test_to_uint8_legacy_matches_official_formula_and_default_off_ties():
    x = np.random.default_rng(2).uniform(-1.2, 1.2, size=(4, 64, 64, 3)).astype(np.float32)
    official = np.clip(np.float32(127.5) * x + np.float32(128.0), 0, 255).astype(np.uint8)
    to_u8 = jax.jit(pixels.to_uint8, static_argnames="legacy_offset")
    legacy = np.asarray(to_u8(x, legacy_offset=True))
    np.testing.assert_array_equal(legacy, official)
    # floor(v + 0.5) is round-half-up: away from exact half-level ties it equals the default.
    default = np.asarray(pixels.to_uint8(x)).astype(int)
    diff = default - legacy.astype(int)
    assert np.abs(diff).max() <= 1 and np.count_nonzero(diff) <= 2


def test_sharded_equals_unsharded():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    ref, rec = _image_pairs(40, 56)
    ref, rec = ref[:8].astype(np.float32), rec[:8].astype(np.float32)
    ref_sh, rec_sh = jax.device_put(ref, sharding), jax.device_put(rec, sharding)
    for fn in (_jit_psnr, _jit_ssim):
        sharded = fn(ref_sh, rec_sh)
        assert sharded.sharding.spec == PartitionSpec("data")
        np.testing.assert_allclose(
            np.asarray(sharded), np.asarray(fn(ref, rec)), rtol=1e-6, atol=1e-7
        )
    to_u8 = jax.jit(pixels.to_uint8)
    np.testing.assert_array_equal(
        np.asarray(to_u8(jax.device_put(2 * ref - 1, sharding))), np.asarray(to_u8(2 * ref - 1))
    )


def _solid(n: int, value: int, h: int = 4, w: int = 5) -> np.ndarray:
    return np.full((n, h, w, 3), value, np.uint8)


def test_make_grid_layout():
    originals = _solid(3, 10)
    originals[1] = 11  # distinguish columns
    recons = _solid(2, 200)  # shorter row: the last cell stays gray
    grid = image_grid.make_grid([originals, recons], padding=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * (4 + 2) + 2, 3 * (5 + 2) + 2, 3)
    # Cell (row r, column c) starts at (2 + 6r, 2 + 7c).
    np.testing.assert_array_equal(grid[2:6, 2:7], originals[0])
    np.testing.assert_array_equal(grid[2:6, 9:14], originals[1])
    np.testing.assert_array_equal(grid[8:12, 9:14], recons[1])
    assert np.all(grid[8:12, 16:21] == 128)  # missing reconstruction
    assert np.all(grid[:2] == 128) and np.all(grid[:, 7:9] == 128)  # border and gutter
    no_pad = image_grid.make_grid([originals], padding=0)
    np.testing.assert_array_equal(no_pad, np.concatenate(list(originals), axis=1))


def test_make_grid_rejects_bad_rows():
    with pytest.raises(ValueError):
        image_grid.make_grid([])
    with pytest.raises(ValueError, match="image shape"):
        image_grid.make_grid([_solid(1, 0), _solid(1, 0, h=6)])
    with pytest.raises(ValueError, match="uint8"):
        image_grid.make_grid([np.zeros((1, 4, 4, 3), np.float32)])


def test_save_png_round_trip(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
    path = tmp_path / "nested" / "dir" / "grid.png"
    image_grid.save_png(image, path)
    with Image.open(path) as loaded:
        assert loaded.format == "PNG"
        np.testing.assert_array_equal(np.asarray(loaded), image)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left behind
    image_grid.save_png(image[::-1].copy(), str(path))  # overwrite in place, str path
    with Image.open(path) as loaded:
        np.testing.assert_array_equal(np.asarray(loaded), image[::-1])
