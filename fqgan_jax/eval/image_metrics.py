"""Per-image reconstruction metrics (PSNR, SSIM) in jittable JAX; uint8 conversion: data/pixels.py.

Everything here is batch-first ([B, H, W, C], channels last), computed in float32, free of host
callbacks, and therefore usable inside a jitted (and batch-sharded) eval step. Each metric returns
one value per image; averaging over the dataset is left to the evaluator.

Protocol (spec §5.1, official `reconstruction_vq_ddp_*.py`):

* reconstructions are mapped to uint8 with ``clamp(127.5 * x + 128, 0, 255)`` then truncated
  (``to_uint8(..., legacy_offset=True)``); ``to_uint8`` defaults to ``round(127.5 * (x + 1))``,
  which differs from it only at exact half-level ties;
* PSNR = ``skimage.metrics.peak_signal_noise_ratio(recon_uint8 / 255, gt_01)`` with data range 1;
* SSIM = ``skimage.metrics.structural_similarity(..., channel_axis=-1, data_range=2.0)`` on [0, 1]
  images. ``data_range=2.0`` is an upstream bug inherited from LlamaGen that inflates SSIM; pass
  ``data_range=2.0`` to ``ssim`` only to reproduce published numbers, ``1.0`` is the correct value.
"""

import jax
import jax.numpy as jnp

# skimage.metrics.structural_similarity defaults (uniform window, sample covariance).
_SSIM_WIN = 7
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def uint8_to_unit(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [0, 1], the ``recon_uint8 / 255`` step of the PSNR protocol."""
    return jnp.asarray(images).astype(jnp.float32) / 255.0


def _as_float_batch(name: str, images: jax.Array) -> jax.Array:
    """Validates a [B, H, W, C] float batch and casts it to float32."""
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{name} must be [B, H, W, C], got shape {images.shape}")
    # Integer images would silently be scored against data range 1; make the caller convert.
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"{name} must be float in [0, 1] (use uint8_to_unit), got {images.dtype}")
    return images.astype(jnp.float32)


def _check_pair(reference: jax.Array, reconstruction: jax.Array) -> tuple[jax.Array, jax.Array]:
    ref = _as_float_batch("reference", reference)
    rec = _as_float_batch("reconstruction", reconstruction)
    if ref.shape != rec.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs reconstruction {rec.shape}")
    return ref, rec


def psnr(reference: jax.Array, reconstruction: jax.Array) -> jax.Array:
    """Per-image PSNR in dB, shape [B], for float images in [0, 1] (data range 1).

    Matches ``skimage.metrics.peak_signal_noise_ratio(ref, rec, data_range=1)`` per image (MSE over
    all pixels and channels). Identical images give ``+inf``; the evaluator decides whether to
    drop, clip or keep them when averaging.
    """
    ref, rec = _check_pair(reference, reconstruction)
    mse = jnp.mean(jnp.square(ref - rec), axis=(1, 2, 3))
    # 1 / 0 -> inf -> log10 -> inf, exactly as skimage (which also returns inf).
    return 10.0 * jnp.log10(1.0 / mse)


def _box_mean_valid(x: jax.Array) -> jax.Array:
    """Mean over every full 7x7 spatial window of [B, H, W, C] -> [B, H-6, W-6, C].

    skimage filters with reflect padding but then crops (win-1)//2 pixels from every border before
    averaging, so only windows lying fully inside the image count: exactly a VALID box filter.
    """
    window = (1, _SSIM_WIN, _SSIM_WIN, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1), "VALID")
    return total / float(_SSIM_WIN * _SSIM_WIN)


def ssim(reference: jax.Array, reconstruction: jax.Array, *, data_range: float = 1.0) -> jax.Array:
    """Per-image SSIM, shape [B], for float images [B, H, W, C] with H, W >= 7.

    Equals ``skimage.metrics.structural_similarity(ref, rec, channel_axis=-1,
    data_range=data_range)`` with skimage's defaults: 7x7 uniform window, K1=0.01, K2=0.03, sample
    covariance (factor 49/48), mean SSIM map over the interior windows of each channel, then mean
    over channels. ``data_range=2.0`` reproduces the official (buggy, inflated) protocol (§5.1).
    """
    ref, rec = _check_pair(reference, reconstruction)
    if min(ref.shape[1:3]) < _SSIM_WIN:
        raise ValueError(f"SSIM needs H, W >= {_SSIM_WIN}, got shape {ref.shape}")
    # Covariances are shift invariant: centering each image/channel first avoids float32
    # cancellation in E[x^2] - E[x]^2 (measured max error vs float64 skimage on near-flat images:
    # 4e-6 centered, 6e-5 uncentered).
    ref_mean = jnp.mean(ref, axis=(1, 2), keepdims=True)
    rec_mean = jnp.mean(rec, axis=(1, 2), keepdims=True)
    x, y = ref - ref_mean, rec - rec_mean
    mx, my = _box_mean_valid(x), _box_mean_valid(y)
    cov_norm = _SSIM_WIN**2 / (_SSIM_WIN**2 - 1.0)
    vx = cov_norm * (_box_mean_valid(x * x) - mx * mx)
    vy = cov_norm * (_box_mean_valid(y * y) - my * my)
    vxy = cov_norm * (_box_mean_valid(x * y) - mx * my)
    ux, uy = mx + ref_mean, my + rec_mean
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    numerator = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
    denominator = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    # All channels keep the same number of interior pixels, so the mean over (H, W, C) equals
    # skimage's mean over channels of per-channel means.
    return jnp.mean(numerator / denominator, axis=(1, 2, 3))
