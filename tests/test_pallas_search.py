"""The fused Pallas nearest-code search (quantizers/pallas_search.py), in interpret mode on CPU:
exactly `nearest_code` at odd N, K and d, for both kernels (TPU grid, GPU loop) and for tiles
that do not divide N or K; lowest index on ties, also across tiles; jit and vmap; the kernels'
TPU and CUDA lowerings; and the backend-driven selection with its fallback to XLA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fqgan_jax.quantizers import pallas_search, search

TARGETS = ("tpu", "gpu")
# (block_rows, block_codes): the defaults (shrunk to the problem), tiles dividing neither N nor
# K, TPU-aligned tiles, and the smallest GPU tiles.
BLOCKS = [(None, None), (16, 100), (8, 128), (16, 16)]


def random_points(seed, num_rows, codebook_size, dim, unit):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num_rows, dim)).astype(np.float32)
    codebook = rng.normal(size=(codebook_size, dim)).astype(np.float32)
    if unit:
        z /= np.linalg.norm(z, axis=-1, keepdims=True)
        codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    return z, codebook


def fused(target, normalized=False, block_rows=None, block_codes=None):
    return jax.jit(functools.partial(
        pallas_search.fused_nearest_code_and_distance, normalized=normalized, target=target,
        block_rows=block_rows, block_codes=block_codes, interpret=True))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("normalized", [False, True], ids=["l2", "dot"])
@pytest.mark.parametrize("shape", [(37, 301, 7), (5, 1000, 3)], ids=lambda s: "x".join(map(str, s)))
def test_equals_nearest_code_on_random_data(shape, normalized, target):
    z, codebook = random_points(sum(shape), *shape, unit=normalized)
    want_index, want_distance = search.nearest_code_and_distance(z, codebook,
                                                                 normalized=normalized)
    for blocks in BLOCKS:
        index, distance = fused(target, normalized, *blocks)(z, codebook)
        assert index.dtype == jnp.int32 and index.shape == (shape[0],)
        np.testing.assert_array_equal(index, want_index, err_msg=f"blocks {blocks}")
        # Same formula in float32; XLA's CPU code for |c|^2 and the tile matmuls may round the
        # last bit differently per program (vectorized reductions), so not bit for bit here.
        np.testing.assert_allclose(distance, want_distance, rtol=1e-6, atol=1e-6)


def tie_heavy_points(dim=5):
    """Small integers (every distance exact) and a codebook of 4 copies of 75 codes, so each
    code's duplicates sit 75 apart, in different tiles for every block size used below."""
    rng = np.random.default_rng(7)
    z = rng.integers(-2, 3, size=(41, dim)).astype(np.float32)
    base = rng.integers(-2, 3, size=(75, dim)).astype(np.float32)
    codebook = np.concatenate([base] * 4 + [base[:1]])  # K = 301; code 0 also at 300
    z[:4] = codebook[[0, 74, 150, 300]]  # exact hits on duplicated codes
    return z, codebook


@pytest.mark.parametrize("target", TARGETS)
def test_ties_resolve_to_the_lowest_index(target):
    z, codebook = tie_heavy_points()
    distances = (z * z).sum(-1)[:, None] + (codebook * codebook).sum(-1) - 2 * z @ codebook.T
    expected = distances.argmin(-1)  # numpy: first minimum
    assert (distances == distances.min(-1, keepdims=True)).sum(-1).min() >= 4  # all tied
    np.testing.assert_array_equal(expected[:4], [0, 74, 0, 0])
    for normalized in (False, True):
        want = search.nearest_code(z, codebook, normalized=normalized)
        if not normalized:
            np.testing.assert_array_equal(want, expected)
        want_distance = search.nearest_code_and_distance(z, codebook, normalized=normalized)[1]
        for blocks in [(None, None), (16, 16), (8, 70), (32, 128)]:
            index, distance = fused(target, normalized, *blocks)(z, codebook)
            np.testing.assert_array_equal(index, want, err_msg=f"{normalized=} {blocks=}")
            np.testing.assert_array_equal(distance, want_distance)  # exact arithmetic here


@pytest.mark.parametrize("target", TARGETS)
def test_jit_and_vmap_over_sub_codebooks(target):
    # As factorized_vq calls it: z [M, k, d] against k codebooks [k, K, d], vmapped under jit.
    rng = np.random.default_rng(3)
    z = rng.normal(size=(29, 3, 5)).astype(np.float32)
    codebooks = rng.normal(size=(3, 150, 5)).astype(np.float32)
    search_fused = functools.partial(pallas_search.fused_nearest_code, target=target,
                                     interpret=True, block_rows=16, block_codes=64,
                                     memory_budget_bytes=1024)  # accepted and ignored
    got = jax.jit(jax.vmap(search_fused, in_axes=(1, 0), out_axes=1))(z, codebooks)
    want = jax.vmap(search.nearest_code, in_axes=(1, 0), out_axes=1)(z, codebooks)
    assert got.shape == (29, 3)
    np.testing.assert_array_equal(got, want)


def test_degenerate_sizes():
    z, codebook = random_points(5, 3, 1, 1, unit=False)
    index, _ = fused("tpu")(z, codebook)
    np.testing.assert_array_equal(index, [0, 0, 0])
    index, distance = fused("gpu")(np.zeros((0, 4), np.float32), codebook.repeat(4, 1))
    assert index.shape == distance.shape == (0,)


