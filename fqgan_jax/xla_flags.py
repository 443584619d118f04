"""XLA flags that fqgan_jax sets by default, before any backend starts (see __init__.py).

Each is CPU-only (GPUs and TPUs ignore it), and a value the user put in XLA_FLAGS wins.

* The concurrency-optimized scheduler off. It let the simulated devices of one process start two
  independent collectives in different orders, and they deadlocked: the train step at
  K = 262,144 codes on a (1, 8) CPU mesh hung every time, with one device in an all-reduce inside
  the entropy loss's chunk loop and the other seven in the codebook gradient's all-gather (3 runs
  of 3); with that scheduler off it ran (3 of 3; tests/test_scale.py). One-device step time was
  the same (1.70 s either way for the smoke model).
* YNNPACK fusions off. jax 0.10's XLA:CPU hands convolutions to YNNPACK, including the kernel
  gradient, which XLA writes as a convolution whose window is the whole image: YNNPACK runs that
  at ~0.1 GFLOP/s. One 3x3 128->128 conv at 128 px, batch 2: gradient 7.6 s with it, 0.84 s
  without. The smoke train step: 9.45 s -> 3.41 s (only removing its convolutions: 3.72 s).
  To measure with it, pass the flag yourself, e.g.
  `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot python benchmarks/...`.
"""

import os

DEFAULTS = {
    "--xla_cpu_enable_concurrency_optimized_scheduler": "false",
    "--xla_cpu_experimental_ynn_fusion_type": "",
}


def set_defaults(environ=os.environ) -> None:
    flags = environ.get("XLA_FLAGS", "")
    for name, value in DEFAULTS.items():
        if name not in flags:
            flags = f"{flags} {name}={value}".strip()
    environ["XLA_FLAGS"] = flags
