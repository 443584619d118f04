"""Quantizers by name: what `config.model.quantizer` selects.

Each entry is a class implementing `interface.Quantizer` plus two class-level hooks the rest of
the framework calls, so a new quantizer is one file and one line here:

* `from_config(model_config, *, num_codebooks, shard_axis, rngs)`: the module for
  `config.model` (its own settings live in `config.model.<name>`).
* `initial_values(model_config) -> {path: np.ndarray}`: values read from files that replace the
  random init of a fresh run (VQGAN-LC's clustered codebook), keyed by the variable's path inside
  the quantizer; `{}` for most. Called before anything compiles, so a bad file stops the run
  early; a restored run takes these from its checkpoint instead.

Modules are imported on first use so that a config naming one quantizer never imports the others.
"""

from __future__ import annotations

import importlib

QUANTIZERS = {
    "vq": "fqgan_jax.quantizers.factorized_vq:FactorizedQuantizer",
    "lc": "fqgan_jax.quantizers.lc:ProjectedCodebookQuantizer",
    "fvq": "fqgan_jax.quantizers.fvq:BridgedCodebookQuantizer",
    "lfq": "fqgan_jax.quantizers.lfq:LookupFreeQuantizer",
}


def quantizer_class(name: str) -> type:
    if name not in QUANTIZERS:
        raise ValueError(f"Unknown quantizer {name!r}; config.model.quantizer must be one of "
                         f"{', '.join(QUANTIZERS)}.")
    module, _, cls = QUANTIZERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_quantizer(model_config, *, num_codebooks: int, shard_axis: str | None, rngs):
    """The quantizer `model_config.quantizer` names, for k = num_codebooks branches."""
    return quantizer_class(model_config.quantizer).from_config(
        model_config, num_codebooks=num_codebooks, shard_axis=shard_axis, rngs=rngs)


def initial_values(model_config) -> dict:
    """{path inside the quantizer: array} that a fresh run loads from files (see above)."""
    return quantizer_class(model_config.quantizer).initial_values(model_config)
