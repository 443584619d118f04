"""Warnings for the two ways an adversarial phase goes wrong, read from what the loop already has
(no extra device work): the discriminator pulling away from the generator, and saturated
reconstructions (the "blue blob" artifacts of a GAN start that wrecks the model).

- **D pulls away:** the gap `disc/logits_real - disc/logits_fake` at the log steps widens
  `widening_logs` times in a row and exceeds `gap_limit`. A hinge discriminator that wins keeps
  its real logits above +1 and its fake ones below -1, so a gap past 2 means it separates every
  image and the generator's GAN gradient is all it hears.
- **Saturation:** in the periodic reconstruction grid of a fixed held-out batch, the share of
  pixel values at 0 or 255 exceeds that of the originals by more than `saturation_excess`.

Each warning names the step, the numbers and the settings that usually help (README "The
adversarial phase"), and is given once until the condition clears.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_HELP = ("Usually helps: a longer gan.disc_warmup_steps, a smaller gan.weight or "
         "gan.adaptive_weight=True, gan.lecam_weight=0.05, a lower gan.optimizer.learning_rate "
         "(README: The adversarial phase).")


@dataclasses.dataclass
class GanHealth:
    gap_limit: float = 2.0
    widening_logs: int = 3
    saturation_excess: float = 0.05
    _gaps: list = dataclasses.field(default_factory=list)
    _warned_gap: bool = False
    _warned_saturation: bool = False

    def observe_logits(self, step: int, scalars: dict) -> str | None:
        """At a log step: a warning when D's logit gap keeps widening past the limit."""
        if not scalars.get("disc/active"):
            return None
        gap = scalars["disc/logits_real"] - scalars["disc/logits_fake"]
        self._gaps = (self._gaps + [gap])[-(self.widening_logs + 1):]
        widening = len(self._gaps) > self.widening_logs and all(
            later > earlier for earlier, later in zip(self._gaps, self._gaps[1:]))
        if not (widening and gap > self.gap_limit):
            self._warned_gap = self._warned_gap and gap > self.gap_limit
            return None
        if self._warned_gap:
            return None
        self._warned_gap = True
        trail = ", ".join(f"{g:.2f}" for g in self._gaps)
        return (f"step {step}: the discriminator is pulling away: disc/logits_real - "
                f"disc/logits_fake widened at {self.widening_logs} log steps in a row ({trail}) "
                f"past {self.gap_limit}. {_HELP}")

    def observe_reconstructions(self, step: int, originals: np.ndarray,
                                recon: np.ndarray) -> str | None:
        """At a grid step: a warning when reconstructions saturate (uint8 [B, H, W, 3])."""
        extreme = lambda images: float(np.mean((images == 0) | (images == 255)))  # noqa: E731
        excess = extreme(recon) - extreme(originals)
        if excess <= self.saturation_excess:
            self._warned_saturation = False
            return None
        if self._warned_saturation:
            return None
        self._warned_saturation = True
        return (f"step {step}: reconstructions saturate: {extreme(recon):.1%} of the held-out "
                f"grid's pixel values are 0 or 255, against {extreme(originals):.1%} in the "
                f"originals. {_HELP}")
