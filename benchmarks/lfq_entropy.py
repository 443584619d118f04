"""LFQ's entropy penalty: the bit-factorized form of ``quantizers/lfq.py`` vs the naive softmax over
all 2^b codes (Open-MAGVIT2's, spec large_codebooks.md §C.2), side by side.

For each number of bits b, both compute loss = H_s - H_b and its gradient w.r.t. the N x b
latents (``jax.value_and_grad``, jitted) on the same seeded data. Reported per method:

* temp: XLA's compiled scratch memory (``compiled.memory_analysis().temp_size_in_bytes``). The
  naive program is always compiled (that allocates nothing), so its need is exact even where
  it is not run;
* time: median wall time of ``--repeats`` calls after a warm-up call (``block_until_ready``);
* |Δloss|, |Δgrad|: the largest absolute differences between the two (float32 both).

The naive program runs only where its temp fits ``--max-naive-gib``; otherwise its row says
"skipped: would need X GiB". Latents are N(0, 1) x ``--scale``: at the official τ = 0.01 a scale
of 0.01 keeps the bit probabilities away from 0/1, so the entropies (and the comparison) are
not trivially saturated.

Usage:
  python benchmarks/lfq_entropy.py [--json] [--n 2048] [--bits 10,14,16,18] [--group-bits 9]
                                   [--temperature 0.01] [--scale 0.01] [--max-naive-gib 4]
                                   [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fqgan_jax.quantizers import lfq

MIB, GIB = 2**20, 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=2048, help="tokens (official: 8 x 256 per GPU)")
    parser.add_argument("--bits", default="10,14,16,18", help="code bits b (K = 2^b)")
    parser.add_argument("--group-bits", type=int, default=9, help="model.lfq.entropy_group_bits")
    parser.add_argument("--temperature", type=float, default=0.01, help="τ (official 0.01)")
    parser.add_argument("--scale", type=float, default=0.01, help="latent standard deviation")
    parser.add_argument("--max-naive-gib", type=float, default=4.0,
                        help="run the naive softmax only where its temp fits this")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    args = parser.parse_args(argv)
    if args.n < 1 or args.group_bits < 1 or args.repeats < 1 or args.temperature <= 0:
        parser.error("--n, --group-bits and --repeats must be >= 1 and --temperature > 0")
    return args


def factorized_loss(x, temperature, group_bits):
    sample, batch = lfq.entropy_terms(x, temperature=temperature, group_bits=group_bits)
    return sample - batch


def naive_loss(x, temperature, group_bits):
    """The official computation: N x 2^b logits 2<x, c>/τ against every ±1 code."""
    del group_bits
    num_bits = x.shape[-1]
    codes = jnp.where(lfq.indices_to_bits(jnp.arange(2**num_bits), num_bits), 1.0, -1.0)
    logits = jnp.matmul(x, codes.T, precision=jax.lax.Precision.HIGHEST) * (2.0 / temperature)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    sample = jnp.mean(-jnp.sum(probs * log_probs, axis=-1))
    mean_probs = jnp.mean(probs, axis=0)
    return sample + jnp.sum(mean_probs * jnp.log(mean_probs + 1e-5))


def compile_method(loss, x, args):
    fn = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2))
    return fn.lower(x, args.temperature, args.group_bits).compile()


def time_compiled(compiled, x, repeats: int):
    value, grad = jax.block_until_ready(compiled(x))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(x))
        times.append(time.perf_counter() - start)
    return float(value), np.asarray(grad), statistics.median(times)


def measure(num_bits: int, args) -> dict:
    x = args.scale * jax.random.normal(jax.random.key(num_bits), (args.n, num_bits), jnp.float32)
    row = {"bits": num_bits}
    factorized = compile_method(factorized_loss, x, args)
    row["factorized_temp_bytes"] = factorized.memory_analysis().temp_size_in_bytes
    value, grad, row["factorized_time_s"] = time_compiled(factorized, x, args.repeats)
    row["loss"] = value
    naive = compile_method(naive_loss, x, args)
    row["naive_temp_bytes"] = naive.memory_analysis().temp_size_in_bytes
    if row["naive_temp_bytes"] > args.max_naive_gib * GIB:
        row["naive_skipped"] = True
        return row
    naive_value, naive_grad, row["naive_time_s"] = time_compiled(naive, x, args.repeats)
    row["max_abs_loss_diff"] = abs(value - naive_value)
    row["max_abs_grad_diff"] = float(np.max(np.abs(grad - naive_grad)))
    row["max_abs_grad"] = float(np.max(np.abs(naive_grad)))
    return row


def format_row(row: dict) -> str:
    head = (f"{row['bits']:>4} {row['factorized_temp_bytes'] / MIB:>11,.1f} "
            f"{row['naive_temp_bytes'] / MIB:>11,.1f} {row['factorized_time_s'] * 1e3:>9.2f}")
    if row.get("naive_skipped"):
        return f"{head}   naive skipped: would need {row['naive_temp_bytes'] / GIB:.1f} GiB"
    return (f"{head} {row['naive_time_s'] * 1e3:>9.2f} "
            f"{row['naive_time_s'] / row['factorized_time_s']:>7.1f} "
            f"{row['max_abs_loss_diff']:>9.2e} {row['max_abs_grad_diff']:>9.2e} "
            f"{row['max_abs_grad']:>9.2e}")


def format_table(args, rows: list[dict]) -> str:
    device = jax.devices()[0]
    lines = [f"LFQ entropy, loss + gradient: factorized (groups of {args.group_bits} bits) vs "
             f"naive 2^b softmax | N={args.n} τ={args.temperature:g} scale={args.scale:g} | "
             f"{jax.default_backend()} {device.device_kind} | median of {args.repeats}",
             f"{'bits':>4} {'fact MiB':>11} {'naive MiB':>11} {'fact ms':>9} {'naive ms':>9} "
             f"{'speedup':>7} {'|Δloss|':>9} {'|Δgrad|':>9} {'max|grad|':>9}"]
    lines += [format_row(row) for row in rows]
    lines.append("MiB: XLA compiled temp memory (memory_analysis); speedup: naive / factorized "
                 "time")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = [measure(int(b), args) for b in args.bits.split(",")]
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows}))
    else:
        print(format_table(args, rows))


if __name__ == "__main__":
    main()
