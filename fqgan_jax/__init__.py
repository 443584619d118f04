"""fqgan_jax: discrete image tokenizers with large codebooks, and generators over their tokens."""

from fqgan_jax import xla_flags

__version__ = "0.1.0"

xla_flags.set_defaults()  # XLA reads them when the first backend starts, so before any jax use


def load_tokenizer(path: str):
    """Loads a trained tokenizer from a workdir or checkpoint folder (see `inference.py`)."""
    from fqgan_jax.inference import load_tokenizer as _load  # noqa: PLC0415 (lazy: jax import)
    return _load(path)


__all__ = ["load_tokenizer"]
