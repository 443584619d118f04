"""Host-side image grids for reconstruction previews (numpy + Pillow).

Layout of ``make_grid``: one row per input array and one column per image index, e.g.

    rows = [originals, reconstructions, recon_from_vis_codebook_only, ...]

puts image ``i`` and all of its reconstructions in column ``i`` (the side-by-side comparison of
spec §5.3 / paper Figure 3, transposed so each row is one kind of image). Cells are separated by,
and the whole grid is framed with, ``padding`` pixels of neutral gray.
"""


import numpy as np
from PIL import Image

from fqgan_jax.atomic_file import atomic_write

_PAD_VALUE = 128  # neutral gray: distinguishable from both black and white image borders


def make_grid(rows: list[np.ndarray], *, padding: int = 2) -> np.ndarray:
    """Tiles ``rows`` (each uint8 [n_r, H, W, C]) into one uint8 [R*(H+p)+p, N*(W+p)+p, C] image.

    Row ``r`` of the grid shows ``rows[r][0], rows[r][1], ...`` from left to right; ``N`` is the
    largest ``n_r`` and shorter rows leave their trailing cells gray. All rows must share H, W, C.
    """
    if not rows:
        raise ValueError("make_grid needs at least one row")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    arrays = [np.asarray(r) for r in rows]
    for i, a in enumerate(arrays):
        if a.dtype != np.uint8 or a.ndim != 4:
            raise ValueError(f"row {i} must be uint8 [n, H, W, C], got {a.dtype} {a.shape}")
        if a.shape[1:] != arrays[0].shape[1:]:
            raise ValueError(f"row {i} has image shape {a.shape[1:]}, row 0 {arrays[0].shape[1:]}")
    height, width, channels = arrays[0].shape[1:]
    n_cols = max(a.shape[0] for a in arrays)
    grid_h = len(arrays) * (height + padding) + padding
    grid_w = n_cols * (width + padding) + padding
    grid = np.full((grid_h, grid_w, channels), _PAD_VALUE, dtype=np.uint8)
    for r, images in enumerate(arrays):
        top = padding + r * (height + padding)
        for c, image in enumerate(images):
            left = padding + c * (width + padding)
            grid[top : top + height, left : left + width] = image
    return grid


def save_png(image: np.ndarray, path) -> None:
    """Writes a uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] image as PNG at ``path``.

    Parent directories are created. The file is written to a temporary name in the same directory
    and renamed into place, so readers (e.g. a sync job) never see a half-written PNG.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"save_png expects [H, W], [H, W, 1|3|4], got {array.shape}")
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG")
