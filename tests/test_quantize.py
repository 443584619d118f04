"""Tests for fqgan_jax.quantizers: search, memory bounds, gradients, entropy, usage, sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fqgan_jax import quantizers
from fqgan_jax.quantizers import search

KIB, MIB, GIB = 2**10, 2**20, 2**30


# ------------------------------------------------------------------------------------------------
# Reference implementations (deliberately naive).
# ------------------------------------------------------------------------------------------------


def brute_force_distances(z, codebook, rows_per_block=8):
    """float64 squared L2 distances [N, K] by broadcasting, blocked over rows to bound memory."""
    z = np.asarray(z, np.float64)
    codebook = np.asarray(codebook, np.float64)
    blocks = [
        ((z[i : i + rows_per_block, None] - codebook[None]) ** 2).sum(-1)
        for i in range(0, len(z), rows_per_block)
    ]
    return np.concatenate(blocks)


def assert_same_code_or_tie(indices, z, codebook, atol=1e-5):
    """Indices equal brute force, except where fp32 rounding picks an equally distant code."""
    distances = brute_force_distances(z, codebook)
    expected = distances.argmin(-1)
    indices = np.asarray(indices)
    rows = np.arange(len(z))
    differ = indices != expected
    np.testing.assert_allclose(
        distances[rows, indices][differ], distances[rows, expected][differ], rtol=0, atol=atol
    )
    assert differ.mean() < 0.01, f"{differ.sum()} of {len(z)} rows disagree"


def reference_entropy_loss(z, codebook, temperature=0.01):
    """spec fqgan.md §1.4, written the way LlamaGen does: full matrix, softmax over codes."""
    squared_distance = jnp.sum((z[:, None, :] - codebook[None, :, :]) ** 2, axis=-1)
    logits = -squared_distance / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    sample_entropy = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
    avg_probs = jnp.mean(probs, axis=0)
    avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
    return sample_entropy - avg_entropy


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_points(seed, num_rows, codebook_size, dim=8, unit=False):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num_rows, dim)).astype(np.float32)
    codebook = rng.normal(size=(codebook_size, dim)).astype(np.float32)
    if unit:
        z, codebook = unit_rows(z), unit_rows(codebook)
    return z, codebook


def jit_nearest(budget, normalized=False):
    return jax.jit(
        functools.partial(
            quantizers.nearest_code, normalized=normalized, memory_budget_bytes=budget
        )
    )


# (N, K, budget) cases covering each branch of the blocking plan.
SEARCH_CASES = {
    "direct": (100, 700, 256 * MIB),
    "chunks_divide_k": (64, 1024, 64 * 256 * 4),
    "k_not_multiple_of_chunk": (64, 1000, 64 * 192 * 4),
    "row_blocks": (300, 1000, 40 * 128 * 4),
    "row_blocks_ragged_n": (37, 523, 10 * 128 * 4),
    "budget_below_floor": (13, 300, 16),
}


# ------------------------------------------------------------------------------------------------
# nearest_code
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(SEARCH_CASES))
def test_blocking_plan_respects_budget_and_covers_everything(case):
    num_rows, codebook_size, budget = SEARCH_CASES[case]
    plan = search.plan_blocks(num_rows, codebook_size, budget)
    assert plan.num_row_blocks * plan.row_block >= num_rows
    assert plan.num_chunks * plan.chunk >= codebook_size
    floor = 4 * min(codebook_size, search.MIN_CODE_CHUNK)
    assert plan.row_block * plan.chunk * 4 <= max(budget, floor)
    expected_blocking = {"direct": (1, 1), "budget_below_floor": (13, 3)}
    if case in expected_blocking:
        assert (plan.num_row_blocks, plan.num_chunks) == expected_blocking[case]
    else:
        assert plan.num_chunks > 1
        assert (plan.num_row_blocks > 1) == case.startswith("row_blocks")


@pytest.mark.parametrize("case", sorted(SEARCH_CASES))
def test_nearest_code_matches_brute_force(case):
    num_rows, codebook_size, budget = SEARCH_CASES[case]
    z, codebook = random_points(0, num_rows, codebook_size)
    indices = jit_nearest(budget)(z, codebook)
    assert indices.dtype == jnp.int32 and indices.shape == (num_rows,)
    assert_same_code_or_tie(indices, z, codebook)


@pytest.mark.parametrize("case", sorted(SEARCH_CASES))
def test_nearest_code_exact_with_ties_on_integer_data(case):
    # Small integers make every fp32 distance exact, and many codes repeat, so exact ties are
    # common; the result must be bit-identical to numpy's argmin, including "lowest index wins"
    # when the tied codes sit in different chunks.
    num_rows, codebook_size, budget = SEARCH_CASES[case]
    rng = np.random.default_rng(1)
    z = rng.integers(-2, 3, size=(num_rows, 8)).astype(np.float32)
    codebook = rng.integers(-2, 3, size=(codebook_size // 4, 8)).astype(np.float32)
    codebook = np.concatenate([codebook] * 4 + [codebook[: codebook_size % 4]])
    expected = brute_force_distances(z, codebook).argmin(-1)
    np.testing.assert_array_equal(jit_nearest(budget)(z, codebook), expected)


@pytest.mark.parametrize("budget", [64 * 4096 * 4, 16 * KIB])
def test_nearest_code_with_262k_codes(budget):
    # 64 chunks of 4096 codes; then 16 KiB forces 2 row blocks x 2048 chunks of 128 codes.
    z, codebook = random_points(2, 64, 262_144, unit=True)
    plan = search.plan_blocks(64, 262_144, budget)
    assert plan.num_chunks >= 64
    indices = jit_nearest(budget)(z, codebook)
    assert_same_code_or_tie(indices, z, codebook)


@pytest.mark.parametrize("budget", [256 * MIB, 32 * 128 * 4])
def test_normalized_search_agrees_on_unit_vectors(budget):
    z, codebook = random_points(3, 200, 1500, unit=True)
    by_dot = jit_nearest(budget, normalized=True)(z, codebook)
    by_distance = jit_nearest(budget, normalized=False)(z, codebook)
    distances = brute_force_distances(z, codebook)
    rows = np.arange(len(z))
    by_dot, by_distance = np.asarray(by_dot), np.asarray(by_distance)
    np.testing.assert_allclose(distances[rows, by_dot], distances[rows, by_distance], atol=1e-6)
    assert (by_dot == by_distance).mean() > 0.99
    assert_same_code_or_tie(by_dot, z, codebook)


def test_nearest_code_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same d"):
        quantizers.nearest_code(jnp.zeros((4, 8)), jnp.zeros((16, 4)))
    with pytest.raises(ValueError, match="vmap"):
        quantizers.nearest_code(jnp.zeros((2, 4, 8)), jnp.zeros((2, 16, 8)))


# ------------------------------------------------------------------------------------------------
# Memory: compiled temp buffers measured by XLA's buffer assignment.
# ------------------------------------------------------------------------------------------------


def compiled_temp_bytes(fn, *shapes):
    """Temp (scratch) bytes XLA assigns to fn; on CPU this comes from XLA's buffer assignment."""
    specs = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return jax.jit(fn).lower(*specs).compile().memory_analysis().temp_size_in_bytes


