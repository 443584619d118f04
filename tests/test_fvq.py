"""FVQ (spec large_codebooks.md §B): VQBridge parity and sizes, the bridged quantizer's search,
gradients and first steps, and the learning-annealing schedule."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import REPO
from flax import nnx

from fqgan_jax import config_lib, sharding
from fqgan_jax.quantizers import registry
from fqgan_jax.quantizers.fvq import BridgedCodebookQuantizer
from fqgan_jax.quantizers.vqbridge import VQBridge
from fqgan_jax.training import schedules

LOSS = ml_collections.ConfigDict(dict(codebook_weight=1.0, commitment_beta=0.25))


# One size for all quantizer tests, so that the eager init and the jitted programs are shared:
# K = 1000 is neither a square nor a multiple of group_size (63 groups, the last one padded).
SIZE, DIM, GROUP, WIDTH = 1000, 8, 16, 32


@pytest.fixture(scope="module")
def initial():
    def make():
        return BridgedCodebookQuantizer(codebook_size=SIZE, code_dim=DIM, group_size=GROUP,
                                        width=WIDTH, rngs=nnx.Rngs(0))

    graphdef = nnx.split(nnx.eval_shape(make))[0]
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())  # one compile


@pytest.fixture
def quantizer(initial):
    return nnx.clone(initial)


def run(quantizer, z):
    """The quantizer's output for z, jitted."""
    graphdef, state = nnx.split(quantizer)
    return jax.jit(lambda s, z: nnx.merge(graphdef, s)(z))(state, z)


def randomize_output(quantizer, seed=1):
    """A non-zero output layer, as after training: Ĉ ~ N(0, 1) instead of exactly 0."""
    output = quantizer.bridge.output
    k1, k2 = jax.random.split(jax.random.key(seed))
    width = output.kernel.shape[0]
    output.kernel[...] = jax.random.normal(k1, output.kernel.shape) / math.sqrt(width)
    output.bias[...] = 0.1 * jax.random.normal(k2, output.bias.shape)
    return quantizer


def latents(num_tokens=256, seed=2):
    return jax.random.normal(jax.random.key(seed), (num_tokens, 1, DIM))


def weighted_loss(graphdef, params, rest, z, terms=("codebook", "commitment", "entropy")):
    model = nnx.merge(graphdef, params, rest)
    out = model(z)
    weights = model.loss_weights(LOSS)
    return sum(weights[t] * out.losses[t] for t in terms), out


def adam_step(quantizer, z, learning_rate=1e-3):
    """(Ĉ before, Ĉ after one Adam step on the weighted loss, grads, indices), jitted."""
    graphdef, params, rest = nnx.split(quantizer, nnx.Param, ...)
    tx = optax.adam(learning_rate)
    materialized = lambda p: nnx.merge(graphdef, p, rest).materialized_codebook()  # noqa: E731

    @jax.jit
    def step(params, z):
        (_, out), grads = jax.value_and_grad(
            lambda p: weighted_loss(graphdef, p, rest, z), has_aux=True)(params)
        updates, _ = tx.update(grads, tx.init(params), params)
        after = optax.apply_updates(params, updates)
        return materialized(params), materialized(after), grads, out.indices

    before, after, grads, indices = step(params, z)
    return np.asarray(before), np.asarray(after), grads, np.asarray(indices)


def flat(state):
    return {"/".join(map(str, path)): np.asarray(leaf[...])
            for path, leaf in nnx.to_flat_state(state)}


# ------------------------------------------------------------------------------------------------
# VQBridge.
# ------------------------------------------------------------------------------------------------


