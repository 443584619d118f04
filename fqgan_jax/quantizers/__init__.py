"""Quantizers and the memory-bounded search they share; `interface.py` is the contract."""

from fqgan_jax.quantizers.entropy import entropy_loss
from fqgan_jax.quantizers.factorized_vq import FactorizedQuantizer, l2_normalized
from fqgan_jax.quantizers.interface import Quantizer, QuantizerOutput, health_stats
from fqgan_jax.quantizers.search import (
                                         DEFAULT_MEMORY_BUDGET_BYTES,
                                         nearest_code,
                                         nearest_code_and_distance,
                                         sharded_nearest_code,
)
from fqgan_jax.quantizers.straight_through import straight_through
from fqgan_jax.quantizers.usage import code_histogram, usage_stats

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES", "FactorizedQuantizer", "Quantizer", "QuantizerOutput",
    "code_histogram", "entropy_loss", "health_stats", "l2_normalized", "nearest_code",
    "nearest_code_and_distance", "sharded_nearest_code", "straight_through", "usage_stats",
]
