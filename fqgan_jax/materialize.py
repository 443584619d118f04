"""A mapped codebook materialized: the inference form of VQGAN-LC and FVQ tokenizers.

VQGAN-LC searches Ĉ = projector(C) and FVQ Ĉ = VQBridge(C), recomputed from C every training
step (spec large_codebooks.md §A.3, §B.1). Once training is over, Ĉ is a constant: computed
once here, it becomes the codebook of a plain VQ (`config.model.quantizer = "vq"`, no l2
normalization, the same squared-Euclidean search), so inference costs what a LlamaGen VQGAN
costs and the bridge, the projector and C are dropped, as FVQ's `convert_fullvq2vq.py` does. The
codes are unchanged: the plain VQ searches the same Ĉ.

A quantizer takes part by having `materialized_codebook() -> float32 [K, d]`; the others (FQGAN's
VQ, LFQ) are already their inference form and pass through unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx

from fqgan_jax import architecture


def is_mapped(config: ml_collections.ConfigDict) -> bool:
    """Whether the config's quantizer computes its codebook from parameters (LC, FVQ)."""
    quantizer = nnx.eval_shape(lambda: architecture.create_model(config, nnx.Rngs(0))).quantize
    # LC l2-normalizes z (not Ĉ) when code_dim equals the codebook's width: a plain VQ cannot
    # express that, so such a tokenizer keeps its own form.
    return (hasattr(quantizer, "materialized_codebook")
            and not getattr(quantizer, "normalize_z", False))


def plain_vq_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config of the materialized tokenizer: the same network around a plain VQ."""
    plain = ml_collections.ConfigDict(config.to_dict())
    plain.model.quantizer = "vq"
    plain.model.l2_normalize = False
    return plain


def materialize(config: ml_collections.ConfigDict, params: nnx.State, model_state: nnx.State
                ) -> tuple[ml_collections.ConfigDict, nnx.State, nnx.State]:
    """(config, params, model_state) of the plain-VQ form of a mapped-codebook tokenizer, or
    the inputs unchanged when its quantizer is not mapped."""
    if not is_mapped(config):
        return config, params, model_state
    model = architecture.merge_model(architecture.model_graphdef(config), params, model_state)
    codebook = jnp.asarray(model.quantize.materialized_codebook(), jnp.float32)[None]
    plain = plain_vq_config(config)
    plain_params, plain_state = architecture.abstract_model_variables(plain)
    return plain, _take(plain_params, params, codebook), _take(plain_state, model_state, None)


def _take(target: nnx.State, source: nnx.State, codebook) -> nnx.State:
    """`target`'s structure filled from `source`, except the plain VQ's codebook."""
    source = dict(nnx.to_flat_state(source))
    flat = {}
    for path, leaf in nnx.to_flat_state(target):
        if path == ("quantize", "codebook"):
            flat[path] = leaf.replace(codebook)
        else:
            flat[path] = source[path]
    return nnx.from_flat_state(flat)