def reference_bridge(params: dict, codebook, group_size, heads):
    """The official ViT release bridge in float64 numpy (timm Attention/Mlp semantics)."""
    def layer_norm(x):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)

    def linear(name, x):
        return x @ params[f"{name}/kernel"] + params[f"{name}/bias"]

    size, dim = codebook.shape
    groups = -(-size // group_size)
    x = np.zeros((groups * group_size, dim))
    x[:size] = codebook
    x = linear("embed", x.reshape(groups, -1))
    for i in range(sum(k.endswith("qkv/kernel") for k in params)):
        qkv = linear(f"blocks/{i}/qkv", layer_norm(x)).reshape(groups, 3, heads, -1)
        q, k, v = (qkv[:, j].transpose(1, 0, 2) for j in range(3))  # [heads, T, head_dim]
        logits = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + linear(f"blocks/{i}/proj", (weights @ v).transpose(1, 0, 2).reshape(groups, -1))
        hidden = linear(f"blocks/{i}/fc1", layer_norm(x))
        gelu = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden**3)))
        x = x + linear(f"blocks/{i}/fc2", gelu)
    return linear("output", layer_norm(x)).reshape(-1, dim)[:size]


def check_bridge_parity(bridge, raw):
    graphdef, state = nnx.split(bridge)
    got = np.asarray(jax.jit(lambda s, c: nnx.merge(graphdef, s)(c))(state, jnp.asarray(raw)))
    assert got.shape == raw.shape
    params = {k: v.astype(np.float64) for k, v in flat(state).items()}
    want = reference_bridge(params, raw.astype(np.float64), bridge.group_size, heads=4)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bridge_matches_the_reference(quantizer):
    """K = 1000 in 63 groups of 16: the last group is zero-padded and its pads dropped."""
    randomize_output(quantizer)
    assert quantizer.bridge.num_groups == 63
    # O(1) raw codes, so that the first LayerNorm is not dominated by its eps (§B.10).
    check_bridge_parity(quantizer.bridge, np.asarray(quantizer.codebook[...]) * SIZE)


