"""FVQ's quantizer: a raw codebook seen through VQBridge (spec large_codebooks.md §B.1-B.4).

A plain VQ updates only the codes it selects, so unselected codes drift into dead zones. FVQ
keeps a trainable raw codebook C [K, d] and searches Ĉ = VQBridge(C) instead (`vqbridge.py`):
the gradient of the selected rows of Ĉ reaches the bridge's shared weights, and through its
attention every raw code, so all K codes follow the encoder (§B.6). Together with learning
annealing (`fqgan_jax/training/schedules.py`, §B.5) this is what gives FVQ its 100% usage.

Per call (training and eval alike, §B.2): Ĉ is recomputed from the current parameters (no EMA,
no cache), each token takes its squared-Euclidean nearest row of Ĉ (float32 distances, the
memory-bounded search of `pallas_search`), and z_q is gathered from Ĉ, so it is differentiable
w.r.t. the bridge and C. Loss terms (§B.4, LlamaGen's VQ loss): "codebook"
mean((z_q - sg z)^2), the only path to the bridge and C; "commitment" mean((sg z_q - z)^2);
"entropy" is 0 (FVQ's entropy_loss_ratio is 0). Straight-through output as every quantizer.

After training Ĉ is all that inference needs (`materialized_codebook`, §B.1: the official
`convert_fullvq2vq.py` writes it into a plain VQ checkpoint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fqgan_jax.quantizers import computed_codebook
from fqgan_jax.quantizers.interface import QuantizerOutput
from fqgan_jax.quantizers.search import DEFAULT_MEMORY_BUDGET_BYTES
from fqgan_jax.quantizers.vqbridge import VQBridge


class BridgedCodebookQuantizer(nnx.Module):
    """One codebook: raw C [K, d] (uniform +-1/K, §B.2) searched as Ĉ = VQBridge(C) (§B.3)."""

    num_codebooks = 1

    def __init__(self, *, codebook_size: int, code_dim: int, group_size: int = 16,
                 width: int = 256, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                 shard_axis: str | None = None, rngs: nnx.Rngs):
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.memory_budget_bytes = memory_budget_bytes
        # Under a mesh whose `shard_axis` has > 1 device the search splits Ĉ's rows over it.
        self.shard_axis = shard_axis
        bound = 1.0 / codebook_size  # official nn.Embedding init uniform(-1/K, 1/K)
        self.codebook = nnx.Param(jax.random.uniform(
            rngs.params(), (codebook_size, code_dim), jnp.float32, -bound, bound))
        self.bridge = VQBridge(codebook_size=codebook_size, code_dim=code_dim,
                               group_size=group_size, width=width, depth=depth, heads=heads,
                               mlp_ratio=mlp_ratio, rngs=rngs)

    @classmethod
    def from_config(cls, model_config, *, num_codebooks: int, shard_axis: str | None,
                    rngs: nnx.Rngs) -> "BridgedCodebookQuantizer":
        if num_codebooks != 1:
            raise ValueError(f"The fvq quantizer has one codebook; config.model.branches has "
                             f"{num_codebooks}. Use a single branch, e.g. ('vq',).")
        c, bridge = model_config, model_config.fvq
        return cls(codebook_size=c.codebook_size, code_dim=c.code_dim,
                   group_size=bridge.group_size, width=bridge.width, depth=bridge.depth,
                   heads=bridge.heads, mlp_ratio=bridge.mlp_ratio,
                   memory_budget_bytes=int(c.search_memory_mb * 2**20), shard_axis=shard_axis,
                   rngs=rngs)

    @staticmethod
    def initial_values(model_config) -> dict:
        return {}  # random init only

    def materialized_codebook(self) -> jax.Array:
        """Ĉ [K, d] float32 from the current parameters: the codebook the search and the
        decoder see. Inference and export can compute it once and drop C and the bridge."""
        return self.bridge(self.codebook[...])

    def __call__(self, z: jax.Array, *, with_entropy: bool = False) -> QuantizerOutput:
        """Quantizes z [..., 1, d] (any float dtype; computed in float32). `with_entropy` is
        accepted for the interface; FVQ has no entropy term."""
        del with_entropy
        computed_codebook.check_latents(z, self.code_dim, "BridgedCodebookQuantizer")
        flat = jnp.asarray(z, jnp.float32).reshape(-1, self.code_dim)
        output = computed_codebook.quantize(  # Ĉ once per call, shared by all tokens (§B.10)
            flat, self.materialized_codebook(), shard_axis=self.shard_axis,
            memory_budget_bytes=self.memory_budget_bytes)
        return computed_codebook.reshaped(output, z.shape[:-2])

    @staticmethod
    def loss_weights(loss_config) -> dict[str, float]:
        """codebook_weight x (codebook + beta x commitment); FVQ: 1 and 0.25 (§B.4)."""
        return {"codebook": loss_config.codebook_weight,
                "commitment": loss_config.codebook_weight * loss_config.commitment_beta,
                "entropy": 0.0}

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors of Ĉ: indices int [..., 1] -> float32 [..., 1, d]."""
        return computed_codebook.lookup(self.materialized_codebook(), indices)
