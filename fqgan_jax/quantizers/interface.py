"""The quantizer interface: what every quantizer of a tokenizer takes and returns.

A quantizer is an `nnx.Module` that the tokenizer builds once from `config.model` and calls
between its encoder and decoder. FQGAN's factorized VQ (`factorized_vq.py`) implements it; a new
quantizer (VQGAN-LC's projected frozen codebook, FVQ's VQBridge, LFQ) is one more file here that
implements the same four members, so the tokenizer, objectives, train step, eval and inference
serve it unchanged:

* `__call__(z, *, with_entropy=False) -> QuantizerOutput`: z [..., k, d] (any float dtype) in,
  the straight-through quantized latents, integer codes, unweighted loss terms and this batch's
  health statistics out. Everything it computes is float32 and differentiable w.r.t. z and its
  own parameters; codes carry no gradient.
* `lookup(indices) -> [..., k, d]`: the code vectors the decoder sees for int codes [..., k]
  (decoding stored tokens, eval's analysis, the generator's sampling).
* `loss_weights(loss_config) -> {term: weight}`: the weight of each of its `losses` terms, read
  from `config.loss`; the objective adds sum(weight * term) in this order.
* `num_codebooks` (k), `codebook_size` (K) and `code_dim` (d): the shape of its codes.

`health_stats` turns a batch's codes into the per-sub-codebook statistics that the train step
logs, so every quantizer reports the same ones.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import ml_collections

from fqgan_jax.quantizers.usage import code_histogram, usage_stats


class QuantizerOutput(NamedTuple):
    """What a quantizer returns for latents z [..., k, d]."""

    quantized: jax.Array  # float32 [..., k, d]: value = the chosen code vectors; gradient -> z
    indices: jax.Array  # int32 [..., k]: the codes
    losses: dict[str, jax.Array]  # unweighted scalar terms by name (see `loss_weights`)
    stats: dict[str, jax.Array]  # this batch's health, float32 [k] each (`health_stats`)


class Quantizer(Protocol):
    num_codebooks: int
    codebook_size: int
    code_dim: int

    def __call__(self, z: jax.Array, *, with_entropy: bool = False) -> QuantizerOutput: ...

    def lookup(self, indices: jax.Array) -> jax.Array: ...

    def loss_weights(self, loss_config: ml_collections.ConfigDict) -> dict[str, float]: ...


def health_stats(indices: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
    """Batch perplexity (the effective number of codes) and the most used code's share, per
    sub-codebook, of int codes [..., k]."""
    stats = usage_stats(code_histogram(indices, codebook_size))
    return {"perplexity": stats["perplexity"], "top_code_share": stats["top_code_share"]}