@pytest.mark.parametrize("size, group_size", [(37, 8), (5, 16), (1024, 16), (1000, 1)])
def test_bridge_takes_any_codebook_size(size, group_size):
    """No perfect square, no multiple of group_size, even fewer codes than one group (§B.10)."""
    bridge = nnx.eval_shape(lambda: VQBridge(codebook_size=size, code_dim=DIM,
                                             group_size=group_size, width=WIDTH,
                                             rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(bridge)
    out = jax.eval_shape(lambda s, c: nnx.merge(graphdef, s)(c), state,
                         jax.ShapeDtypeStruct((size, DIM), jnp.float32))
    assert bridge.num_groups == math.ceil(size / group_size) and out.shape == (size, DIM)


def test_bridge_rejects_a_wrong_codebook_shape_and_width(quantizer):
    with pytest.raises(ValueError, match=r"expects a codebook \(1000, 8\)"):
        quantizer.bridge(jnp.zeros((999, DIM)))
    with pytest.raises(ValueError, match="not divisible by heads"):
        nnx.eval_shape(lambda: VQBridge(codebook_size=32, code_dim=4, width=18, heads=4,
                                        rngs=nnx.Rngs(0)))


def _bridge_params(codebook_size, group_size):
    bridge = nnx.eval_shape(lambda: VQBridge(codebook_size=codebook_size, code_dim=256,
                                             group_size=group_size, width=256, depth=2,
                                             heads=4, mlp_ratio=2.0, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(bridge, nnx.Param)))


@pytest.mark.parametrize("codebook_size, group_size, millions", [
    (16384, 16, 3.2), (65536, 64, 9.4), (262144, 64, 9.4)])
def test_bridge_parameter_counts_match_the_spec(codebook_size, group_size, millions):
    """QBridge-L/4 ≈ 3.2M and L/8 ≈ 9.4M parameters at d = 256 (§B.3), independent of K."""
    assert _bridge_params(codebook_size, group_size) == pytest.approx(millions * 1e6, rel=0.02)


# ------------------------------------------------------------------------------------------------
# The quantizer.
# ------------------------------------------------------------------------------------------------


def test_codebook_is_exactly_zero_at_init_so_every_token_takes_code_0(quantizer):
    """Zero-initialized output layer, no skip: Ĉ ≡ 0 and argmin's first-minimum rule (§B.3.4)."""
    raw = np.asarray(quantizer.codebook[...])
    assert np.abs(raw).max() <= 1 / SIZE and raw.std() > 0  # uniform(+-1/K), §B.2
    out = run(quantizer, latents())
    assert not np.asarray(out.indices).any() and not np.asarray(out.quantized).any()
    assert float(out.stats["top_code_share"][0]) == 1.0


def test_first_adam_step_moves_one_code_per_group_in_every_group(quantizer):
    """At init only code 0 is selected and the output kernel is 0, so the first gradient stops
    at the output layer, in the columns of each group's first slot. One Adam step then moves that
    slot's code in all T groups, selected or not, and no other code: the other slots unlock as
    their codes get selected (at most one new slot per step, because zero codes tie)."""
    before, after, grads, indices = adam_step(quantizer, latents())
    assert before.shape == (SIZE, DIM) and not before.any() and not indices.any()
    moved = np.any(after != before, axis=1)
    np.testing.assert_array_equal(moved, np.arange(SIZE) % GROUP == 0)  # all 63 groups
    grads = flat(grads)
    for name, grad in grads.items():
        if not name.startswith("bridge/output"):
            assert not grad.any(), name  # dĈ @ W_out^T = 0
    kernel = grads["bridge/output/kernel"]
    assert kernel[:, :DIM].all() and not kernel[:, DIM:].any()


def test_one_adam_step_moves_every_code_once_the_output_layer_is_nonzero(quantizer):
    """The point of the bridge (§B.6): a batch selecting a few codes updates all K of them."""
    before, after, _, indices = adam_step(randomize_output(quantizer), latents())
    assert len(np.unique(indices)) < 256 < SIZE
    assert np.all(np.any(after != before, axis=1))


def test_search_equals_brute_force_argmin_over_the_mapped_codebook(quantizer):
    randomize_output(quantizer)
    quantizer.memory_budget_bytes = 4 * 2**10  # a chunked scan over the codebook
    graphdef, state = nnx.split(quantizer)
    z = latents()

    @jax.jit
    def search(state, z):
        model = nnx.merge(graphdef, state)
        out = model(z)
        return out, model.materialized_codebook(), model.lookup(out.indices)

    out, codebook, looked_up = search(state, z)
    codebook = np.asarray(codebook, np.float64)
    distances = ((np.asarray(z[:, 0], np.float64)[:, None] - codebook[None]) ** 2).sum(-1)
    indices = np.asarray(out.indices[:, 0])
    np.testing.assert_array_equal(indices, distances.argmin(-1))
    np.testing.assert_array_equal(np.asarray(out.quantized[:, 0]),
                                  codebook[indices].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(looked_up), np.asarray(out.quantized))


def test_codebook_loss_alone_trains_the_bridge_and_commitment_alone_the_encoder(quantizer):
    graphdef, params, rest = nnx.split(randomize_output(quantizer), nnx.Param, ...)
    z = latents()
    cotangent = jax.random.normal(jax.random.key(5), z.shape)

    @jax.jit
    def grads(params, z):  # rows: codebook term, commitment term, the decoder's use of z_q
        def terms(p, z):
            model = nnx.merge(graphdef, p, rest)
            out, weights = model(z), model.loss_weights(LOSS)
            return jnp.stack([weights["codebook"] * out.losses["codebook"],
                              weights["commitment"] * out.losses["commitment"],
                              jnp.sum(out.quantized * cotangent)])

        return jax.jacrev(terms, argnums=(0, 1))(params, z)

    param_rows, z_rows = grads(params, z)
    codebook_p, commit_p, st_p = (jax.tree.map(lambda g, i=i: g[i], param_rows) for i in range(3))
    codebook_z, commit_z, st_z = z_rows
    assert not np.asarray(codebook_z).any()
    for name, grad in flat(codebook_p).items():
        assert np.abs(grad).max() > 0, name  # raw C and every bridge weight
    assert np.asarray(commit_z).all()
    assert not any(grad.any() for grad in flat(commit_p).values())
    # Straight-through: the decoder's gradient reaches z unchanged, and nothing else.
    np.testing.assert_array_equal(np.asarray(st_z), np.asarray(cotangent))
    assert not any(grad.any() for grad in flat(st_p).values())


def test_losses_and_weights(quantizer):
    graphdef, state = nnx.split(quantizer)
    grid = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s)(z), state,
                          jax.ShapeDtypeStruct((4, 8, 8, 1, DIM), jnp.bfloat16))
    assert grid.indices.shape == (4, 8, 8, 1) and grid.quantized.shape == (4, 8, 8, 1, DIM)
    assert grid.quantized.dtype == jnp.float32 and grid.indices.dtype == jnp.int32
    randomize_output(quantizer)
    z = latents()
    out = run(quantizer, z)
    error = np.mean((np.asarray(out.quantized) - np.asarray(z)) ** 2)
    np.testing.assert_allclose(float(out.losses["codebook"]), error, rtol=1e-5)
    np.testing.assert_allclose(float(out.losses["commitment"]), error, rtol=1e-5)
    assert float(out.losses["entropy"]) == 0.0
    loss = ml_collections.ConfigDict(dict(codebook_weight=2.0, commitment_beta=0.25,
                                          entropy_weight=0.5))
    assert quantizer.loss_weights(loss) == {"codebook": 2.0, "commitment": 0.5, "entropy": 0.0}