def test_nearest_code_262k_codes_16k_rows_fits_in_1_gib():
    num_rows, codebook_size, dim = 16_384, 262_144, 8
    ours = compiled_temp_bytes(quantizers.nearest_code, (num_rows, dim), (codebook_size, dim))
    assert ours < 1 * GIB
    assert ours <= quantizers.DEFAULT_MEMORY_BUDGET_BYTES + 16 * MIB

    # The same measurement sees the naive search's 16 GiB matrix, so it is not vacuous.
    def naive(z, codebook):
        distances = jnp.sum(codebook**2, -1) - 2.0 * z @ codebook.T
        return jnp.argmin(distances, axis=-1)

    assert compiled_temp_bytes(naive, (num_rows, dim), (codebook_size, dim)) >= 16 * GIB


def test_entropy_loss_gradient_stays_within_budget():
    # Full matrices would be 1 GiB each; forward + backward must stay near the 64 MiB budget.
    budget = 64 * MIB
    loss = functools.partial(quantizers.entropy_loss, memory_budget_bytes=budget)
    grad_temp = compiled_temp_bytes(jax.grad(loss, argnums=(0, 1)), (4096, 8), (65_536, 8))
    assert grad_temp < 1.25 * budget


# ------------------------------------------------------------------------------------------------
# straight_through
# ------------------------------------------------------------------------------------------------


