"""XLA flags that fqgan_jax sets by default, before any backend starts (see __init__.py).

XLA:CPU's concurrency-optimized scheduler let the simulated devices of one process start two
independent collectives in different orders, and they deadlocked: the train step at K = 262,144
codes on a (1, 8) CPU mesh hung every time, with one device in an all-reduce inside the entropy
loss's chunk loop and the other seven in the codebook gradient's all-gather (3 runs of 3); with
that scheduler off it ran (3 of 3; tests/test_scale.py). One-device step time was the same (1.70 s
either way for the smoke model). The flag is inert on GPU and TPU; a value in XLA_FLAGS wins.
"""

import os

CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def set_defaults(environ=os.environ) -> None:
    flags = environ.get("XLA_FLAGS", "")
    if CPU_SCHEDULER_FLAG not in flags:
        environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
