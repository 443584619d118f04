"""The adversarial half of the train step: schedule, phase separation, BatchNorm over the global
batch, the adaptive weight, LeCam, and the non-finite guard."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from conftest import make_step, make_tiny_config
from flax import nnx

from fqgan_jax import architecture, config_lib, sharding
from fqgan_jax.objectives import adversarial, losses
from fqgan_jax.training import schedules
from fqgan_jax.training import train_state as ts


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    return {"image": rng.integers(0, 256, (config.train.batch_size, size, size, 3), np.uint8)}


def _pure(tree):
    return jax.device_get(tree.to_pure_dict())


def _assert_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _assert_differ(a, b):
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


PHASED = {"gan.start": 3, "gan.disc_warmup_steps": 1}  # all three phases within 3 steps


class Stepper:
    """One compiled step of a config on one device, and fresh initial states for it."""

    def __init__(self, config):
        self.config = config
        self.initial, self.step, self.mesh = make_step(config)
        self.components = ts.make_components(config)

    def state(self, step=0):
        fresh = jax.tree.map(lambda x: x.copy(), self.initial)  # the step donates its input
        return fresh.replace(step=jnp.int32(step))

    def inputs(self, seed=0):
        return sharding.to_global_batch(_batch(self.config, seed),
                                        sharding.batch_sharding(self.mesh))

    def run(self, num_steps, state=None):
        state = self.state() if state is None else state
        history = []
        first = int(state.step)
        for i in range(num_steps):
            state, metrics = self.step.at(first + i)(state, self.inputs(i), {})
            history.append(jax.device_get(metrics))
        return state, history


@pytest.fixture(scope="module")
def stepper():
    """D trains from step 2, the generator's GAN term is on from step 3."""
    return Stepper(make_tiny_config(**PHASED))


def test_schedule_warmup_then_generator(stepper):
    """D trains from step start - warmup; the generator's GAN term joins at `start` (1-based)."""
    assert (stepper.config.gan.start, stepper.config.gan.disc_warmup_steps) == (3, 1)
    _, history = stepper.run(4)
    assert [int(m["disc/active"]) for m in history] == [0, 1, 1, 1]
    assert [float(m["loss/generator_gan_weight"]) for m in history] == [0, 0, 0.5, 0.5]
    assert float(history[0]["disc/loss"]) == 0 and float(history[1]["disc/loss"]) > 0
    assert [float(m["loss/gan"]) == 0 for m in history] == [True, True, False, False]
    # Hinge: the generator's term is -mean D(x̂) for the very D (and x̂) the D phase starts from.
    for m in history[2:]:
        np.testing.assert_allclose(m["loss/gan"], -m["disc/logits_fake"], rtol=1e-5)


def test_generator_is_untouched_by_the_gan_before_start(stepper):
    """Before `start` (D's warm-up included) the tokenizer's update ignores the discriminator:
    another D gives bit-identical tokenizer params, while D itself trains."""
    base, history = stepper.run(2)
    assert int(history[1]["disc/active"]) == 1
    state = stepper.state()
    keys = iter(jax.random.split(jax.random.key(7), 64))
    state = state.replace(disc=state.disc.replace(params=jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state.disc.params)))
    other, _ = stepper.run(2, state)
    _assert_equal(_pure(base.params), _pure(other.params))
    _assert_differ(_pure(base.disc.params), _pure(other.disc.params))


def _perturbed_adam(opt_state, seed):
    """Adam moments replaced by random ones: a different update from the same gradients."""
    leaves, treedef = jax.tree.flatten(opt_state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jnp.abs(jax.random.normal(k, x.shape, x.dtype)) * 1e-3
              if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x
              for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, leaves)


