"""Per-sub-codebook analysis: FQGAN Figures 3 and 4.

* Figure 3 (spec fqgan.md §5.3): images reconstructed from a single sub-codebook. The decoder only
  sees `post_quant_conv(concat(sub-codes))`, so every other sub-code is replaced before that conv:
  by zeros (default; the spec's *inferred, unverified* choice, the conv bias still applies) or by
  the mean code of that sub-codebook over the batch (`fill="mean"`). The masking value is an open
  choice; label figures with it.
* Figure 4: a t-SNE of the sub-codebook entries, colored by sub-codebook.

The reconstruction part is pure, jittable JAX (`single_codebook_step` is the jitted eval form);
the t-SNE part is host-side, and imports scikit-learn and matplotlib only when called.
"""

from __future__ import annotations

import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fqgan_jax.architecture import merge_model
from fqgan_jax.atomic_file import atomic_write
from fqgan_jax.data.pixels import images_to_float, to_uint8
from fqgan_jax.eval import image_grid

FILLS = ("zeros", "mean")


# ------------------------------------------------------------------------------------------------
# Figure 3: reconstruction from one sub-codebook.
# ------------------------------------------------------------------------------------------------


def only_codebook(codes: jax.Array, index: int, fill: str = "zeros") -> jax.Array:
    """codes [..., k, d] -> same shape, with every sub-code except `index` replaced by `fill`.

    "zeros": zero vectors. "mean": the mean code of each replaced sub-codebook over all leading
    positions of `codes` (so over padded images too, if the batch has any). Sub-code `index` is
    kept bit-exact.
    """
    codes = jnp.asarray(codes)
    if codes.ndim < 2:
        raise ValueError(f"only_codebook expects codes [..., k, d], got shape {codes.shape}")
    num_codebooks = codes.shape[-2]
    try:
        index = operator.index(index)  # a static int: the selection must be known at trace time
    except TypeError:
        raise ValueError(f"sub-codebook index must be an int, got {index!r}") from None
    if not 0 <= index < num_codebooks:
        raise ValueError(f"sub-codebook index {index} out of range [0, {num_codebooks})")
    if fill == "zeros":
        replacement = jnp.zeros((), codes.dtype)
    elif fill == "mean":
        replacement = jnp.mean(codes.reshape(-1, *codes.shape[-2:]), axis=0)  # [k, d]
    else:
        raise ValueError(f"unknown fill {fill!r}; expected one of {FILLS}")
    keep = (jnp.arange(num_codebooks) == index)[:, None]  # [k, 1], broadcasts over [..., k, d]
    return jnp.where(keep, codes, replacement)


def single_codebook_reconstructions(model, images: jax.Array, fill: str = "zeros") -> jax.Array:
    """Images float [-1, 1] [B, H, W, 3] -> float32 [k+1, B, H, W, 3].

    Row 0 is the full reconstruction (equal to `model(images)[0]`), row 1+i the reconstruction from
    sub-codebook i alone (branch `model.branch_names[i]`). Deterministic (no dropout rngs).
    """
    codes = model.encode(images).quantized
    variants = [codes] + [only_codebook(codes, i, fill) for i in range(model.num_codebooks)]
    # One decode per variant rather than one (k+1)x batch: peak activation memory stays that of a
    # normal eval batch, and row 0 is exactly the ordinary forward pass.
    return jnp.stack([model.decode_codes(c) for c in variants]).astype(jnp.float32)


def single_codebook_step(params, model_state, images: jax.Array, *, graphdef,
                         fill: str = "zeros", legacy_offset: bool = False) -> jax.Array:
    """Functional form for jax.jit (graphdef, fill static): -> uint8 [k+1, B, H, W, 3].

    `images` may be uint8 [0, 255] (an eval batch) or float [-1, 1].
    """
    model = merge_model(graphdef, params, model_state)
    recon = single_codebook_reconstructions(model, images_to_float(images), fill)
    return to_uint8(recon, legacy_offset=legacy_offset)


def single_codebook_grid(originals: np.ndarray, recon: np.ndarray, *,
                         padding: int = 2) -> np.ndarray:
    """uint8 originals [B, H, W, 3] and recon [k+1, B, H, W, 3] -> one uint8 grid image.

    One row per image; columns original | all | only-0 | only-1 | ... (paper Figure 3's panels).
    """
    originals, recon = np.asarray(originals), np.asarray(recon)
    if originals.ndim != 4 or recon.ndim != 5 or recon.shape[1:] != originals.shape:
        raise ValueError(f"expected originals [B, H, W, C] and recon [k+1, B, H, W, C]; got "
                         f"{originals.shape} and {recon.shape}")
    table = np.concatenate([originals[None], recon], axis=0)  # [k+2, B, H, W, C]
    # make_grid lays each list entry out as a horizontal row: one entry per image.
    return image_grid.make_grid(list(table.swapaxes(0, 1)), padding=padding)


