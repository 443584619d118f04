"""VQGAN-LC's quantizer: a large codebook of clustered image features, seen through a trained
projector (spec large_codebooks.md §A.2-A.5, A.10).

The codebook C [K, feature_dim] holds k-means centers of CLIP patch features
(`python -m fqgan_jax.tools.init_codebook`, spec §A.1) and is, in the paper's mode, frozen. A
small projector P maps it to the code space on every call, Ĉ = P(C) [K, code_dim], and tokens
are quantized against Ĉ by squared Euclidean distance. Because every code moves whenever P
moves, all 100,000 codes stay reachable (99% utilization, spec §A.9), while P has only
feature_dim x code_dim + code_dim parameters to train.

`tuning_codebook` is the official switch (spec §A.2):
  0  the file's codebook, frozen (paper)     1  the file's codebook, trained
 -1  random uniform(+-1/K), trained          -2  random uniform(+-1/K), frozen
A frozen codebook is a `FrozenCodebook` variable: it lives in the train state's model_state,
so it is checkpointed and sharded like any leaf but has no gradient and no optimizer moments.
The file is read by `initial_values` into a fresh run (training/train_state.py:
with_quantizer_files); a resumed run takes it from its checkpoint.

Official details kept (vqgan-gpt-lc/models/models_vq.py):
* The random codebooks (-1, -2) are [K, code_dim], not [K, feature_dim]: the official builds
  them at `embed_dim` and its projector maps code_dim -> code_dim there.
* z is l2-normalized only when code_dim equals the codebook width (the official tests
  `embed_dim == 768`, the CLIP width) and the mode is not -1; never at code_dim 8.
* The VQ loss is commitment + 0.33 x codebook (weight 1 on the term that trains the encoder),
  all times rate_q = loss.codebook_weight (`loss_weights`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from fqgan_jax import config_lib
from fqgan_jax.quantizers import computed_codebook
from fqgan_jax.quantizers.factorized_vq import l2_normalized
from fqgan_jax.quantizers.interface import QuantizerOutput
from fqgan_jax.quantizers.search import DEFAULT_MEMORY_BUDGET_BYTES

TUNING_MODES = (0, 1, -1, -2)
_FILE_MODES = (0, 1)  # modes whose codebook comes from lc.codebook_path
_FROZEN_MODES = (0, -2)
PROJECTORS = ("linear", "mlp")
HOW_TO_MAKE = ("Make one with: python -m fqgan_jax.tools.init_codebook --config=CONFIG "
               "--output=PATH.npy (the same config and overrides as the training run), then "
               "pass --config.model.lc.codebook_path=PATH.npy; or train on a random codebook "
               "with --config.model.lc.tuning_codebook=-1 (trained) or -2 (frozen).")


class FrozenCodebook(nnx.Variable):
    """A codebook that is state, not a parameter: split out of `nnx.Param`, so the train step
    takes no gradient for it and the optimizer never sees it."""


class CodebookFileError(config_lib.ConfigError):
    """lc.codebook_path is missing or does not hold a [codebook_size, feature_dim] codebook."""


def _torch_bias_init(fan_in: int):
    """PyTorch's default Linear bias init, U(+-1/sqrt(fan_in)) (spec §A.3: the bias keeps it)."""
    bound = fan_in ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _torch_kernel_init():
    """PyTorch's default Linear weight init, kaiming_uniform(a=sqrt(5)) = U(+-fan_in^-0.5)."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _dense(in_features: int, out_features: int, kernel_init, *, rngs: nnx.Rngs) -> nnx.Linear:
    """A float32 nn.Linear (the quantizer computes in float32 whatever the model's dtype)."""
    return nnx.Linear(in_features, out_features, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=kernel_init, bias_init=_torch_bias_init(in_features),
                      rngs=rngs)


class LinearProjector(nnx.Module):
    """use_cblinear=1 (spec §A.3): Linear(width, code_dim) with weight N(0, code_dim^-0.5)."""

    def __init__(self, width: int, code_dim: int, *, rngs: nnx.Rngs):
        self.linear = _dense(width, code_dim, nnx.initializers.normal(code_dim ** -0.5),
                             rngs=rngs)

    def __call__(self, codebook: jax.Array) -> jax.Array:
        return self.linear(codebook)


class MLPProjector(nnx.Module):
    """use_cblinear=2 (spec §A.3): Linear(width, hidden) -> ReLU -> Linear(hidden, code_dim),
    both with PyTorch's default init (the official leaves it)."""

    def __init__(self, width: int, hidden: int, code_dim: int, *, rngs: nnx.Rngs):
        self.fc1 = _dense(width, hidden, _torch_kernel_init(), rngs=rngs)
        self.fc2 = _dense(hidden, code_dim, _torch_kernel_init(), rngs=rngs)

    def __call__(self, codebook: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(codebook)))