def test_registry_builds_one_codebook_only(quantizer):
    model = config_lib.load_config_file(f"{REPO}/configs/fvq.py:smoke").model
    with pytest.raises(ValueError, match="one codebook"):
        registry.build_quantizer(model, num_codebooks=2, shard_axis=None, rngs=nnx.Rngs(0))
    built = nnx.eval_shape(lambda: registry.build_quantizer(
        model, num_codebooks=1, shard_axis=None, rngs=nnx.Rngs(0)))
    assert isinstance(built, BridgedCodebookQuantizer) and built.num_codebooks == 1
    assert (built.codebook_size, built.code_dim) == (model.codebook_size, model.code_dim)
    assert built.bridge.num_groups == model.codebook_size // model.fvq.group_size
    assert registry.initial_values(model) == {}
    with pytest.raises(ValueError, match=r"expects z \[\.\.\., 1, 8\]"):
        quantizer(jnp.zeros((4, 2, DIM)))
    with pytest.raises(ValueError, match=r"indices \[\.\.\., 1\]"):
        quantizer.lookup(jnp.zeros((4, 2), jnp.int32))


def test_sharded_search_equals_the_unsharded_one(quantizer):
    """shard_codebook: Ĉ's rows split over a 4-device fsdp axis give the same codes."""
    randomize_output(quantizer)
    z = latents()
    want = np.asarray(run(quantizer, z).indices)
    quantizer.shard_axis = sharding.FSDP_AXIS
    mesh = jax.make_mesh((2, 4), ("data", sharding.FSDP_AXIS),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[:8])
    with jax.set_mesh(mesh):
        got = run(quantizer, z).indices
    np.testing.assert_array_equal(np.asarray(got), want)


# ------------------------------------------------------------------------------------------------
# Schedules.
# ------------------------------------------------------------------------------------------------


def optimizer_config(**overrides):
    opt = config_lib.base_config().optimizer
    opt.update(overrides)
    return opt


