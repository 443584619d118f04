"""The fused nearest-code search: a Pallas kernel that never writes the N x K distance block.

`search.nearest_code` bounds memory by scanning codebook chunks, but each chunk's N x C score
block still round-trips through HBM (matmul out, argmin in). Here one kernel does the matmul and
the reduction per tile, so only z, the codebook and two [N] results touch HBM:

* the codebook is passed transposed, [d, K], so codes lie along the fast axis (TPU lanes, GPU
  coalesced loads) and each tile's scores come from a plain z_tile @ codes_tile matmul;
* each (row block, code block) tile computes the same distance as `nearest_code` (|c|^2 - 2 z.c,
  or -z.c when normalized, float32, ``precision=HIGHEST``), then reduces it to a per-row
  (min, first index of the min) and merges that into a running (distance, index) with a strict
  '<', so ties resolve to the lowest index exactly as in `nearest_code`;
* |c|^2 is computed once outside the kernel with `nearest_code`'s own expression and passed as a
  [1, K] bias; padded codes get a bias of +inf, which masks them without any in-kernel test.
  Padded rows are sliced off; padded dimensions are zeros, which add nothing to a dot product.

So the indices equal `nearest_code`'s bit for bit wherever the float32 arithmetic is exact (the
integer data of the tests and of the self-check below). Elsewhere two compiled programs may round
a distance's last bit differently (XLA vectorizes reductions per program; an MXU or Triton
matmul sums in its own order), which can only flip a near-tie within that rounding; none shows
up on the tests' random data in interpret mode. NaN scores behave as in the chunked
`nearest_code` (a tile whose minimum is NaN is skipped).

Two loop structures, because the backends disagree on what a grid is:

* "tpu" (Mosaic): grid (row blocks, code blocks), the code axis innermost and "arbitrary"
  (sequential); the output block stays resident in VMEM across it and is the accumulator, while
  Mosaic pipelines the codebook tiles HBM -> VMEM.
* "gpu" (Triton): grid programs run concurrently, so a reduction cannot span grid steps; the grid
  is over row blocks only and each program loops over code blocks with `lax.fori_loop`, keeping
  its accumulator in registers. Triton needs power-of-two tiles and matmul dims >= 16.

Both run in Pallas interpret mode on CPU (`interpret=True`), which is how the tests check them
against `nearest_code`. `auto_nearest_code` is the drop-in search: the fused kernel on TPU and
CUDA GPUs, `nearest_code` everywhere else. Because the kernel's lowering cannot be exercised
without the hardware, the selection is guarded: before first use on a backend it must compile
and equal `nearest_code` on tie-heavy integer data (`kernel_agrees`), and compile at the real
size (`kernel_compiles`); any failure logs a warning and falls back to the XLA search.
``FQGAN_JAX_FUSED_SEARCH=0`` forces the XLA path.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.experimental import pallas as pl

from fqgan_jax.quantizers.search import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    check_rows_and_codebook,
    context_axis_size,
    nearest_code,
    sharded_nearest_code,
)

TARGETS = ("tpu", "gpu")
# (block_rows, block_codes) per target. TPU: a 256 x 1024 float32 score tile is 1 MiB, so the
# tile's few temporaries and the double-buffered codebook tiles stay well inside scoped VMEM.
# GPU: 64 rows keep the z tile in registers across the loop; wide d halves the code tile.
_DEFAULT_BLOCKS = {"tpu": (256, 1024), "gpu": (64, 128)}
_GPU_WIDE_DIM = 128
# d is padded to a multiple of 8 on TPU (the codebook tile's sublanes): padding to 128 would
# multiply the codebook's HBM traffic by 16 at d = 8. Older Mosaic compilers wanted a matmul's
# contraction dim in multiples of 128; on those the self-check fails and the XLA search is used
# (set this to 128 to trade the traffic for the kernel).
_TPU_DIM_ALIGN = 8
_ENV_SWITCH = "FQGAN_JAX_FUSED_SEARCH"
# The self-check's tiles: small, valid on both targets, so its data spans several of them.
_CHECK_BLOCKS = (16, 128)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# ------------------------------------------------------------------------------------------------
# The tile update shared by both kernels.
# ------------------------------------------------------------------------------------------------

def _merge_tile(best_distance, best_index, z, codes_t, bias, offset, normalized: bool):
    """Folds one [rows, codes] tile into the running per-row (distance, index), both [rows, 1]."""
    dots = jnp.dot(z, codes_t, precision=lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
    # `search._code_distances`'s formula; bias is |c|^2 (0 when normalized), +inf for padding.
    distances = bias - dots if normalized else bias - 2.0 * dots
    tile_min = jnp.min(distances, axis=1, keepdims=True)
    # min + first-matching column rather than argmin: lowest index on ties on every backend
    # (Mosaic's arg-reduction does not document its tie rule). The column is reduced as float32
    # (exact below 2^24) because float min-reductions are what every backend lowers best.
    column = lax.broadcasted_iota(jnp.int32, distances.shape, 1).astype(jnp.float32)
    first = jnp.min(jnp.where(distances == tile_min, column, float(distances.shape[1])),
                    axis=1, keepdims=True).astype(jnp.int32)
    # Strict '<' keeps the earlier tile on ties, so the lowest index wins across tiles too.
    improved = tile_min < best_distance
    return (jnp.where(improved, tile_min, best_distance),
            jnp.where(improved, first + offset, best_index))


def _grid_kernel(z_ref, codes_ref, bias_ref, index_ref, distance_ref, *, normalized, block_codes):
    """TPU: one (row block, code block) grid step; the output block is the accumulator."""
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _init():
        distance_ref[...] = jnp.full(distance_ref.shape, jnp.inf, jnp.float32)
        index_ref[...] = jnp.zeros(index_ref.shape, jnp.int32)

    distance, index = _merge_tile(distance_ref[...], index_ref[...], z_ref[...], codes_ref[...],
                                  bias_ref[...], step * block_codes, normalized)
    distance_ref[...] = distance
    index_ref[...] = index


def _loop_kernel(z_ref, codes_ref, bias_ref, index_ref, distance_ref, *, normalized, block_codes):
    """GPU: one row block; loops over the code blocks with the accumulator in registers."""
    z = z_ref[...]
    rows = z.shape[0]

    def step(j, best):
        start = pl.multiple_of(j * block_codes, block_codes)
        codes = codes_ref[:, pl.ds(start, block_codes)]
        bias = bias_ref[:, pl.ds(start, block_codes)]
        return _merge_tile(*best, z, codes, bias, start, normalized)

    init = (jnp.full((rows, 1), jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.int32))
    distance, index = lax.fori_loop(0, codes_ref.shape[1] // block_codes, step, init)
    distance_ref[...] = distance
    index_ref[...] = index


# ------------------------------------------------------------------------------------------------
# Tiling and padding.
# ------------------------------------------------------------------------------------------------

def _fit_block(block: int, size: int, target: str, minimum: int) -> int:
    """Shrinks a block to the padded problem size when the problem is smaller than the block."""
    if target == "gpu":
        return min(block, max(minimum, pl.next_power_of_2(size)))
    return min(block, _round_up(size, minimum))


def _tiling(num_rows, codebook_size, dim, target, block_rows, block_codes, interpret):
    """(block_rows, block_codes, padded d) for `target`; checks alignment off interpret mode."""
    default_rows, default_codes = _DEFAULT_BLOCKS[target]
    if target == "gpu" and dim > _GPU_WIDE_DIM:
        default_codes //= 2
    rows_min, codes_min = (8, 128) if target == "tpu" else (16, 16)
    rows = _fit_block(block_rows or default_rows, num_rows, target, rows_min)
    codes = _fit_block(block_codes or default_codes, codebook_size, target, codes_min)
    padded_dim = (_round_up(dim, _TPU_DIM_ALIGN) if target == "tpu"
                  else max(16, pl.next_power_of_2(dim)))
    if not interpret:
        _check_blocks(target, rows, codes, rows_min, codes_min)
    return rows, codes, padded_dim


def _check_blocks(target, rows, codes, rows_min, codes_min):
    if target == "tpu":
        if rows % rows_min or codes % codes_min:
            raise ValueError(f"TPU blocks must be multiples of ({rows_min}, {codes_min}); got "
                             f"block_rows={rows}, block_codes={codes}")
    elif not (_is_power_of_two(rows) and _is_power_of_two(codes)
              and rows >= rows_min and codes >= codes_min):
        raise ValueError(f"GPU (Triton) blocks must be powers of two >= 16; got "
                         f"block_rows={rows}, block_codes={codes}")


def _padded_operands(z, codebook, normalized, rows, codes, padded_dim):
    """z [N', d'], the transposed codebook [d', K'] and the bias [1, K'] (+inf on padding)."""
    num_rows, dim = z.shape
    codebook_size = codebook.shape[0]
    padded_rows, padded_codes = _round_up(num_rows, rows), _round_up(codebook_size, codes)
    z = jnp.pad(z, ((0, padded_rows - num_rows), (0, padded_dim - dim)))
    codes_t = jnp.pad(codebook.T, ((0, padded_dim - dim), (0, padded_codes - codebook_size)))
    # The same expression as `search._code_distances`.
    bias = (jnp.zeros((codebook_size,), jnp.float32) if normalized
            else jnp.sum(codebook * codebook, axis=-1))
    bias = jnp.pad(bias, (0, padded_codes - codebook_size), constant_values=jnp.inf)
    return z, codes_t, bias[None, :]


# ------------------------------------------------------------------------------------------------
# The search.
# ------------------------------------------------------------------------------------------------

def _default_target(interpret: bool) -> str:
    target = kernel_target(jax.default_backend())
    if target is None and not interpret:
        raise ValueError(
            f"the fused search runs on TPU or CUDA GPUs, not on {jax.default_backend()!r}; pass "
            "interpret=True (tests) or use nearest_code / auto_nearest_code")
    return target or "tpu"


def _compiler_params(target: str, dim: int):
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))
    from jax.experimental.pallas import triton as pltriton

    # Without Triton params, jax 0.10 would lower for Mosaic GPU (its default), which this
    # kernel's loop structure does not target.
    return pltriton.CompilerParams(num_warps=4 if dim <= 64 else 8, num_stages=2)