def test_straight_through_matches_stop_gradient_form():
    rng = np.random.default_rng(4)
    z, q, weights = (jnp.asarray(rng.normal(size=(5, 3)), jnp.float32) for _ in range(3))

    def via_custom_vjp(z, q):
        return jnp.sum(weights * jnp.sin(quantizers.straight_through(z, q)))

    def via_stop_gradient(z, q):
        return jnp.sum(weights * jnp.sin(z + jax.lax.stop_gradient(q - z)))

    np.testing.assert_array_equal(quantizers.straight_through(z, q), q)
    np.testing.assert_allclose(via_custom_vjp(z, q), via_stop_gradient(z, q), rtol=1e-6)
    grads = jax.grad(via_custom_vjp, argnums=(0, 1))(z, q)
    expected = jax.grad(via_stop_gradient, argnums=(0, 1))(z, q)
    np.testing.assert_allclose(grads[0], expected[0], rtol=1e-6)
    np.testing.assert_array_equal(grads[1], np.zeros((5, 3)))
    np.testing.assert_array_equal(expected[1], np.zeros((5, 3)))


def test_straight_through_keeps_z_dtype_and_checks_shapes():
    z = jnp.ones((4,), jnp.bfloat16)
    q = jnp.full((4,), 2.0, jnp.float32)
    grad_z = jax.grad(lambda z: jnp.sum(quantizers.straight_through(z, q) * 3.0))(z)
    assert grad_z.dtype == jnp.bfloat16
    np.testing.assert_array_equal(grad_z, np.full((4,), 3.0))
    with pytest.raises(ValueError, match="equal shapes"):
        quantizers.straight_through(jnp.ones((4,)), jnp.ones((1, 4)))


# ------------------------------------------------------------------------------------------------
# entropy_loss
# ------------------------------------------------------------------------------------------------


ENTROPY_CASES = {
    "direct": (48, 300, 256 * MIB),
    "chunks": (48, 1024, 4 * 48 * 256 * 4),
    "k_not_multiple_of_chunk": (48, 1000, 4 * 48 * 192 * 4),
    "row_blocks": (37, 523, 4 * 10 * 128 * 4),
}