def official_multiplier(step, *, warmup, total, init, plateau, floor):
    """FVQ's combined_lr_lambda (§B.5) with wp0 = init and wpe = floor."""
    if step < warmup:
        return init + (1 - init) * step / max(1, warmup)
    done = (step - warmup) / (total - 1 - warmup)
    if done < plateau:
        return 1.0
    return floor + (1 - floor) * (1 - done) / (1 - plateau)


ANNEALING = dict(schedule="annealing", learning_rate=1e-4, warmup_steps=100,
                 warmup_init_ratio=0.005, annealing_plateau=0.3, min_lr_ratio=0.01)
TOTAL = 1101  # 1000 post-warm-up steps: the plateau ends at 400, the decay's midpoint is 750


@pytest.mark.parametrize("shape", ["linear", "cos"])
def test_annealing_breakpoints(shape):
    schedule = schedules.learning_rate_schedule(
        optimizer_config(**ANNEALING, annealing_shape=shape), TOTAL)
    lr = 1e-4
    at = lambda step: float(schedule(jnp.int32(step)))  # noqa: E731
    quarter = 0.75 if shape == "linear" else 0.5 * (1 + math.cos(math.pi / 4))
    expected = {0: 0.005, 50: 0.005 + 0.995 * 0.5, 100: 1.0, 399: 1.0, 400: 1.0,
                575: 0.01 + 0.99 * quarter, 750: 0.505, 1100: 0.01, 5000: 0.01}
    for step, multiplier in expected.items():
        assert at(step) == pytest.approx(multiplier * lr, rel=1e-5), step
    values = np.array([at(s) for s in range(400, TOTAL)])
    assert np.all(np.diff(values) < 0)


def test_linear_annealing_is_the_official_lambda_at_every_step():
    schedule = jax.jit(jax.vmap(schedules.learning_rate_schedule(
        optimizer_config(**ANNEALING), TOTAL)))
    steps = np.arange(TOTAL + 10)
    official = [official_multiplier(min(s, TOTAL - 1), warmup=100, total=TOTAL, init=0.005,
                                    plateau=0.3, floor=0.01) for s in steps]
    np.testing.assert_allclose(np.asarray(schedule(jnp.asarray(steps))),
                               1e-4 * np.array(official), rtol=1e-5)


def test_annealing_rejects_bad_fractions():
    for key, value in (("annealing_plateau", 1.0), ("min_lr_ratio", -0.1),
                       ("warmup_init_ratio", 2.0)):
        with pytest.raises(ValueError, match=key):
            schedules.learning_rate_schedule(optimizer_config(**{**ANNEALING, key: value}), 10)


def test_existing_schedules_are_unchanged():
    """warmup_init_ratio 0 (the default) keeps the plain ramps; a ratio starts the ramp there."""
    lr, steps = 2e-4, jnp.arange(0, 300, 7)
    run = lambda **kw: np.asarray(jax.vmap(  # noqa: E731
        schedules.learning_rate_schedule(optimizer_config(learning_rate=lr, **kw), 250))(steps))
    np.testing.assert_array_equal(run(), np.full(steps.shape, lr, np.float32))
    np.testing.assert_array_equal(
        run(warmup_steps=20), np.asarray(jax.vmap(optax.join_schedules(
            [optax.linear_schedule(0.0, lr, 20), optax.constant_schedule(lr)], [20]))(steps)))
    np.testing.assert_array_equal(
        run(schedule="warmup_cosine", warmup_steps=20, min_lr_ratio=0.1),
        np.asarray(jax.vmap(optax.warmup_cosine_decay_schedule(0.0, lr, 20, 250, lr * 0.1))(
            steps)))
    np.testing.assert_array_equal(
        run(schedule="warmup_cosine", min_lr_ratio=0.1),
        np.asarray(jax.vmap(optax.cosine_decay_schedule(lr, 250, alpha=0.1))(steps)))
    ramp = run(warmup_steps=20, warmup_init_ratio=0.25)
    assert ramp[0] == pytest.approx(0.25 * lr) and ramp[-1] == pytest.approx(lr)