# ------------------------------------------------------------------------------------------------
# Figure 4: t-SNE of the sub-codebook entries.
# ------------------------------------------------------------------------------------------------


def decoder_codebook(model, *, as_numpy: bool = True):
    """The code vectors the decoder sees, float32 [k, K, d] (normalized if the quantizer
    normalizes), obtained through `quantize.lookup` so there is one source of truth. Numpy by
    default; `as_numpy=False` keeps it a traceable jax.Array (for use under jit)."""
    quantizer = model.quantize
    indices = jnp.broadcast_to(jnp.arange(quantizer.codebook_size)[:, None],
                               (quantizer.codebook_size, quantizer.num_codebooks))
    codebook = jnp.swapaxes(quantizer.lookup(indices), 0, 1)
    return np.asarray(jax.device_get(codebook)) if as_numpy else codebook


def codebook_points(codebook: np.ndarray, max_points_per_codebook: int, seed: int,
                    used: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to `max_points_per_codebook` entries of each sub-codebook of codebook [k, K, d].

    `used` (bool [k, K]) restricts the choice to used codes. The sample is drawn with
    numpy.random.default_rng(seed) and kept in index order, so it is deterministic. Returns
    (points [N, d], labels int [N] = sub-codebook of each point).
    """
    codebook = np.asarray(codebook)
    if codebook.ndim != 3:
        raise ValueError(f"codebook must be [k, K, d], got shape {codebook.shape}")
    if max_points_per_codebook < 1:
        raise ValueError(f"max_points_per_codebook must be >= 1, got {max_points_per_codebook}")
    if used is not None and np.shape(used) != codebook.shape[:2]:
        raise ValueError(f"used must be bool {codebook.shape[:2]}, got shape {np.shape(used)}")
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for i in range(codebook.shape[0]):
        candidates = np.arange(codebook.shape[1]) if used is None else np.flatnonzero(used[i])
        if len(candidates) > max_points_per_codebook:
            candidates = np.sort(rng.choice(candidates, max_points_per_codebook, replace=False))
        points.append(codebook[i, candidates])
        labels.append(np.full(len(candidates), i, np.int32))
    return np.concatenate(points), np.concatenate(labels)


def tsne_png(codebook: np.ndarray, names: Sequence[str], path, *,
             max_points_per_codebook: int = 2000, seed: int = 0,
             used: np.ndarray | None = None,
             perplexity: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Writes a 2-D t-SNE scatter of the sub-codebook entries (paper Figure 4) as PNG at `path`.

    `codebook` [k, K, d] should be what the decoder sees (`decoder_codebook(model)`); `names`
    labels the k sub-codebooks. Returns (embedding float [N, 2], labels int [N]).
    """
    from sklearn.manifold import TSNE

    codebook = np.asarray(codebook)
    if len(names) != codebook.shape[0]:
        raise ValueError(f"{len(names)} names for {codebook.shape[0]} sub-codebooks")
    points, labels = codebook_points(codebook, max_points_per_codebook, seed, used)
    counts = np.bincount(labels, minlength=codebook.shape[0])
    if counts.min() < 2:
        raise ValueError(f"t-SNE needs at least 2 points per sub-codebook, got {counts.tolist()} "
                         f"for {list(names)} (too few used codes?)")
    # sklearn requires perplexity < N; (N - 1) / 3 is where its 3 * perplexity neighbours run out.
    perplexity = min(perplexity, (len(points) - 1) / 3.0)
    # PCA init on points without spread (FVQ's codebook is all zeros at step 0) crashes
    # sklearn's TSNE (a segfault); random init embeds them as a blob.
    init = "pca" if np.ptp(points, axis=0).max() > 0 else "random"
    embedding = TSNE(n_components=2, perplexity=perplexity, init=init,
                     random_state=seed).fit_transform(points.astype(np.float64))
    title = "t-SNE of sub-codebook entries: " + ", ".join(
        f"{name} {count}" for name, count in zip(names, counts))
    _save_scatter(embedding, labels, names, title, path)
    return embedding, labels


def _save_scatter(embedding, labels, names, title, path) -> None:
    """Agg canvas on a bare Figure: no pyplot global state, no display; atomic write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for i, name in enumerate(names):
        xy = embedding[labels == i]
        axes.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6, label=name)
    axes.legend(markerscale=3)
    axes.set_title(title, fontsize=9)
    axes.set_xticks([])
    axes.set_yticks([])
    with atomic_write(path) as f:
        figure.savefig(f, format="png")