class ProjectedCodebookQuantizer(nnx.Module):
    """VQGAN-LC: nearest code of z among Ĉ = projector(codebook); see the module docstring.

    Loss terms (unweighted): "codebook" mean((q - sg z)^2), which trains the projector (and a
    trainable codebook); "commitment" mean((sg q - z)^2), which trains the encoder; "entropy"
    always 0 (LC has none).
    """

    def __init__(self, *, codebook_size: int, code_dim: int, feature_dim: int,
                 projector: str = "linear", mlp_hidden: int = 256, tuning_codebook: int = 0,
                 codebook_ratio: float = 0.33, num_codebooks: int = 1,
                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                 shard_axis: str | None = None, rngs: nnx.Rngs):
        _check_arguments(num_codebooks, tuning_codebook, projector)
        self.num_codebooks = 1
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.tuning_codebook = tuning_codebook
        self.codebook_ratio = codebook_ratio
        self.memory_budget_bytes = memory_budget_bytes
        self.shard_axis = shard_axis
        # Official: the random codebooks are built at embed_dim (module docstring).
        width = feature_dim if tuning_codebook in _FILE_MODES else code_dim
        # spec §A.2: uniform(+-1/K); for modes 0/1 a placeholder until the file is read.
        bound = 1.0 / codebook_size
        init = jax.random.uniform(rngs.params(), (codebook_size, width), jnp.float32,
                                  -bound, bound)
        variable = FrozenCodebook if tuning_codebook in _FROZEN_MODES else nnx.Param
        self.codebook = variable(init)
        # Official `e_dim == 768 and tuning_codebook != -1`, with 768 the codebook's width.
        self.normalize_z = code_dim == width and tuning_codebook != -1
        self.projector = (LinearProjector(width, code_dim, rngs=rngs) if projector == "linear"
                          else MLPProjector(width, mlp_hidden, code_dim, rngs=rngs))

    @classmethod
    def from_config(cls, model_config, *, num_codebooks: int, shard_axis: str | None,
                    rngs: nnx.Rngs) -> ProjectedCodebookQuantizer:
        lc = model_config.lc
        return cls(codebook_size=model_config.codebook_size, code_dim=model_config.code_dim,
                   feature_dim=lc.feature_dim, projector=lc.projector,
                   mlp_hidden=lc.mlp_hidden, tuning_codebook=lc.tuning_codebook,
                   codebook_ratio=lc.codebook_ratio, num_codebooks=num_codebooks,
                   memory_budget_bytes=int(model_config.search_memory_mb * 2**20),
                   shard_axis=shard_axis, rngs=rngs)

    @staticmethod
    def initial_values(model_config) -> dict:
        """{("codebook",): the file's [K, feature_dim] float32 codebook} for modes 0 and 1."""
        lc = model_config.lc
        if lc.tuning_codebook not in _FILE_MODES:
            return {}
        shape = (model_config.codebook_size, lc.feature_dim)
        return {("codebook",): read_codebook(lc.codebook_path, shape, lc.tuning_codebook)}

    def materialized_codebook(self) -> jax.Array:
        """Ĉ = projector(C), float32 [K, code_dim]: what tokens are matched against."""
        codebook = jnp.asarray(self.codebook[...], jnp.float32)
        if self.tuning_codebook in _FROZEN_MODES:
            codebook = lax.stop_gradient(codebook)
        return self.projector(codebook).astype(jnp.float32)

    def __call__(self, z: jax.Array, *, with_entropy: bool = False) -> QuantizerOutput:
        """Quantizes z [..., 1, code_dim] (any float dtype; computed in float32).
        `with_entropy` is accepted for the interface; LC has no entropy term."""
        del with_entropy
        computed_codebook.check_latents(z, self.code_dim, "ProjectedCodebookQuantizer")
        flat = jnp.asarray(z, jnp.float32).reshape(-1, self.code_dim)
        if self.normalize_z:
            flat = l2_normalized(flat)
        output = computed_codebook.quantize(
            flat, self.materialized_codebook(), shard_axis=self.shard_axis,
            memory_budget_bytes=self.memory_budget_bytes)
        return computed_codebook.reshaped(output, z.shape[:-2])

    def loss_weights(self, loss_config) -> dict[str, float]:
        """spec §A.5: rate_q x (commitment + codebook_ratio x codebook), rate_q =
        loss.codebook_weight (0.1 in configs/lc.py); loss.commitment_beta is not used."""
        return {"codebook": loss_config.codebook_weight * self.codebook_ratio,
                "commitment": loss_config.codebook_weight,
                "entropy": 0.0}

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Code vectors: indices int [..., 1] -> float32 [..., 1, code_dim], rows of Ĉ."""
        return computed_codebook.lookup(self.materialized_codebook(), indices)


def _check_arguments(num_codebooks: int, tuning_codebook: int, projector: str) -> None:
    if num_codebooks != 1:
        raise ValueError(f"VQGAN-LC quantizes one branch; config.model.branches has "
                         f"{num_codebooks}. Use a single branch, e.g. branches=('vq',).")
    if tuning_codebook not in TUNING_MODES:
        raise ValueError(f"config.model.lc.tuning_codebook={tuning_codebook} must be one of "
                         f"{TUNING_MODES} (0 file/frozen, 1 file/trained, -1 random/trained, "
                         "-2 random/frozen).")
    if projector not in PROJECTORS:
        raise ValueError(f"config.model.lc.projector={projector!r} must be one of "
                         f"{PROJECTORS}.")


def read_codebook(path: str, shape: tuple[int, int], tuning_codebook: int = 0) -> np.ndarray:
    """The float32 codebook of the .npy at `path`, checked to be finite and of `shape`; a
    CodebookFileError names the file, what is wrong and how to make a good one."""
    mode = f"config.model.lc.tuning_codebook={tuning_codebook}"
    if not path:
        raise CodebookFileError(f"{mode} starts from a clustered codebook [{shape[0]}, "
                                f"{shape[1]}], but config.model.lc.codebook_path is empty. "
                                f"{HOW_TO_MAKE}")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise CodebookFileError(f"The VQGAN-LC codebook {path} does not exist (expected a .npy "
                                f"of shape {shape}). {HOW_TO_MAKE}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CodebookFileError(f"{path} is not a readable .npy file ({error}); expected a "
                                f"float codebook of shape {shape}. {HOW_TO_MAKE}") from error
    problem = _codebook_problem(array, shape)
    if problem:
        raise CodebookFileError(f"The VQGAN-LC codebook {path} {problem}. {HOW_TO_MAKE}")
    return np.asarray(array, np.float32)


def _codebook_problem(array: np.ndarray, shape: tuple[int, int]) -> str:
    """What makes `array` unusable as a [K, feature_dim] codebook ("" if nothing)."""
    if not np.issubdtype(array.dtype, np.floating):
        return f"has dtype {array.dtype}; expected floats of shape {shape}"
    if tuple(array.shape) != tuple(shape):
        return (f"has shape {tuple(array.shape)}, but config.model.codebook_size and "
                f"config.model.lc.feature_dim need {tuple(shape)}")
    bad = int(np.sum(~np.isfinite(array)))
    if bad:
        return f"has {bad} non-finite values (NaN or inf)"
    return ""