def test_discriminator_phase_changes_only_the_discriminator(stepper):
    """With both phases on: another D optimizer state changes D's update and nothing of the
    generator's; the generator's update saw the D from before the D phase."""
    base, _ = stepper.run(1, stepper.state(step=5))
    state = stepper.state(step=5)
    state = state.replace(disc=state.disc.replace(
        opt_state=_perturbed_adam(state.disc.opt_state, 0)))
    other, _ = stepper.run(1, state)
    _assert_differ(_pure(base.disc.params), _pure(other.disc.params))
    _assert_equal(_pure(base.params), _pure(other.params))


def test_generator_phase_changes_only_the_generator(stepper):
    """Another generator optimizer state changes the tokenizer's update and nothing of D's."""
    base, _ = stepper.run(1, stepper.state(step=5))
    state = stepper.state(step=5)
    state = state.replace(opt_state=_perturbed_adam(state.opt_state, 1))
    other, _ = stepper.run(1, state)
    _assert_differ(_pure(base.params), _pure(other.params))
    for part in ("params", "batch_stats"):
        _assert_equal(_pure(getattr(base.disc, part)), _pure(getattr(other.disc, part)))


def test_generators_pass_through_d_leaves_its_statistics_alone(stepper):
    """The step's D state equals the D phase alone on the step's reconstructions: the
    generator phase's train-mode pass through D changed no D parameter and no statistic."""
    config, components = stepper.config, stepper.components
    state, inputs = stepper.state(step=5), stepper.inputs()
    images = inputs["image"].astype(jnp.float32) / 127.5 - 1
    model = architecture.merge_model(components.graphdef, state.params, state.model_state)
    recon, _ = model(images)
    expected, _ = jax.jit(lambda d, x, r: adversarial.discriminator_update(
        d, x, r, disc_graphdef=components.disc_graphdef,
        disc_tx=components.disc_tx, gan=config.gan))(state.disc, images, recon)
    new_state, metrics = stepper.step.at(5)(state, inputs, {})
    assert float(metrics["loss/generator_gan_weight"]) == 0.5
    # Equal up to float reordering between the two programs. BatchNorm statistics are close;
    # Adam's first steps are ~lr * sign(g), so a parameter whose gradient is ~0 may move by up
    # to 2 * lr either way: almost all parameters must still agree closely.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 _pure(new_state.disc.batch_stats), _pure(expected.batch_stats))
    diffs = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
        jax.tree.leaves(_pure(new_state.disc.params)), jax.tree.leaves(_pure(expected.params)))])
    assert diffs.max() <= 2 * config.gan.optimizer.learning_rate + 1e-6
    assert np.mean(diffs > 1e-5) < 1e-3


def test_discriminator_loss_has_no_gradient_into_the_reconstruction(tiny_config):
    config = tiny_config()
    components = ts.make_components(config)
    state = ts.initial_state(config, components, jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
    recon = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), minval=-1, maxval=1)
    grad = jax.grad(lambda r: adversarial._discriminator_loss(
        state.disc.params, state.disc, images, r, disc_graphdef=components.disc_graphdef,
        gan=config.gan)[0])(recon)
    assert np.all(np.asarray(grad) == 0)


