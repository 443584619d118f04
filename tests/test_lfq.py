"""Open-MAGVIT2's lookup-free quantizer (fqgan_jax/quantizers/lfq.py, spec large_codebooks.md
§C): bit order, straight-through gradient, the factorized entropy against the brute-force softmax
over all 2^b codes (values and gradients), shard vs global batch entropy, and the memory of the
factorized entropy at 18 bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fqgan_jax import config_lib
from fqgan_jax.quantizers import lfq, registry
from fqgan_jax.quantizers.lfq import LookupFreeQuantizer


def _brute_force_entropy(x, temperature):
    """(H_s, H_b) from the full softmax over all 2^b codes of 2<x, c>/τ, as the official code."""
    num_bits = x.shape[-1]
    codes = jnp.where(lfq.indices_to_bits(jnp.arange(2**num_bits), num_bits), 1.0, -1.0)
    log_probs = jax.nn.log_softmax(2.0 * x @ codes.T / temperature, axis=-1)
    probs = jnp.exp(log_probs)
    sample = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
    mean_probs = jnp.mean(probs, axis=0)
    return sample, -jnp.sum(mean_probs * jnp.log(mean_probs + 1e-5))


def _latents(shape, seed=0, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Codes.


def test_bits_and_indices_are_little_endian_like_numpy():
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 2**18, size=(5, 7))
    reference_bits = (indices[..., None] >> np.arange(18)) & 1
    np.testing.assert_array_equal(lfq.indices_to_bits(indices, 18), reference_bits == 1)
    np.testing.assert_array_equal(lfq.bits_to_indices(reference_bits == 1), indices)
    # Channel 0 is the least significant bit.
    assert int(lfq.bits_to_indices(jnp.array([True, False, False]))) == 1
    assert int(lfq.bits_to_indices(jnp.array([False, False, True]))) == 4


def test_split_and_merge_indices_put_the_low_bits_first():
    indices = np.random.default_rng(1).integers(0, 2**18, size=(3, 4))
    low, high = lfq.split_indices(indices)  # spec §C.4: [6, 12]
    np.testing.assert_array_equal(low, indices % 64)
    np.testing.assert_array_equal(high, indices // 64)
    np.testing.assert_array_equal(lfq.merge_indices((low, high)), indices)
    parts = lfq.split_indices(indices, bits=(3, 7, 8))
    assert [int(p.max()) < 2**w for p, w in zip(parts, (3, 7, 8))] == [True] * 3
    np.testing.assert_array_equal(lfq.merge_indices(parts, bits=(3, 7, 8)), indices)
    with pytest.raises(ValueError, match="2 parts for 3"):
        lfq.merge_indices((low, high), bits=(3, 7, 8))


def test_quantize_gives_signs_indices_and_lookup_inverts_them():
    quantizer = LookupFreeQuantizer(code_dim=6, codebook_size=64)
    z = _latents((2, 3, 3, 1, 6)).at[0, 0, 0, 0, 0].set(0.0)  # 0 quantizes to -1 (x > 0 is +1)
    out = jax.jit(quantizer)(z.astype(jnp.bfloat16))
    positive = np.asarray(z.astype(jnp.bfloat16)) > 0
    np.testing.assert_array_equal(out.quantized, np.where(positive, 1.0, -1.0))
    assert out.quantized.dtype == jnp.float32 and out.indices.dtype == jnp.int32
    expected = (positive[..., 0, :] * 2 ** np.arange(6)).sum(-1)
    np.testing.assert_array_equal(out.indices[..., 0], expected)
    np.testing.assert_array_equal(jax.jit(quantizer.lookup)(out.indices), out.quantized)
    assert out.indices.shape == (2, 3, 3, 1)
    assert out.stats["perplexity"].shape == (1,)
    assert float(out.losses["entropy"]) == 0.0  # not requested


def test_straight_through_and_commitment_gradients():
    quantizer = LookupFreeQuantizer(code_dim=5, codebook_size=32)
    z = _latents((4, 1, 5), seed=1)
    weights = _latents((4, 1, 5), seed=2)
    grad = jax.jit(jax.grad(lambda z: jnp.sum(weights * quantizer(z).quantized)))(z)
    np.testing.assert_allclose(grad, weights)  # identity through the sign
    commitment_grad = jax.jit(jax.grad(lambda z: quantizer(z).losses["commitment"]))(z)
    signs = jnp.where(z > 0, 1.0, -1.0)
    np.testing.assert_allclose(commitment_grad, 2 * (z - signs) / z.size, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# The factorized entropy against the brute-force softmax.


def _factorized_and_brute_force(x, temperature, group_bits):
    """(H_s, H_b, p̄, weighted loss, its gradient) both ways, in one compiled program."""
    num_bits = x.shape[-1]
    quantizer = LookupFreeQuantizer(code_dim=num_bits, codebook_size=2**num_bits,
                                    entropy_temperature=temperature, sample_entropy_weight=0.7,
                                    batch_entropy_weight=1.3, entropy_group_bits=group_bits)

    def loss(z):
        return quantizer(z[:, None, :], with_entropy=True).losses["entropy"]

    def ref_loss(z):
        sample, batch = _brute_force_entropy(z, temperature)
        return 0.7 * sample - 1.3 * batch

    codes = jnp.where(lfq.indices_to_bits(jnp.arange(2**num_bits), num_bits), 1.0, -1.0)
    ref_mean = jnp.mean(jax.nn.softmax(2.0 * x @ codes.T / temperature, axis=-1), axis=0)
    ours = (*lfq.entropy_terms(x, temperature=temperature, group_bits=group_bits),
            lfq.mean_distribution(x, temperature, group_bits), *jax.value_and_grad(loss)(x))
    ref = (*_brute_force_entropy(x, temperature), ref_mean, *jax.value_and_grad(ref_loss)(x))
    return ours, ref


# (8, 4): two groups, one matmul; (10, 4) and (7, 3): three groups, the last one short (the scan);
# (5, 9): fewer bits than a group. τ = 0.01 is the official temperature. The quantizer's loss is
# taken inside jax.jit, as the train step does.
@pytest.mark.parametrize("num_bits,group_bits,temperature,scale", [
    (8, 4, 0.01, 0.004), (10, 4, 1.0, 0.5), (7, 3, 1.0, 0.5), (5, 9, 1.0, 0.5)])
def test_factorized_entropy_equals_brute_force(num_bits, group_bits, temperature, scale):
    x = _latents((48, num_bits), seed=num_bits, scale=scale)
    ours, ref = jax.jit(_factorized_and_brute_force, static_argnums=(1, 2))(
        x, temperature, group_bits)
    names = ("H_s", "H_b", "p̄", "loss")
    for name, value, expected in zip(names, ours, ref):
        np.testing.assert_allclose(value, expected, atol=1e-7 if name == "p̄" else 1e-5,
                                   rtol=1e-5, err_msg=name)
    grad, ref_grad = ours[-1], ref[-1]
    assert float(jnp.max(jnp.abs(ref_grad))) > 1e-3  # the check is not vacuous
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5 * float(jnp.max(jnp.abs(ref_grad))))


def test_sample_entropy_stays_finite_when_bits_saturate():
    x = jnp.array([[1.0, -2.0, 0.0, 1e-3]])  # 4x/τ = 400, -800, 0, 0.4 at τ = 0.01
    sample, grad = jax.jit(jax.value_and_grad(lambda x: lfq.sample_entropy(x, 0.01)))(x)
    ref = float(jax.jit(_brute_force_entropy, static_argnums=1)(x, 0.01)[0])
    np.testing.assert_allclose(sample, ref, rtol=1e-5)
    assert np.all(np.isfinite(grad))


# ------------------------------------------------------------------------------------------------
# Batch entropy scope.


def _scope_quantizer(scope):
    return LookupFreeQuantizer(code_dim=6, codebook_size=64, entropy_temperature=0.5,
                               entropy_group_bits=3, batch_entropy_scope=scope)


def test_shard_scope_averages_each_devices_batch_entropy():
    z = _latents((8, 4, 1, 6), seed=3, scale=0.5)  # 8 images of 4 tokens
    tokens = z.reshape(-1, 6)
    brute_force = jax.jit(_brute_force_entropy, static_argnums=1)
    sample, global_batch = brute_force(tokens, 0.5)
    shard_batch = np.mean(jax.vmap(brute_force, (0, None))(tokens.reshape(4, 8, 6), 0.5)[1])
    # The trainer's mesh: Auto axes, the batch split over both (fqgan_jax/sharding.py).
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:4])
    z_sharded = jax.device_put(z, NamedSharding(mesh, P(("data", "fsdp"))))
    entropy = jax.jit(lambda q, z: q(z, with_entropy=True).losses["entropy"], static_argnums=0)
    with jax.set_mesh(mesh):  # as the trainer traces its step
        shard = entropy(_scope_quantizer("shard"), z_sharded)
        global_ = entropy(_scope_quantizer("global"), z_sharded)
    np.testing.assert_allclose(shard, sample - shard_batch, atol=1e-5)
    np.testing.assert_allclose(global_, sample - global_batch, atol=1e-5)
    assert float(shard) > float(global_) + 0.1  # fewer tokens per p̄: a lower batch entropy
    # Without a mesh (one device) both scopes are the whole batch.
    np.testing.assert_allclose(entropy(_scope_quantizer("shard"), z), global_, atol=1e-6)


def test_shard_count_must_divide_the_tokens():
    with pytest.raises(ValueError, match="6 tokens do not split into 4 shards"):
        lfq.entropy_terms(jnp.zeros((6, 3)), temperature=1.0, group_bits=2, num_groups=4)


# ------------------------------------------------------------------------------------------------
# Construction, errors, jit and memory.


def test_from_config_and_loss_weights():
    config = config_lib.load_config_file("configs/lfq.py")
    config.model.lfq.batch_entropy_scope = "global"
    quantizer = registry.build_quantizer(config.model, num_codebooks=1, shard_axis=None,
                                         rngs=None)
    assert isinstance(quantizer, LookupFreeQuantizer)
    assert (quantizer.num_codebooks, quantizer.codebook_size, quantizer.code_dim) == (
        1, 2**18, 18)
    assert quantizer.batch_entropy_scope == "global" and quantizer.entropy_group_bits == 9
    assert quantizer.loss_weights(config.loss) == {"commitment": 0.25, "entropy": 0.1}
    assert registry.initial_values(config.model) == {}


@pytest.mark.parametrize("preset", ["", "smoke"])
def test_config_presets_pass_the_checks(preset):
    config = config_lib.load_config_file(f"configs/lfq.py:{preset}")
    config_lib.check_config(config, 1)
    assert config.model.codebook_size == 2**config.model.code_dim
    assert config.gan.generator_loss == "non_saturating_per_image"


@pytest.mark.parametrize("kwargs,message", [
    (dict(code_dim=6, codebook_size=32), "code_dim=6 and codebook_size=32"),
    (dict(code_dim=6, codebook_size=64, num_codebooks=2), "num_codebooks=2"),
    (dict(code_dim=6, codebook_size=64, entropy_group_bits=0), "entropy_group_bits"),
    (dict(code_dim=6, codebook_size=64, batch_entropy_scope="all"), "'all'"),
])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LookupFreeQuantizer(**kwargs)


def test_bad_shapes_are_rejected():
    quantizer = LookupFreeQuantizer(code_dim=6, codebook_size=64)
    with pytest.raises(ValueError, match=r"z \[..., 1, 6\]"):
        quantizer(jnp.zeros((2, 2, 6)))
    with pytest.raises(ValueError, match=r"indices \[..., 1\]"):
        quantizer.lookup(jnp.zeros((2, 2), jnp.int32))


def test_entropy_memory_at_18_bits_is_far_below_the_naive_softmax():
    """2048 tokens x 2^18 codes is 2 GiB per float32 tensor in the official code (spec §C.2)."""
    def loss(x):
        sample, batch = lfq.entropy_terms(x, temperature=0.01, group_bits=9)
        return sample - batch

    tokens = jax.ShapeDtypeStruct((2048, 18), jnp.float32)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(tokens).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    naive = 2048 * 2**18 * 4
    assert temp < 64 * 2**20, f"{temp / 2**20:.1f} MiB"
    assert naive == 2 * 2**30
