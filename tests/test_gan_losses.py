"""Tests of the adversarial losses and weights against hand computations on tiny arrays."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fqgan_jax import config_lib
from fqgan_jax.objectives import adversarial, gan_losses

REAL = jnp.array([[2.0, 0.5], [-1.0, 1.0]])  # shaped like [B, h] patch logits
FAKE = jnp.array([[-2.0, 0.5], [1.0, -0.25]])


def test_hinge_discriminator_loss_by_hand():
    # relu(1 - real) = [0, .5, 2, 0] -> mean .625; relu(1 + fake) = [0, 1.5, 2, .75] -> 1.0625.
    loss = gan_losses.hinge_discriminator_loss(REAL, FAKE)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, 0.5 * (0.625 + 1.0625), rtol=1e-6)
    # A perfect critic (real >= 1, fake <= -1) pays nothing.
    assert gan_losses.hinge_discriminator_loss(jnp.full(3, 1.5), jnp.full(3, -4.0)) == 0.0


def test_hinge_generator_loss_by_hand():
    np.testing.assert_allclose(gan_losses.hinge_generator_loss(FAKE), -(-0.75) / 4, rtol=1e-6)
    # Gradient: -1/N per logit, pushing every fake logit up.
    grad = jax.grad(gan_losses.hinge_generator_loss)(FAKE)
    np.testing.assert_allclose(grad, np.full((2, 2), -0.25))


def test_non_saturating_generator_loss_by_hand():
    expected = np.mean([math.log1p(math.exp(-v)) for v in np.ravel(FAKE)])
    np.testing.assert_allclose(gan_losses.non_saturating_generator_loss(FAKE), expected,
                               rtol=1e-6)
    # Open-MAGVIT2 variant: softplus of each image's mean logit (-0.75, 0.375).
    per_image = np.mean([math.log1p(math.exp(0.75)), math.log1p(math.exp(-0.375))])
    np.testing.assert_allclose(
        gan_losses.non_saturating_generator_loss(FAKE, per_image=True), per_image, rtol=1e-6)
    # Stable for large logits (no overflow of exp(-x)).
    assert np.isfinite(gan_losses.non_saturating_generator_loss(jnp.array([-200.0, 200.0])))


def test_losses_accept_bfloat16_and_reduce_in_float32():
    fake = FAKE.astype(jnp.bfloat16)
    for loss in (gan_losses.hinge_generator_loss(fake),
                 gan_losses.non_saturating_generator_loss(fake),
                 gan_losses.hinge_discriminator_loss(REAL.astype(jnp.bfloat16), fake)):
        assert loss.dtype == jnp.float32


def test_lecam_regularizer_by_hand():
    ema_real, ema_fake = 0.75, 0.0
    # relu(real - ema_fake)^2 = [4, .25, 0, 1] -> 1.3125;
    # relu(ema_real - fake)^2 = [7.5625, .0625, 0, 1] -> 2.15625.
    reg = gan_losses.lecam_regularizer(REAL, FAKE, ema_real, ema_fake)
    np.testing.assert_allclose(reg, 1.3125 + 2.15625, rtol=1e-6)


def test_lecam_regularizer_has_no_gradient_into_the_emas():
    grads = jax.grad(gan_losses.lecam_regularizer, argnums=(0, 1, 2, 3))(
        REAL, FAKE, jnp.float32(0.75), jnp.float32(0.0))
    assert np.any(grads[0] != 0) and np.any(grads[1] != 0)
    assert grads[2] == 0.0 and grads[3] == 0.0


def test_lecam_ema_update_by_hand():
    # ema * decay + mean * (1 - decay) with mean(REAL) = .625.
    ema = gan_losses.update_lecam_ema(jnp.float32(2.0), REAL, decay=0.9)
    np.testing.assert_allclose(ema, 2.0 * 0.9 + 0.625 * 0.1, rtol=1e-6)
    # From init 0 with decay .999 (Open-MAGVIT2), repeated updates converge to the mean.
    ema = jnp.float32(0.0)
    for _ in range(3):
        ema = gan_losses.update_lecam_ema(ema, FAKE, decay=0.999)
    np.testing.assert_allclose(ema, -0.1875 * (1 - 0.999**3), rtol=1e-5)
    grad = jax.grad(lambda x: gan_losses.update_lecam_ema(0.0, x, 0.9))(REAL)
    assert not np.any(grad)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    nll = jnp.array([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    gan = jnp.array([1.0, 2.0, 2.0])  # norm 3
    weight = gan_losses.adaptive_generator_weight(nll, gan)
    np.testing.assert_allclose(weight, 5.0 / (3.0 + 1e-4), rtol=1e-6)
    # Pytrees (kernel + bias) use the global norm: sqrt(3² + 4²) / sqrt(2² + 1² + 2²).
    tree = gan_losses.adaptive_generator_weight({"kernel": jnp.array([3.0]), "bias": 4.0},
                                                {"kernel": jnp.array([2.0, 1.0]), "bias": 2.0})
    np.testing.assert_allclose(tree, 5.0 / (3.0 + 1e-4), rtol=1e-6)


def test_adaptive_weight_is_clipped_and_constant():
    # Vanishing GAN gradient: 1 / 1e-4 = 1e4 would exceed a max of 100.
    assert gan_losses.adaptive_generator_weight(jnp.ones(1), jnp.zeros(1), max_weight=100.0) \
        == 100.0
    np.testing.assert_allclose(gan_losses.adaptive_generator_weight(jnp.ones(1), jnp.zeros(1)),
                               1e4, rtol=1e-6)
    assert gan_losses.adaptive_generator_weight(jnp.zeros(3), jnp.ones(3)) == 0.0
    grad = jax.grad(lambda g: gan_losses.adaptive_generator_weight(g, jnp.ones(2)))(jnp.ones(2))
    assert not np.any(grad)


def test_adaptive_weight_on_gradients_of_a_shared_last_layer():
    """The intended use: grads of two losses w.r.t. the same last-layer kernel."""
    kernel = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    x = jnp.array([1.0, 2.0])
    nll_grad = jax.grad(lambda k: jnp.sum((x @ k - 1.0) ** 2))(kernel)
    gan_grad = jax.grad(lambda k: -jnp.mean(x @ k))(kernel)
    expected = np.linalg.norm(nll_grad) / (np.linalg.norm(gan_grad) + 1e-4)
    np.testing.assert_allclose(gan_losses.adaptive_generator_weight(nll_grad, gan_grad),
                               expected, rtol=1e-5)


@pytest.mark.parametrize("step, expected", [
    (0, False), (19_998, False),  # global_step = step + 1 < 20000
    (19_999, True),  # global_step 20000: the 20000th update is the first with the GAN
    (20_000, True), (199_999, True),
])
def test_gan_phase_around_disc_start(step, expected):
    """spec fqgan.md §4.1: disc_start 20000, global_step = step + 1; no warm-up: D and the
    generator's GAN term start together."""
    gan = config_lib.base_config().gan
    assert adversarial.phase(step, gan) == adversarial.Phase(expected, expected)


def test_gan_phase_warmup_zero_weight_and_start_zero():
    gan = config_lib.base_config().gan
    gan.update(dict(start=10, disc_warmup_steps=4))
    phases = [adversarial.phase(step, gan) for step in (4, 5, 8, 9)]
    assert phases == [adversarial.Phase(False, False), adversarial.Phase(True, False),
                      adversarial.Phase(True, False), adversarial.Phase(True, True)]
    gan.start, gan.disc_warmup_steps = 0, 0  # Open-MAGVIT2: from the very first step
    assert adversarial.phase(0, gan) == adversarial.Phase(True, True)
    gan.weight = 0.0  # no GAN at all
    assert adversarial.phase(10**6, gan) == adversarial.Phase(False, False)