def _disc_convs(jaxpr, found=None):
    """Kernel shapes of every 4x4 convolution (only the discriminator has 4x4 kernels),
    including those in nested jaxprs."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            if kernel[:2] == (4, 4):
                found.append(kernel)
        for param in eqn.params.values():
            for value in (param if isinstance(param, (tuple, list)) else (param,)):
                sub = getattr(value, "jaxpr", value)
                if hasattr(sub, "eqns"):
                    _disc_convs(sub, found)
    return found


def test_no_discriminator_compute_before_its_start(tiny_config):
    """Each adversarial phase is its own program: before D's start it holds no D convolution
    at all; with D training, D's forward and backward; with the GAN term, also the generator's
    pass through D and back."""
    from fqgan_jax.training.train_step import train_step

    config = tiny_config(**PHASED)
    components = ts.make_components(config)
    state = ts.initial_state(config, components, jax.random.key(0))
    counts = []
    for step in (0, 1, 2):  # D from step 2, the GAN term from step 3 (1-based)
        phase = adversarial.phase(step, config.gan)
        jaxpr = jax.make_jaxpr(lambda s, b, phase=phase: train_step(
            s, b, {}, components=components, config=config, phase=phase))(state, _batch(config))
        counts.append(len(_disc_convs(jaxpr.jaxpr)))
    layers = config.gan.n_layers + 2
    assert counts[0] == 0
    assert counts[1] >= 2 * layers  # real and fake forward, and their backward
    assert counts[2] > counts[1]


def _disc_update_on(devices, config, components, disc_state, images, recon):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(shape=(-1,), axes=("data",))),
                              devices)
    batch = sharding.batch_sharding(mesh)
    update = jax.jit(lambda d, x, r: adversarial.discriminator_update(
        d, x, r, disc_graphdef=components.disc_graphdef,
        disc_tx=components.disc_tx, gan=config.gan),
        in_shardings=(sharding.replicated(mesh), batch, batch))
    new_state, _ = update(disc_state, images, recon)
    return _pure(new_state.batch_stats)


def test_batchnorm_statistics_are_synchronized_over_8_devices(tiny_config):
    config = tiny_config()
    components = ts.make_components(config)
    disc_state = ts.initial_state(config, components, jax.random.key(0)).disc
    images = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3), minval=-1, maxval=1)
    recon = jax.random.uniform(jax.random.key(2), (8, 32, 32, 3), minval=-1, maxval=1)
    stats_1 = _disc_update_on(jax.devices()[:1], config, components, disc_state, images, recon)
    stats_8 = _disc_update_on(jax.devices()[:8], config, components, disc_state, images, recon)
    assert jax.device_count() == 8
    _assert_differ(stats_8, _pure(disc_state.batch_stats))  # they were updated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 stats_8, stats_1)
    # One device's image alone gives other statistics, so the agreement is not vacuous.
    local = _disc_update_on(jax.devices()[:1], config, components, disc_state, images[:1],
                            recon[:1])
    _assert_differ(local, stats_8)


def test_adaptive_weight_equals_the_full_gradient_ratio(tiny_config):
    """The last-layer shortcut equals taming's ratio of gradients of the whole losses w.r.t.
    decoder.conv_out.kernel, taken through the whole tokenizer."""
    config = tiny_config(**{"gan.adaptive_weight": True})
    components = ts.make_components(config)
    state = ts.initial_state(config, components, jax.random.key(0))
    images = jnp.asarray(_batch(config)["image"], jnp.float32) / 127.5 - 1

    @jax.jit
    def both(state, images):
        gan_fn = adversarial.gan_generator_fn(components.disc_graphdef, state.disc, "hinge")
        nll_fn = lambda r: losses.nll_loss(images, r, config.loss)[0]  # noqa: E731
        recon_of = lambda p: architecture.merge_model(  # noqa: E731
            components.graphdef, p, state.model_state)(images)[0]
        kernel = lambda g: g["decoder"]["conv_out"]["kernel"]  # noqa: E731
        g_nll = kernel(jax.grad(lambda p: nll_fn(recon_of(p)))(state.params))
        g_gan = kernel(jax.grad(lambda p: gan_fn(recon_of(p)))(state.params))
        expected = jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_gan) + 1e-4)

        model = architecture.merge_model(components.graphdef, state.params, state.model_state)
        features = model.decode_features(model.encode(images).quantized)
        recon = model.decoder.conv_out(features).astype(jnp.float32)
        got = adversarial.last_layer_adaptive_weight(
            nll_fn, gan_fn, recon, nnx.split(model.decoder.conv_out), features, 1e4)
        return got, expected

    got, expected = both(state, images)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_adaptive_weight_trains(tiny_config):
    _, history = Stepper(tiny_config(**{"gan.adaptive_weight": True})).run(2)
    weights = [float(m["loss/generator_gan_weight"]) for m in history]
    assert all(np.isfinite(weights)) and min(weights) > 0
    assert 0.5 not in weights  # 0.5 x the gradient ratio
    assert all(int(m["skipped"]) == 0 for m in history)


def test_lecam_term_by_hand(tiny_config):
    config = tiny_config(**{"gan.lecam_weight": 0.05, "gan.disc_loss_weight": 1.0})
    components = ts.make_components(config)
    state = ts.initial_state(config, components, jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
    recon = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), minval=-1, maxval=1)
    new, metrics = adversarial.discriminator_update(
        state.disc, images, recon, disc_graphdef=components.disc_graphdef,
        disc_tx=components.disc_tx, gan=config.gan)
    disc = nnx.merge(components.disc_graphdef, state.disc.params, state.disc.batch_stats)
    real, fake = np.asarray(disc(images, train=True)), np.asarray(disc(recon, train=True))
    ema_real, ema_fake = 0.001 * real.mean(), 0.001 * fake.mean()  # from 0, decay 0.999
    np.testing.assert_allclose(new.lecam_ema, [ema_real, ema_fake], rtol=1e-5)
    lecam = (np.mean(np.maximum(real - ema_fake, 0) ** 2)
             + np.mean(np.maximum(ema_real - fake, 0) ** 2))
    hinge = 0.5 * (np.mean(np.maximum(1 - real, 0)) + np.mean(np.maximum(1 + fake, 0)))
    np.testing.assert_allclose(metrics["disc/lecam"], lecam, rtol=1e-5)
    np.testing.assert_allclose(metrics["disc/loss"], hinge + 0.05 * lecam, rtol=1e-5)


@pytest.mark.parametrize("kind, expected", [
    ("hinge", lambda x: -x.mean()),
    ("non_saturating", lambda x: np.log1p(np.exp(-x)).mean()),
    ("non_saturating_per_image", lambda x: np.log1p(np.exp(-x.mean(axis=(1, 2, 3)))).mean()),
])
def test_generator_loss_options(kind, expected):
    logits = np.random.default_rng(0).normal(size=(3, 4, 4, 1)).astype(np.float32)
    np.testing.assert_allclose(adversarial._generator_loss_on_logits(jnp.asarray(logits), kind),
                               expected(logits), rtol=1e-5)


def test_nonfinite_discriminator_skips_the_whole_update(stepper):
    state = stepper.state(step=5)
    state = state.replace(disc=state.disc.replace(
        params=jax.tree.map(lambda x: x * jnp.nan, state.disc.params)))
    before = _pure(state.params)
    state, metrics = stepper.step.at(5)(state, stepper.inputs(), {})
    assert int(metrics["skipped"]) == 1 and int(state.nonfinite_streak) == 1
    _assert_equal(_pure(state.params), before)


@pytest.mark.parametrize("override, message", [
    ({"gan.disc_warmup_steps": 10, "gan.start": 5}, "disc_warmup_steps=10"),
    ({"gan.generator_loss": "wgan"}, "gan.generator_loss"),
    ({"gan.lecam_decay": 1.0}, "lecam_decay"),
    ({"gan.weight": -0.1}, "gan.weight"),
])
def test_bad_gan_config_is_refused(tiny_config, override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.check_config(tiny_config(**override), 1)


def _disc_update_delta(config, step):
    """How one discriminator update moves its params, from a fresh D, at train step `step`;
    and the params before it."""
    components = ts.make_components(config)
    state = ts.initial_state(config, components, jax.random.key(0))
    images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
    recon = jax.random.uniform(jax.random.key(2), (4, 32, 32, 3), minval=-1, maxval=1)
    new, _ = jax.jit(lambda d: adversarial.discriminator_update(
        d, images, recon, disc_graphdef=components.disc_graphdef, disc_tx=components.disc_tx,
        gan=config.gan, step=jnp.int32(step)))(state.disc)
    before = np.concatenate([np.ravel(b) for b in jax.tree.leaves(_pure(state.disc.params))])
    after = np.concatenate([np.ravel(a) for a in jax.tree.leaves(_pure(new.params))])
    return after.astype(np.float64) - before, before


def test_official_disc_adam_count_damps_the_first_updates_as_bias_correction_says(tiny_config):
    """The official D optimizer has stepped (with zero loss, so zero moments) since step 1: its
    first real update at train step S uses Adam's bias correction for count S + 1."""
    config = tiny_config()
    opt = config.gan.optimizer
    step = 19_999  # the official disc_start = 20,000 is global step step + 1
    fresh, before = _disc_update_delta(config, step)  # default: D's Adam starts at count 1
    config.gan.official_disc_adam_count = True
    official, _ = _disc_update_delta(config, step)
    # Count 1: m_hat = g, v_hat = g^2, so a parameter moves by lr |g| / (|g| + eps), at most lr
    # up to the float32 rounding of the parameter (BatchNorm scales are ~1: 1.2e-7).
    assert np.all(np.abs(fresh) <= opt.learning_rate + np.spacing(np.abs(before) + 1e-3))
    # Where |g| >> eps and the parameter is small (rounding < 1e-4 of the step) the ratio is
    # exact; that is nearly every weight.
    moved = (np.abs(fresh) > (1 - 1e-4) * opt.learning_rate) & (np.abs(before) < 0.25)
    assert moved.mean() > 0.9
    count = step + 1
    damping = ((1 - opt.b1) / (1 - opt.b1 ** count)) / np.sqrt((1 - opt.b2) / (1 - opt.b2 ** count))
    np.testing.assert_allclose(official[moved] / fresh[moved], damping, rtol=1e-3)
    assert damping == pytest.approx(0.447, abs=1e-3)  # the first factor


