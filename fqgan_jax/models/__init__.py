"""Tokenizer models: the LlamaGen/FQGAN encoder trunk, branch heads, adapter and decoder."""

from fqgan_jax.models.adapter import FactorizedAdapter
from fqgan_jax.models.decoder import Decoder
from fqgan_jax.models.encoder import Encoder, EncoderBranch
from fqgan_jax.models.layers import AttnBlock, Downsample, ResnetBlock, Upsample
from fqgan_jax.models.tokenizer import Tokenizer, official_key_to_path

__all__ = [
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "EncoderBranch",
    "FactorizedAdapter",
    "ResnetBlock",
    "Tokenizer",
    "Upsample",
    "official_key_to_path",
]