def _pallas_search(z, codes_t, bias, *, rows, codes, normalized, target, interpret):
    """Runs the kernel for `target` on padded operands: ([N', 1] int32, [N', 1] float32)."""
    (padded_rows, padded_dim), padded_codes = z.shape, codes_t.shape[1]
    out_shape = (jax.ShapeDtypeStruct((padded_rows, 1), jnp.int32),
                 jax.ShapeDtypeStruct((padded_rows, 1), jnp.float32))
    if target == "tpu":
        kernel, grid = _grid_kernel, (padded_rows // rows, padded_codes // codes)
        in_specs = [pl.BlockSpec((rows, padded_dim), lambda i, j: (i, 0)),
                    pl.BlockSpec((padded_dim, codes), lambda i, j: (0, j)),
                    pl.BlockSpec((1, codes), lambda i, j: (0, j))]
        out_spec = pl.BlockSpec((rows, 1), lambda i, j: (i, 0))
    else:
        kernel, grid = _loop_kernel, (padded_rows // rows,)
        in_specs = [pl.BlockSpec((rows, padded_dim), lambda i: (i, 0)),
                    pl.BlockSpec((padded_dim, padded_codes), lambda i: (0, 0)),
                    pl.BlockSpec((1, padded_codes), lambda i: (0, 0))]
        out_spec = pl.BlockSpec((rows, 1), lambda i: (i, 0))
    return pl.pallas_call(
        functools.partial(kernel, normalized=normalized, block_codes=codes),
        out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=(out_spec, out_spec),
        compiler_params=_compiler_params(target, padded_dim), interpret=interpret,
        name="fused_nearest_code",
    )(z, codes_t, bias)


def _batch_axis_first(search):
    """`search` under vmap with the batch axis first. Pallas batches a kernel by adding a block
    dimension where the batch axis is; factorized_vq vmaps z over axis 1, which would put a
    squeezed dimension among the last two of the z block, which Mosaic's (8, 128) tiling
    rejects. One vmap level; nested vmaps still work but may place the axis anywhere again."""
    wrapped = jax.custom_batching.custom_vmap(search)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, *args):  # batched args arrive with the batch axis first
        del axis_size
        in_axes = [0 if batched else None for batched in in_batched]
        return jax.vmap(search, in_axes=in_axes)(*args), (True, True)

    return wrapped


def fused_nearest_code_and_distance(
    z: jax.Array, codebook: jax.Array, *, normalized: bool = False,
    block_rows: int | None = None, block_codes: int | None = None,
    target: str | None = None, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`nearest_code_and_distance` as one Pallas kernel: (int32 [N], float32 [N]).

    ``target`` ("tpu" or "gpu") picks the kernel; by default the one for JAX's default backend
    (on CPU only with ``interpret=True``, which then emulates the TPU kernel). Block sizes
    default per target and shrink to the problem; off interpret mode they must suit the target
    (TPU: multiples of (8, 128); GPU: powers of two >= 16)."""
    check_rows_and_codebook(z, codebook, "fused_nearest_code")
    target = target or _default_target(interpret)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}; got {target!r}")
    # Indices are not differentiable, as in `nearest_code`.
    z = lax.stop_gradient(jnp.asarray(z, jnp.float32))
    codebook = lax.stop_gradient(jnp.asarray(codebook, jnp.float32))
    num_rows, dim = z.shape
    if num_rows == 0:
        return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
    rows, codes, padded_dim = _tiling(num_rows, codebook.shape[0], dim, target,
                                      block_rows, block_codes, interpret)
    operands = _padded_operands(z, codebook, normalized, rows, codes, padded_dim)
    search = _batch_axis_first(functools.partial(
        _pallas_search, rows=rows, codes=codes, normalized=normalized, target=target,
        interpret=interpret))
    index, distance = search(*operands)
    return index[:num_rows, 0], distance[:num_rows, 0]


def fused_nearest_code(
    z: jax.Array, codebook: jax.Array, *, normalized: bool = False,
    block_rows: int | None = None, block_codes: int | None = None,
    target: str | None = None, interpret: bool = False,
    memory_budget_bytes: int | None = None,
) -> jax.Array:
    """`nearest_code` as one Pallas kernel: z [N, d], codebook [K, d] -> int32 [N].

    ``memory_budget_bytes`` is accepted so this is a drop-in for `nearest_code`, and ignored:
    the kernel's working set is its tiles, whatever N and K."""
    del memory_budget_bytes
    return fused_nearest_code_and_distance(
        z, codebook, normalized=normalized, block_rows=block_rows, block_codes=block_codes,
        target=target, interpret=interpret)[0]


# ------------------------------------------------------------------------------------------------
# Automatic selection.
# ------------------------------------------------------------------------------------------------

def kernel_target(platform: str) -> str | None:
    """The kernel for a JAX platform name, or None where the XLA search is used."""
    if platform == "tpu":
        return "tpu"
    if platform == "cuda":
        return "gpu"
    if platform == "gpu":  # JAX's backend name for both CUDA and ROCm; the kernel is CUDA-only.
        try:
            version = getattr(jax.devices("gpu")[0].client, "platform_version", "")
        except RuntimeError:  # no GPU in this process: answer for CUDA
            version = ""
        return None if "rocm" in version.lower() else "gpu"
    return None


def _backend() -> str:
    return jax.default_backend()  # a seam for the tests, which have only a CPU


def supported(platform: str) -> bool:
    """Whether the fused kernel is used on a JAX platform ("tpu", "gpu"/"cuda"; not "cpu")."""
    return os.environ.get(_ENV_SWITCH, "1") != "0" and kernel_target(platform) is not None


def self_check_data(dim: int):
    """Tie-heavy integer data over several `_CHECK_BLOCKS` tiles: every fp32 distance is exact
    whatever the summation order, so the kernel must equal `nearest_code` bit for bit; the
    repeated codes straddle code-block boundaries (rows 0, 269, 538 and 807 are equal)."""
    rng = np.random.default_rng(0)
    z = rng.integers(-3, 4, size=(45, dim)).astype(np.float32)
    base = rng.integers(-3, 4, size=(269, dim)).astype(np.float32)
    return z, np.concatenate([base, base, base, base[:97]])  # K = 904


def _run_compiled(function, *args):
    # Lowering traces `function` on its own and a Compiled call runs at once, so this executes
    # now even when called while an outer jit traces the model.
    return np.asarray(jax.jit(function).lower(*args).compile()(*args))


@functools.lru_cache(maxsize=None)
def kernel_agrees(target: str, dim: int, normalized: bool, interpret: bool = False) -> bool:
    """Whether the kernel for (target, d) compiles and equals `nearest_code` on
    `self_check_data` (False, with a warning, on any failure or difference)."""
    z, codebook = self_check_data(dim)
    rows, codes = _CHECK_BLOCKS
    fused = functools.partial(fused_nearest_code, normalized=normalized, target=target,
                              block_rows=rows, block_codes=codes, interpret=interpret)
    try:
        got = _run_compiled(fused, z, codebook)
        want = _run_compiled(functools.partial(nearest_code, normalized=normalized), z, codebook)
    except Exception as error:  # noqa: BLE001 - any lowering/compile failure means "use XLA"
        logging.warning("fused nearest-code kernel unavailable on %s (d=%d): %s; using the XLA "
                        "search", target, dim, error)
        return False
    if not np.array_equal(got, want):
        logging.warning("fused nearest-code kernel disagrees with nearest_code on %s (d=%d, %d "
                        "of %d rows); using the XLA search", target, dim,
                        int(np.sum(got != want)), got.size)
        return False
    return True


@functools.lru_cache(maxsize=None)
def kernel_compiles(target: str, num_rows: int, codebook_size: int, dim: int,
                    normalized: bool) -> bool:
    """Whether the kernel compiles at this size with its default tiles (VMEM, registers)."""
    shapes = (jax.ShapeDtypeStruct((num_rows, dim), jnp.float32),
              jax.ShapeDtypeStruct((codebook_size, dim), jnp.float32))
    fused = functools.partial(fused_nearest_code, normalized=normalized, target=target)
    try:
        jax.jit(fused).lower(*shapes).compile()
    except Exception as error:  # noqa: BLE001
        logging.warning("fused nearest-code kernel does not compile on %s for N=%d K=%d d=%d: "
                        "%s; using the XLA search", target, num_rows, codebook_size, dim, error)
        return False
    return True


def auto_nearest_code(
    z: jax.Array, codebook: jax.Array, *, normalized: bool = False,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> jax.Array:
    """`nearest_code`'s drop-in: the fused kernel on JAX's default backend where it is
    `supported`, agrees with `nearest_code` (`kernel_agrees`) and compiles at this size
    (`kernel_compiles`); else `nearest_code` with ``memory_budget_bytes``. Decided at trace
    time, each check once per process and shape."""
    platform = _backend()
    target = kernel_target(platform) if supported(platform) else None
    if (target is not None and kernel_agrees(target, z.shape[-1], normalized)
            and kernel_compiles(target, *z.shape[:1], *codebook.shape, normalized)):
        return fused_nearest_code(z, codebook, normalized=normalized, target=target)
    return nearest_code(z, codebook, normalized=normalized,
                        memory_budget_bytes=memory_budget_bytes)


def search_function(shard_axis: str | None):
    """The nearest-code search a quantizer should call, as `f(z, codebook, *, normalized,
    memory_budget_bytes)`: over codebook rows split across `shard_axis` when the program is
    traced under a mesh where that axis has > 1 device (`sharded_nearest_code`), else
    `auto_nearest_code` (the fused kernel on GPU/TPU, the chunked XLA search elsewhere)."""
    if shard_axis and context_axis_size(shard_axis) > 1:
        return functools.partial(sharded_nearest_code, axis=shard_axis)
    return auto_nearest_code
