"""`load_tokenizer`: a trained tokenizer as two functions, for notebooks and scripts.

    tok = fqgan_jax.load_tokenizer("/path/to/workdir")
    codes = tok.encode(images)   # uint8 [B, H, W, 3] -> int32 [B, h, w, k]
    images = tok.decode(codes)   # int [B, h, w, k] -> uint8 [B, H, W, 3]
    rows = tok.single_codebook_reconstructions(images)  # uint8 [k+1, B, H, W, 3] (Figure 3)
    codebook = tok.codebook()    # float32 [k, K, d], as the decoder sees it (Figure 4)

The path may be a workdir, its `checkpoints/` folder, or one step folder inside it. EMA params
are used when the run kept them. A VQGAN-LC or FVQ tokenizer is loaded in its materialized form
(`materialize.py`): a plain VQ over the mapped codebook, as cheap as a LlamaGen VQGAN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fqgan_jax import architecture, checkpointing, config_lib, materialize, sharding
from fqgan_jax.data.pixels import images_to_float, to_uint8
from fqgan_jax.eval import codebook_analysis


class Tokenizer:
    """Jitted encode/decode around restored params, on the default device."""

    def __init__(self, config, params, model_state):
        self.config = config
        self.num_codebooks = len(config.model.branches)
        self.codebook_size = config.model.codebook_size
        self.downsample = 2 ** (len(config.model.ch_mult) - 1)
        graphdef = architecture.eval_graphdef(config)  # config.eval.dtype: float32 by default
        merge = architecture.merge_model
        self._encode = jax.jit(lambda p, s, x: merge(graphdef, p, s).encode(
            images_to_float(x)).indices)
        self._decode = jax.jit(lambda p, s, c: to_uint8(
            merge(graphdef, p, s).decode_indices(c)))
        self._single = jax.jit(codebook_analysis.single_codebook_step,
                               static_argnames=("graphdef", "fill"))
        self._graphdef = graphdef
        self._variables = (params, model_state)

    @property
    def model(self):
        """The restored nnx Tokenizer, for anything the two functions do not cover."""
        return architecture.merge_model(self._graphdef, *self._variables)

    def encode(self, images) -> np.ndarray:
        self._check_images(images)
        return np.asarray(self._encode(*self._variables, jnp.asarray(images)))

    def single_codebook_reconstructions(self, images, fill: str = "zeros") -> np.ndarray:
        """uint8 images [B, H, W, 3] -> uint8 [k+1, B, H, W, 3]: the full reconstruction, then
        the one from each sub-codebook alone, the others replaced by `fill` ("zeros" | "mean";
        see codebook_analysis.py). `codebook_analysis.single_codebook_grid` lays them out."""
        self._check_images(images)
        if fill not in codebook_analysis.FILLS:
            raise ValueError(f"fill must be one of {codebook_analysis.FILLS}, got {fill!r}.")
        return np.asarray(self._single(*self._variables, jnp.asarray(images),
                                       graphdef=self._graphdef, fill=fill))

    def codebook(self) -> np.ndarray:
        """float32 [k, K, d]: the code vectors the decoder sees (l2-normalized if trained so)."""
        return codebook_analysis.decoder_codebook(self.model)

    def _check_images(self, images) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"encode expects uint8 images [B, H, W, 3], got {images.dtype} "
                             f"{images.shape}. Convert with np.asarray(img, np.uint8).")
        if images.shape[1] % self.downsample or images.shape[2] % self.downsample:
            raise ValueError(f"Image size {images.shape[1:3]} must be a multiple of the "
                             f"tokenizer's downsampling factor {self.downsample}.")

    def decode(self, codes) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 4 or codes.shape[-1] != self.num_codebooks:
            raise ValueError(f"decode expects int codes [B, h, w, {self.num_codebooks}], got "
                             f"shape {codes.shape}.")
        if not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or \
                codes.max() >= self.codebook_size:
            raise ValueError(f"decode expects integer codes in [0, {self.codebook_size}).")
        return np.asarray(self._decode(*self._variables, jnp.asarray(codes, jnp.int32)))


def load_tokenizer(path: str) -> Tokenizer:
    workdir, step = checkpointing.locate_workdir(path)
    config = checkpointing.read_config(workdir)
    mesh = sharding.make_mesh(config_lib.single_device_mesh(), jax.devices()[:1])
    params, model_state, _ = checkpointing.restore_model(workdir, config, mesh, step=step)
    # LC's and FVQ's codebooks are computed once here, not on every encode.
    return Tokenizer(*materialize.materialize(config, params, model_state))
