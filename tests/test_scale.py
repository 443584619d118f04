"""Scale-out on 8 simulated devices: one train step gives the same loss and params on meshes
(data, fsdp) = (8, 1), (4, 2), (2, 4) and (1, 1), with the codebook search sharded on (2, 4); the
state is laid out by the FSDP rules; a checkpoint restores onto another mesh (8 -> 1, 1 -> 8) and
training continues there as it would have; the sharded search equals the plain one at 65,536
codes; remat leaves gradients unchanged. The GAN is off here: its programs double the compile
time, and tests/test_adversarial.py covers the discriminator on 8 devices."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, make_step, make_tiny_config
from jax.sharding import PartitionSpec as P

from fqgan_jax import architecture, checkpointing, config_lib, quantizers, sharding
from fqgan_jax.frozen import networks
from fqgan_jax.quantizers import search
from fqgan_jax.training import train_state as ts


def _config(shard_codebook=False):
    # Smaller still than the tiny config (one resolution level): each mesh compiles its own step.
    config = make_tiny_config(**{"model.shard_codebook": shard_codebook, "gan.weight": 0.0,
                                 "model.ch_mult": (1,), "model.num_res_blocks": 1,
                                 "data.image_size": 16,
                                 # Adam's first update is ~lr * sign(g): a gradient entry near 0
                                 # flips under fp reordering. A large eps makes the update
                                 # continuous in g, so params can be compared tightly.
                                 "optimizer.eps": 1e-2})
    config.mesh.fsdp_min_size = 256  # the toy model's weights are small: shard nearly all
    return config


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    return {"image": rng.integers(0, 256, (config.train.batch_size, size, size, 3), np.uint8)}


@functools.lru_cache
def _built(shape, shard_codebook):
    """(fresh state, compiled step, mesh), once per mesh: the tests below reuse the programs."""
    return make_step(_config(shard_codebook), shape=shape)


def _steps(shape, num_steps=1, state=None, shard_codebook=None):
    """`num_steps` steps from a fresh state or `state` (copied onto this mesh first); returns
    (state, metrics of the last step, mesh). The codebook search is sharded on (2, 4)."""
    shard_codebook = shape == (2, 4) if shard_codebook is None else shard_codebook
    config = _config(shard_codebook)
    fresh, step_fn, mesh = _built(tuple(shape), shard_codebook)
    shardings = jax.tree.map(lambda x: x.sharding, fresh)
    # A copy: the step donates its input, and callers keep using theirs.
    state = jax.device_put(fresh if state is None else state, shardings, may_alias=False)
    for _ in range(num_steps):  # the step's programs carry their mesh (build_run)
        step = int(state.step)
        batch = sharding.to_global_batch(_batch(config, seed=step),
                                         sharding.batch_sharding(mesh))
        state, metrics = step_fn.at(step)(state, batch, {})
    return state, jax.device_get(metrics), mesh


def _trained(state):
    return jax.device_get(state.params.to_pure_dict())


def _values(tree):
    """Host copies of every leaf, RNG keys as their raw data."""
    return jax.device_get(jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        tree))


def _assert_close(state_a, state_b):
    """Params after the same steps on two meshes: equal up to fp reordering of the sums."""
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6),
                 _trained(state_a), _trained(state_b))


@pytest.fixture(scope="module")
def reference():
    return _steps((1, 1))


@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_one_step_is_the_same_on_every_mesh(reference, shape):
    """(2, 4) also searches the codebook sharded over its 4-way fsdp axis."""
    state, metrics, mesh = _steps(shape)
    ref_state, ref_metrics, _ = reference
    for key in ("loss", "loss/reconstruction", "loss/codebook", "loss/entropy",
                "loss/disentangle", "grad_norm"):
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-4, atol=1e-6)
    _assert_close(state, ref_state)
    # The updated state keeps the layout the rules give (out_shardings), FSDP included.
    config = _config(shape == (2, 4))
    expected = sharding.state_shardings(ts.abstract_state(config, ts.make_components(config)),
                                        mesh, config.mesh)
    same = jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), state, expected)
    assert all(jax.tree.leaves(same))
    sharded = [s for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding.spec, state.params))
               if sharding.FSDP_AXIS in s]
    if shape[1] > 1:
        assert len(sharded) > 20  # most of the toy model's weights
    else:
        assert not sharded


def test_fsdp_rules():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    spec = lambda shape, rules=(), min_size=16: sharding.rule_spec(  # noqa: E731
        "params/decoder/conv_in/kernel", shape, mesh, rules, min_size)
    assert spec((3, 3, 64, 128)) == P(None, None, None, "fsdp")  # the largest dimension
    assert spec((3, 3, 64, 130)) == P(None, None, "fsdp", None)  # the largest that 4 divides
    assert spec((3, 3, 3, 5)) == P()  # none divisible
    assert spec((4, 2), min_size=16) == P()  # too small
    assert spec((3, 3, 64, 128), rules=((r"params/decoder/.*", ()),)) == P()
    assert spec((2, 65536, 8), rules=((r".*/conv_in/.*", (None, "fsdp", None)),)) == P(
        None, "fsdp", None)
    assert spec((64, 128), rules=((r".*", ("model", None)),)) == P(None, None)  # absent axis
    with pytest.raises(ValueError, match="one entry per dimension"):
        spec((64, 128), rules=((r".*", ("fsdp",)),))


@pytest.mark.parametrize("save_shape, load_shape", [((2, 4), (1, 1)), ((1, 1), (4, 2))],
                         ids=["8to1", "1to8"])
def test_checkpoint_restores_onto_another_mesh(tmp_path, reference, save_shape, load_shape):
    saved, _, _ = reference if save_shape == (1, 1) else _steps(save_shape)
    checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    checkpointer.save(int(saved.step), saved, None, {"note": "test"})
    checkpointer.close()
    config = _config()
    config.mesh.shape = load_shape
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:int(np.prod(load_shape))])
    restored = ts.restore_state(str(tmp_path), config, mesh)
    expected = sharding.state_shardings(ts.abstract_state(config, ts.make_components(config)),
                                        mesh, config.mesh)  # the new mesh's FSDP layout
    assert all(jax.tree.leaves(jax.tree.map(
        lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), restored, expected)))
    jax.tree.map(np.testing.assert_array_equal, _values(restored), _values(saved))
    # Training goes on from the restored state as it would have on the saving mesh.
    continued, _, _ = _steps(load_shape, state=restored)
    uninterrupted, _, _ = _steps(save_shape, state=saved)
    assert int(continued.step) == int(uninterrupted.step) == int(saved.step) + 1
    _assert_close(continued, uninterrupted)


def _mesh_2x4():
    return sharding.make_mesh(make_tiny_config(**{"mesh.shape": (2, 4)}).mesh)


def _unit_rows(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_sharded_codebook_search_equals_unsharded_at_65536_codes():
    mesh = _mesh_2x4()
    rng = np.random.default_rng(0)
    codebook, z = _unit_rows(rng, (65_536, 8)), _unit_rows(rng, (512, 8))
    codebook[50_000] = codebook[7]  # an exact tie across shards 0 and 3: the lower index wins
    z[:4] = codebook[7]
    budget = 2**20  # 1 MiB blocks: the per-shard search is chunked too
    ours = np.asarray(jax.jit(lambda z, c: search.sharded_nearest_code(
        z, c, normalized=True, memory_budget_bytes=budget, mesh=mesh))(
        jax.device_put(z, jax.NamedSharding(mesh, P(("data", "fsdp"), None))),
        jax.device_put(codebook, jax.NamedSharding(mesh, P("fsdp", None)))))
    theirs = quantizers.nearest_code(z, codebook, normalized=True, memory_budget_bytes=budget)
    np.testing.assert_array_equal(ours, theirs)
    assert list(ours[:4]) == [7] * 4
    with pytest.raises(ValueError, match="K = 65534 must divide"):
        search.sharded_nearest_code(z, codebook[:-2], mesh=mesh)


def test_sharded_quantizer_has_the_same_outputs_and_gradients():
    """Indices, losses and the gradients w.r.t. z and the codebook, sharded vs not."""
    mesh = _mesh_2x4()
    rng = np.random.default_rng(1)
    z = rng.normal(size=(64, 2, 8)).astype(np.float32)

    def run(shard_axis):
        from flax import nnx  # noqa: PLC0415

        quantizer = quantizers.FactorizedQuantizer(num_codebooks=2, codebook_size=1024, code_dim=8,
                                                 shard_axis=shard_axis, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(quantizer)

        def loss(params, z):
            out = nnx.merge(graphdef, params)(z, with_entropy=True)
            total = (out.losses["codebook"] + out.losses["commitment"] + out.losses["entropy"]
                     + jnp.sum(out.quantized ** 2))
            return total, out.indices

        with jax.set_mesh(mesh):
            (value, indices), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1),
                                                                 has_aux=True))(params, z)
        return jax.device_get((value, indices, grads))

    sharded, plain = run("fsdp"), run(None)
    np.testing.assert_array_equal(sharded[1], plain[1])
    np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-6)
    # The compiler may partition the entropy term's sums over K differently around the sharded
    # search: float32 reordering, ~1e-7 absolute on gradients of ~1e-3, up to 1.3e-6 at one
    # element of 16,384 with XLA's own (non-YNNPACK) dot kernels.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-6),
                 sharded[2], plain[2])


def test_remat_recomputes_blocks_with_the_same_gradients():
    """model.remat wraps every encoder and decoder ResnetBlock (seen in the tokenizer's jaxpr);
    a rematerialized level gives the same loss and gradients (compiled on one level: cheap)."""
    from flax import nnx  # noqa: PLC0415

    from fqgan_jax.models.layers import ResolutionLevel  # noqa: PLC0415

    def jaxpr(remat):
        config = make_tiny_config(**{"model.remat": remat})
        model = architecture.create_model(config, nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        images = jnp.zeros((1, 32, 32, 3))
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(images)[0])  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(params))

    # Encoder levels hold num_res_blocks ResnetBlocks, decoder levels one more.
    config = make_tiny_config()
    blocks = len(config.model.ch_mult) * (2 * config.model.num_res_blocks + 1)
    assert jaxpr(True).count("remat") >= blocks

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 32)).astype(np.float32)

    def loss_and_grad(remat):
        level = ResolutionLevel(32, 32, num_res_blocks=2, with_attention=True, resample=None,
                                dropout=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0), remat=remat)
        graphdef, params = nnx.split(level)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)  # noqa: E731
        return jax.device_get(jax.jit(jax.value_and_grad(loss))(params))

    (value, grads), (plain_value, plain_grads) = loss_and_grad(True), loss_and_grad(False)
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    # Entries that are 0 in exact arithmetic (biases before a GroupNorm) hold only rounding
    # noise, so the tolerance is relative to the largest gradient.
    scale = max(np.abs(g).max() for g in jax.tree.leaves(plain_grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale),
                 grads, plain_grads)


@pytest.mark.slow
def test_train_step_at_262144_codes_with_the_codebook_split_8_ways():
    """The large-codebook layout on the smoke model: 2 x 262,144 codes, the rows and their Adam
    moments split over fsdp = 8 (each device holds K / 8), the search sharded too. On XLA:CPU
    this step deadlocked under the concurrency-optimized scheduler (fqgan_jax/xla_flags.py)."""
    codebook_size = 262_144
    config = config_lib.load_config_file(os.path.join(REPO, "configs/dual.py:smoke"))
    config.model.update(dict(codebook_size=codebook_size, shard_codebook=True))
    config.data.update(dict(image_size=32, num_workers=0))
    config.train.batch_size = 16
    config.gan.weight = 0.0
    config.loss.perceptual_weight = 0.0
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in os.environ["XLA_FLAGS"]
    config.mesh.shape = (1, 8)
    frozen = networks.load(config, sharding.make_mesh(config.mesh))  # the random tiny teacher
    state, step_fn, mesh = make_step(config, frozen=frozen, shape=(1, 8))
    rows = [x for path, x in jax.tree_util.tree_leaves_with_path((state.params, state.opt_state))
            if "codebook" in jax.tree_util.keystr(path)]
    assert len(rows) == 3  # the codebook and its two Adam moments
    for array in rows:
        assert array.sharding.spec == P(None, "fsdp", None)
        assert {shard.data.shape for shard in array.addressable_shards} == {
            (2, codebook_size // 8, 8)}
    batch = sharding.to_global_batch(_batch(config), sharding.batch_sharding(mesh))
    state, metrics = step_fn.at(0)(state, batch, frozen)
    metrics = jax.device_get(metrics)
    assert int(state.step) == 1 and not metrics["skipped"]
    assert np.isfinite(metrics["loss"]) and metrics["loss/entropy"] != 0
    # 16 images x 8 x 8 tokens: at most 1,024 codes of each sub-codebook were used.
    assert 0 < metrics["codebook/0/running_usage"] <= 1024 / codebook_size