@pytest.mark.parametrize("unit", [True, False], ids=["unit", "raw"])
@pytest.mark.parametrize("case", sorted(ENTROPY_CASES))
def test_entropy_loss_matches_direct_formula(case, unit):
    num_rows, codebook_size, budget = ENTROPY_CASES[case]
    z, codebook = random_points(5, num_rows, codebook_size, unit=unit)
    if not unit:  # keep the softmax from being one-hot so every term matters
        z, codebook = 0.1 * z, 0.1 * codebook
    chunked = functools.partial(quantizers.entropy_loss, memory_budget_bytes=budget)
    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(z, codebook)
    expected, expected_grads = jax.value_and_grad(reference_entropy_loss, argnums=(0, 1))(
        z, codebook
    )
    np.testing.assert_allclose(value, expected, rtol=2e-5, atol=2e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        scale = float(jnp.max(jnp.abs(expected_grad)))
        assert scale > 0
        np.testing.assert_allclose(grad, expected_grad, rtol=0, atol=2e-4 * scale)


def test_entropy_loss_extremes():
    # All rows on one code: confident (sample entropy 0) but batch average collapsed -> ~0 loss.
    codebook = jnp.asarray(unit_rows(np.eye(8, dtype=np.float32)))
    collapsed = jnp.tile(codebook[:1], (16, 1))
    assert abs(float(quantizers.entropy_loss(collapsed, codebook))) < 1e-3
    # Each row on its own code: confident and uniform over 8 codes -> -log(8).
    spread = jnp.tile(codebook, (2, 1))
    for budget in (256 * MIB, 16):
        loss = quantizers.entropy_loss(spread, codebook, memory_budget_bytes=budget)
        np.testing.assert_allclose(loss, -np.log(8), rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# code_histogram / usage_stats
# ------------------------------------------------------------------------------------------------


def test_code_histogram_counts_per_sub_codebook():
    indices = jnp.array([[[0, 1], [0, 2], [3, 1]], [[0, 0], [2, 2], [3, 3]]])  # [2, 3, k=2]
    counts = quantizers.code_histogram(indices, 4)
    assert counts.dtype == jnp.int32
    np.testing.assert_array_equal(counts, [[3, 0, 1, 2], [1, 2, 2, 1]])
    mask = jnp.array([[True, True, False], [True, False, False]])
    masked = quantizers.code_histogram(indices, 4, mask=mask)
    np.testing.assert_array_equal(masked, [[3, 0, 0, 0], [1, 1, 1, 0]])
    # A mask over leading axes only (one flag per image) covers all of that image's tokens.
    per_image = quantizers.code_histogram(indices, 4, mask=jnp.array([False, True]))
    np.testing.assert_array_equal(per_image, [[1, 0, 1, 1], [1, 0, 1, 1]])
    np.testing.assert_array_equal(quantizers.code_histogram(indices, 3), [[3, 0, 1], [1, 2, 2]])
    with pytest.raises(ValueError, match="mask shape"):
        quantizers.code_histogram(indices, 4, mask=jnp.ones((3,), bool))


def test_usage_stats_on_hand_built_counts():
    counts = jnp.array([[2, 0, 0, 2], [4, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    stats = quantizers.usage_stats(counts)
    np.testing.assert_allclose(stats["usage"], [0.5, 0.25, 1.0, 0.0])
    np.testing.assert_allclose(stats["perplexity"], [2.0, 1.0, 4.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(stats["top_code_share"], [0.5, 1.0, 0.25, 0.0])
    assert all(value.dtype == jnp.float32 for value in stats.values())


# ------------------------------------------------------------------------------------------------
# FactorizedQuantizer
# ------------------------------------------------------------------------------------------------


def make_quantizer(num_codebooks=2, codebook_size=64, code_dim=8, seed=0, **kwargs):
    return quantizers.FactorizedQuantizer(
        num_codebooks=num_codebooks, codebook_size=codebook_size, code_dim=code_dim,
        rngs=nnx.Rngs(seed), **kwargs,
    )


def random_latents(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def grads_wrt_codebook_and_z(quantizer, loss_of_output, z):
    """d loss / d (codebook, z) with the quantizer split into (graphdef, params) like a trainer."""
    graphdef, params = nnx.split(quantizer)

    def loss(params, z):
        return loss_of_output(nnx.merge(graphdef, params)(z, with_entropy=True))

    param_grads, z_grad = jax.grad(loss, argnums=(0, 1))(params, z)
    return param_grads["codebook"][...], z_grad


def test_quantizer_init_and_lookup():
    quantizer = make_quantizer(num_codebooks=3, codebook_size=128, code_dim=4)
    codebook = quantizer.codebook[...]
    assert codebook.shape == (3, 128, 4) and codebook.dtype == jnp.float32
    np.testing.assert_allclose(jnp.linalg.norm(codebook, axis=-1), 1.0, rtol=1e-6)
    raw = make_quantizer(codebook_size=128, l2_normalize=False).codebook[...]
    assert float(jnp.max(jnp.abs(raw))) <= 1.0 / 128

    z = random_latents(6, (2, 5, 3, 4)).astype(jnp.bfloat16)
    out = quantizer(z)
    assert out.quantized.shape == (2, 5, 3, 4) and out.quantized.dtype == jnp.float32
    assert out.indices.shape == (2, 5, 3) and out.indices.dtype == jnp.int32
    np.testing.assert_array_equal(quantizer.lookup(out.indices), out.quantized)
    assert float(out.losses["entropy"]) == 0.0
    with pytest.raises(ValueError, match="expects z"):
        quantizer(jnp.zeros((2, 5, 2, 4)))


def test_decoder_gradient_passes_straight_through_and_skips_codebook():
    quantizer = make_quantizer(l2_normalize=False)
    z = random_latents(7, (3, 4, 2, 8))
    weights = random_latents(8, (3, 4, 2, 8))

    def decoder_loss(codes):
        return jnp.sum(weights * jnp.sin(codes))

    graphdef, params = nnx.split(quantizer)
    param_grads, z_grad = jax.grad(
        lambda params, z: decoder_loss(nnx.merge(graphdef, params)(z).quantized), argnums=(0, 1)
    )(params, z)
    codes = quantizer(z).quantized
    np.testing.assert_allclose(z_grad, jax.grad(decoder_loss)(codes), rtol=1e-6)
    np.testing.assert_array_equal(param_grads["codebook"][...], 0.0)


def test_decoder_gradient_through_l2_normalization():
    quantizer = make_quantizer()
    z = random_latents(9, (6, 2, 8))
    weights = random_latents(10, (6, 2, 8))
    codebook_grad, z_grad = grads_wrt_codebook_and_z(
        quantizer, lambda out: jnp.sum(weights * out.quantized), z
    )
    # dL/dcodes = weights flows unchanged to the normalized z, then through the normalization.
    _, normalize_vjp = jax.vjp(quantizers.l2_normalized, z)
    np.testing.assert_allclose(z_grad, normalize_vjp(weights)[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(codebook_grad, 0.0)


@pytest.mark.parametrize(
    "loss_name, codebook_moves, z_moves",
    [("codebook", True, False), ("commitment", False, True), ("entropy", True, True)],
)
def test_each_loss_trains_only_what_it_should(loss_name, codebook_moves, z_moves):
    quantizer = make_quantizer()
    z = random_latents(11, (4, 4, 2, 8))
    codebook_grad, z_grad = grads_wrt_codebook_and_z(
        quantizer, lambda out: out.losses[loss_name], z
    )
    assert bool(jnp.any(codebook_grad != 0)) == codebook_moves
    assert bool(jnp.any(z_grad != 0)) == z_moves


def plain_vector_quantizer(z, codebook, beta=0.25, temperature=0.01):
    """A single LlamaGen VectorQuantizer written inline: normalize, argmin, STE, losses."""
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
    codebook = codebook / jnp.linalg.norm(codebook, axis=-1, keepdims=True)
    distances = jnp.sum((z[:, None] - codebook[None]) ** 2, axis=-1)
    quantized = codebook[jnp.argmin(distances, axis=-1)]
    codes = z + jax.lax.stop_gradient(quantized - z)
    codebook_loss = jnp.mean((quantized - jax.lax.stop_gradient(z)) ** 2)
    commitment_loss = jnp.mean((jax.lax.stop_gradient(quantized) - z) ** 2)
    entropy = reference_entropy_loss(z, codebook, temperature)
    return codes, jnp.argmin(distances, axis=-1), codebook_loss, commitment_loss, entropy


def test_single_codebook_equals_plain_vector_quantizer():
    quantizer = make_quantizer(num_codebooks=1, codebook_size=256)
    z = random_latents(12, (4, 8, 1, 8))
    weights = random_latents(13, (32, 8))
    graphdef, params = nnx.split(quantizer)
    codebook = quantizer.codebook[...][0]

    def ours(codebook_param, z):
        params_with_codebook = jax.tree.map(lambda _: codebook_param[None], params)
        out = nnx.merge(graphdef, params_with_codebook)(z, with_entropy=True)
        total = jnp.sum(weights * out.quantized.reshape(32, 8)) + out.losses["codebook"]
        return total + 0.25 * out.losses["commitment"] + out.losses["entropy"], out

    def plain(codebook_param, z):
        codes, indices, codebook_loss, commitment_loss, entropy = plain_vector_quantizer(
            z.reshape(32, 8), codebook_param
        )
        total = jnp.sum(weights * codes) + codebook_loss + 0.25 * commitment_loss + entropy
        return total, (codes, indices, codebook_loss, commitment_loss, entropy)

    (total, out), grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(
        codebook, z
    )
    (expected_total, expected), expected_grads = jax.jit(
        jax.value_and_grad(plain, argnums=(0, 1), has_aux=True)
    )(codebook, z)
    np.testing.assert_array_equal(out.indices.reshape(32), expected[1])
    np.testing.assert_allclose(out.quantized.reshape(32, 8), expected[0], rtol=1e-6, atol=1e-7)
    ours_losses = [out.losses[name] for name in ("codebook", "commitment", "entropy")]
    for ours_loss, plain_loss in zip(ours_losses, expected[2:], strict=True):
        np.testing.assert_allclose(ours_loss, plain_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total, expected_total, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_vmapped_search_equals_loop_over_sub_codebooks():
    # A 2 KiB budget (/3 per sub-codebook) sends each vmapped search down the chunked path.
    quantizer = make_quantizer(num_codebooks=3, codebook_size=300, memory_budget_bytes=2 * KIB)
    z = random_latents(14, (40, 3, 8))
    out = jax.jit(lambda z: quantizer(z, with_entropy=True))(z)
    out = (out.quantized, out.indices, out.losses["codebook"], out.losses["commitment"],
           out.losses["entropy"])
    z_unit = quantizers.l2_normalized(z)
    codebook = quantizers.l2_normalized(quantizer.codebook[...])
    indices, codebook_losses, entropies = [], [], []
    for j in range(3):
        idx = quantizers.nearest_code(z_unit[:, j], codebook[j], normalized=True)
        indices.append(idx)
        codebook_losses.append(jnp.mean((codebook[j][idx] - z_unit[:, j]) ** 2))
        entropies.append(quantizers.entropy_loss(z_unit[:, j], codebook[j]))
    np.testing.assert_array_equal(out[1], jnp.stack(indices, axis=1))
    # Values equal up to the last ulp: jit may fuse the normalization differently from eager mode.
    np.testing.assert_allclose(out[0], codebook[jnp.arange(3), out[1]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[2], sum(codebook_losses), rtol=1e-5)
    np.testing.assert_allclose(out[3], sum(codebook_losses), rtol=1e-5)
    np.testing.assert_allclose(out[4], sum(entropies), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [256 * MIB, 4 * KIB], ids=["direct", "chunked"])
def test_sharded_quantizer_equals_single_device(budget):
    assert jax.device_count() == 8, "conftest.py should provide 8 CPU devices"
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    quantizer = make_quantizer(num_codebooks=2, codebook_size=512, memory_budget_bytes=budget)
    graphdef, params = nnx.split(quantizer)
    z = random_latents(15, (16, 4, 4, 2, 8))

    @jax.jit
    def step(params, z):
        def loss(params, z):
            out = nnx.merge(graphdef, params)(z, with_entropy=True)
            total = jnp.sum(out.quantized**2) + out.losses["codebook"] + out.losses["commitment"]
            return total + out.losses["entropy"], out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, z)
        return out, grads

    expected = step(params, z)
    z_sharded = jax.device_put(z, NamedSharding(mesh, P("data")))
    result = step(params, z_sharded)
    assert len(result[0].indices.sharding.device_set) == 8
    np.testing.assert_array_equal(result[0].indices, expected[0].indices)
    # Cross-device reductions sum in a different order; the entropy gradient has cancellations, so
    # compare against each leaf's scale rather than elementwise.
    for got, want in zip(jax.tree.leaves(result), jax.tree.leaves(expected)):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * scale)