def test_official_disc_adam_count_sequence_under_a_constant_gradient():
    """0.45, 0.61, 0.72, 0.80, 0.86 x lr: the damping of the first five real D updates."""
    config = make_tiny_config()
    config.gan.official_disc_adam_count = True
    tx = ts.make_optimizer(config.gan.optimizer,
                           schedules.learning_rate_schedule(config.gan.optimizer, 100))
    params = {"w": jnp.zeros((3,))}
    opt_state, grads, steps = tx.init(params), {"w": jnp.full((3,), 0.1)}, []
    for step in range(19_999, 20_004):
        opt_state = optax.tree_utils.tree_set(opt_state, count=jnp.int32(step))
        updates, opt_state = tx.update(grads, opt_state, params)
        steps.append(float(-updates["w"][0]) / config.gan.optimizer.learning_rate)
    np.testing.assert_allclose(steps, [0.447, 0.608, 0.718, 0.800, 0.861], atol=2e-3)


def test_gan_weight_ramp_is_linear_from_the_start():
    gan = ml_collections.ConfigDict(dict(start=150, ramp_steps=4))
    # Train step s is global step s + 1: the first GAN step is s = 149.
    factors = [float(adversarial.ramp(jnp.int32(s), gan)) for s in range(147, 155)]
    assert factors == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    gan.ramp_steps = 0
    assert float(adversarial.ramp(jnp.int32(149), gan)) == 1.0


def test_ramped_generator_gan_term(tiny_config):
    """The generator's GAN weight is gan.weight x the ramp at the step's global step."""
    config = tiny_config(**{"gan.ramp_steps": 4, "gan.start": 1})
    components = ts.make_components(config)
    state = ts.initial_state(config, components, jax.random.key(0))
    recon = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3), minval=-1, maxval=1)
    term = jax.jit(lambda step: adversarial.generator_gan_term(
        recon, disc_graphdef=components.disc_graphdef, disc_state=state.disc, gan=config.gan,
        step=step))
    weighted, unweighted, weight = term(jnp.int32(1))  # global step 2 of the 4-step ramp
    assert float(weight) == pytest.approx(config.gan.weight * 2 / 4)
    np.testing.assert_allclose(weighted, weight * unweighted, rtol=1e-6)
    assert float(term(jnp.int32(10))[2]) == pytest.approx(config.gan.weight)