@pytest.mark.parametrize("normalized", [False, True], ids=["l2", "dot"])
def test_kernels_lower_for_tpu_and_cuda(normalized):
    # Cross-platform lowering runs the Mosaic and Triton lowerings of the kernel bodies here
    # (their block-shape checks and op rules); only the final device compile needs the hardware.
    calls = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", "xla.gpu.triton")}
    z = jax.ShapeDtypeStruct((65_536, 8), jnp.float32)
    codebook = jax.ShapeDtypeStruct((262_144, 8), jnp.float32)
    for target, (platform, custom_call) in calls.items():
        search_fused = functools.partial(pallas_search.fused_nearest_code, target=target,
                                         normalized=normalized)
        text = jax.jit(search_fused).trace(z, codebook).lower(
            lowering_platforms=(platform,)).as_text()
        assert custom_call in text
        # vmapped over axis 1 as factorized_vq does (Mosaic needs the batch block axis first).
        batched = jax.jit(jax.vmap(search_fused, in_axes=(1, 0), out_axes=1)).trace(
            jax.ShapeDtypeStruct((1000, 2, 300), jnp.float32),
            jax.ShapeDtypeStruct((2, 4096, 300), jnp.float32))
        assert custom_call in batched.lower(lowering_platforms=(platform,)).as_text()


def test_rejects_bad_blocks_and_cpu_without_interpret():
    z, codebook = np.zeros((64, 8), np.float32), np.zeros((512, 8), np.float32)
    with pytest.raises(ValueError, match="multiples of"):
        pallas_search.fused_nearest_code(z, codebook, target="tpu", block_codes=100)
    with pytest.raises(ValueError, match="powers of two"):
        pallas_search.fused_nearest_code(z, codebook, target="gpu", block_rows=24)
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_search.fused_nearest_code(z, codebook)
    with pytest.raises(ValueError, match="same d"):
        pallas_search.fused_nearest_code(z, codebook[:, :4], interpret=True)


# ------------------------------------------------------------------------------------------------
# Selection.
# ------------------------------------------------------------------------------------------------

def test_supported_platforms(monkeypatch):
    assert pallas_search.supported("tpu") and pallas_search.supported("cuda")
    assert pallas_search.supported("gpu")  # no GPU here: answered for CUDA
    assert not pallas_search.supported("cpu") and not pallas_search.supported("rocm")
    monkeypatch.setenv("FQGAN_JAX_FUSED_SEARCH", "0")
    assert not pallas_search.supported("tpu")
    # Quantizers search through the automatic choice when the codebook is not sharded, or its
    # axis has one device.
    assert pallas_search.search_function(None) is pallas_search.auto_nearest_code
    assert pallas_search.search_function("fsdp") is pallas_search.auto_nearest_code


def has_pallas_call(function, *args) -> bool:
    # A fresh lambda each time: make_jaxpr would otherwise reuse its cached trace of `function`,
    # skipping the checks that run while it traces.
    return "pallas_call" in str(jax.make_jaxpr(lambda *a: function(*a))(*args))


def test_auto_search_uses_xla_on_cpu():
    z, codebook = random_points(11, 20, 300, 4, unit=True)
    auto = functools.partial(pallas_search.auto_nearest_code, normalized=True,
                             memory_budget_bytes=2048)
    assert not has_pallas_call(auto, z, codebook)
    np.testing.assert_array_equal(jax.jit(auto)(z, codebook),
                                  search.nearest_code(z, codebook, normalized=True))


@pytest.fixture
def fresh_checks():
    pallas_search.kernel_agrees.cache_clear()
    pallas_search.kernel_compiles.cache_clear()
    yield
    pallas_search.kernel_agrees.cache_clear()
    pallas_search.kernel_compiles.cache_clear()


@pytest.mark.usefixtures("fresh_checks")
def test_auto_search_picks_the_kernel_on_an_accelerator_and_falls_back(monkeypatch):
    # Pretend to be a TPU whose kernel runs in interpret mode; then break the kernel's tie rule.
    agrees = pallas_search.kernel_agrees
    monkeypatch.setattr(pallas_search, "_backend", lambda: "tpu")
    monkeypatch.setattr(pallas_search, "kernel_agrees", lambda *args: agrees(*args, True))
    monkeypatch.setattr(pallas_search, "kernel_compiles", lambda *args: True)
    monkeypatch.setattr(pallas_search, "fused_nearest_code", functools.partial(
        pallas_search.fused_nearest_code, interpret=True))
    z, codebook = tie_heavy_points(dim=6)
    assert has_pallas_call(pallas_search.auto_nearest_code, z, codebook)  # checks ran in trace
    np.testing.assert_array_equal(jax.jit(pallas_search.auto_nearest_code)(z, codebook),
                                  search.nearest_code(z, codebook))

    merge = pallas_search._merge_tile

    def later_tile_on_ties(best_distance, *args):
        # '<=' instead of '<' across tiles: the last of the tied codes would win.
        return merge(jnp.nextafter(best_distance, jnp.inf), *args)

    agrees.cache_clear()
    monkeypatch.setattr(pallas_search, "_merge_tile", later_tile_on_ties)
    assert not has_pallas_call(pallas_search.auto_nearest_code, z, codebook)
    monkeypatch.setattr(pallas_search, "_merge_tile", merge)
    agrees.cache_clear()
    monkeypatch.setenv("FQGAN_JAX_FUSED_SEARCH", "0")
    assert not has_pallas_call(pallas_search.auto_nearest_code, z, codebook)
