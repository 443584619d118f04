"""The adversarial phase's health warnings: D pulling away, saturated reconstructions."""

import numpy as np

from fqgan_jax.training.gan_health import GanHealth


def _scalars(real, fake, active=1):
    return {"disc/active": active, "disc/logits_real": real, "disc/logits_fake": fake}


def test_a_widening_logit_gap_past_the_limit_warns_once_until_it_clears():
    health = GanHealth(gap_limit=2.0, widening_logs=3)
    gaps = [0.5, 1.0, 1.6, 2.4, 3.0, 3.5]  # widening from the first log, past 2 at the 4th
    warnings = [health.observe_logits(step, _scalars(gap / 2, -gap / 2))
                for step, gap in enumerate(gaps)]
    assert [w is not None for w in warnings] == [False, False, False, True, False, False]
    assert "step 3" in warnings[3] and "1.60, 2.40" in warnings[3]
    assert "gan.disc_warmup_steps" in warnings[3]
    assert health.observe_logits(6, _scalars(0.5, -0.5)) is None  # the gap closed: it clears
    for step, gap in enumerate([1.0, 2.5, 3.0, 3.5], start=7):
        warning = health.observe_logits(step, _scalars(gap / 2, -gap / 2))
    assert warning is not None  # a new episode warns again


def test_a_large_but_steady_gap_and_an_inactive_discriminator_do_not_warn():
    health = GanHealth()
    assert all(health.observe_logits(s, _scalars(3.0, -3.0 + 0.01 * (s % 2))) is None
               for s in range(10))
    assert all(health.observe_logits(s, _scalars(float(s), -float(s), active=0)) is None
               for s in range(10))


def test_saturated_reconstructions_warn_against_the_originals_share():
    rng = np.random.default_rng(0)
    originals = rng.integers(1, 255, (4, 16, 16, 3), dtype=np.uint8)
    originals[0, :4] = 255  # the originals' own highlights do not count
    health = GanHealth(saturation_excess=0.05)
    assert health.observe_reconstructions(1, originals, originals.copy()) is None
    blobs = originals.copy()
    blobs[:, 4:8, :, 2] = 255  # a saturated blue band over 1/12 of the values
    warning = health.observe_reconstructions(2, originals, blobs)
    assert warning is not None and "step 2" in warning and "0 or 255" in warning
    assert health.observe_reconstructions(3, originals, blobs) is None  # once per episode
