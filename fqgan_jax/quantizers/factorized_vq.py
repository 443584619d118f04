"""FQGAN's factorized vector quantizer: k independent l2-normalized sub-codebooks (spec fqgan.md
§1.4), searched with one `jax.vmap`; LlamaGen's VQ when k = 1. It implements the quantizer
interface of `interface.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from fqgan_jax.quantizers.entropy import entropy_loss
from fqgan_jax.quantizers.interface import QuantizerOutput, health_stats
from fqgan_jax.quantizers.pallas_search import search_function
from fqgan_jax.quantizers.search import DEFAULT_MEMORY_BUDGET_BYTES
from fqgan_jax.quantizers.straight_through import straight_through

# F.normalize's default epsilon (LlamaGen normalizes with torch.nn.functional.normalize).
_NORMALIZE_EPS = 1e-12


def l2_normalized(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(|x|, 1e-12), matching torch.nn.functional.normalize used by LlamaGen."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, _NORMALIZE_EPS)


class FactorizedQuantizer(nnx.Module):
    """k independent sub-codebooks searched in parallel (spec fqgan.md §1.4; LlamaGen when k = 1).

    Each sub-codebook quantizes its own d-dim slice z[..., j, :]. No EMA and no dead-code restarts:
    the codebook learns only through the "codebook" loss (and "entropy" when requested); the
    straight-through output passes the decoder's gradient to z and none to the codebook. Loss
    terms (unweighted, each summed over the k sub-codebooks): "codebook" mean((q - sg(z))^2),
    "commitment" mean((sg(q) - z)^2), "entropy" (0 unless `with_entropy`).
    """

    def __init__(
        self,
        *,
        num_codebooks: int,
        codebook_size: int,
        code_dim: int,
        l2_normalize: bool = True,
        entropy_temperature: float = 0.01,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        shard_axis: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.num_codebooks = num_codebooks
        # When the program is traced under a mesh (jax.set_mesh) whose `shard_axis` has > 1
        # device, the search runs on codebook rows split over that axis (search.py).
        self.shard_axis = shard_axis
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.l2_normalize = l2_normalize
        self.entropy_temperature = entropy_temperature
        self.memory_budget_bytes = memory_budget_bytes
        # spec fqgan.md §1.4: nn.Embedding init uniform(-1/K, 1/K), then l2-normalized row-wise.
        bound = 1.0 / codebook_size
        shape = (num_codebooks, codebook_size, code_dim)
        init = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        self.codebook = nnx.Param(l2_normalized(init) if l2_normalize else init)

    @classmethod
    def from_config(cls, model_config, *, num_codebooks: int, shard_axis: str | None,
                    rngs: nnx.Rngs) -> "FactorizedQuantizer":
        c = model_config
        return cls(num_codebooks=num_codebooks, codebook_size=c.codebook_size,
                   code_dim=c.code_dim, l2_normalize=c.l2_normalize,
                   entropy_temperature=c.entropy_temperature,
                   memory_budget_bytes=int(c.search_memory_mb * 2**20), shard_axis=shard_axis,
                   rngs=rngs)

    @staticmethod
    def initial_values(model_config) -> dict:
        return {}  # random init only

    def _search_codebook(self) -> jax.Array:
        """The codebook as searched: rows re-normalized at use time (spec fqgan.md §7.2)."""
        codebook = jnp.asarray(self.codebook[...], jnp.float32)
        return l2_normalized(codebook) if self.l2_normalize else codebook

    def __call__(self, z: jax.Array, *, with_entropy: bool = False) -> QuantizerOutput:
        """Quantizes z [..., k, d] (any float dtype; computed in float32)."""
        expected = (self.num_codebooks, self.code_dim)
        if tuple(z.shape[-2:]) != expected:
            raise ValueError(f"FactorizedQuantizer expects z [..., {expected[0]}, {expected[1]}]; "
                             f"got {tuple(z.shape)}")
        batch_shape = z.shape[:-2]
        z = jnp.asarray(z, jnp.float32).reshape(-1, *expected)
        if self.l2_normalize:
            z = l2_normalized(z)
        codebook = self._search_codebook()
        # One search per sub-codebook in a single vmap; the budget is shared between them because
        # vmap runs all k chunk searches side by side.
        search = functools.partial(
            search_function(self.shard_axis), normalized=self.l2_normalize,
            memory_budget_bytes=max(1, self.memory_budget_bytes // self.num_codebooks),
        )
        indices = jax.vmap(search, in_axes=(1, 0), out_axes=1)(z, codebook)
        quantized = codebook[jnp.arange(self.num_codebooks), indices]
        codes = straight_through(z, quantized)
        # spec fqgan.md §1.4: mean over tokens and channels per sub-codebook, summed over k.
        codebook_loss = jnp.sum(jnp.mean((quantized - lax.stop_gradient(z)) ** 2, axis=(0, 2)))
        commitment_loss = jnp.sum(jnp.mean((lax.stop_gradient(quantized) - z) ** 2, axis=(0, 2)))
        entropy = self._entropy(z, codebook) if with_entropy else jnp.zeros((), jnp.float32)
        indices = indices.reshape(*batch_shape, self.num_codebooks)
        return QuantizerOutput(
            quantized=codes.reshape(*batch_shape, *expected),
            indices=indices,
            losses={"codebook": codebook_loss, "commitment": commitment_loss, "entropy": entropy},
            stats=health_stats(indices, self.codebook_size),
        )

    @staticmethod
    def loss_weights(loss_config) -> dict[str, float]:
        """LlamaGen's VQ loss: codebook + beta x commitment, both scaled by codebook_weight."""
        return {"codebook": loss_config.codebook_weight,
                "commitment": loss_config.codebook_weight * loss_config.commitment_beta,
                "entropy": loss_config.entropy_weight}

    def _entropy(self, z: jax.Array, codebook: jax.Array) -> jax.Array:
        loss = functools.partial(
            entropy_loss, temperature=self.entropy_temperature,
            memory_budget_bytes=max(1, self.memory_budget_bytes // self.num_codebooks),
        )
        return jnp.sum(jax.vmap(loss, in_axes=(1, 0))(z, codebook))

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors: indices int [..., k] -> float32 [..., k, d], normalized if l2_normalize."""
        indices = jnp.asarray(indices, jnp.int32)
        if indices.shape[-1:] != (self.num_codebooks,):
            raise ValueError(
                f"lookup expects indices [..., {self.num_codebooks}]; got {indices.shape}"
            )
        return self._search_codebook()[jnp.arange(self.num_codebooks), indices]
