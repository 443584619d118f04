"""Fused Pallas nearest-code search vs the XLA ``nearest_code``, side by side.

For each (K, d) both searches run on the same seeded unit-norm data (N rows), each in its own
subprocess so that its device peak memory is its own (the allocator's peak never resets, and a
TPU can be held by one process only, so this parent never touches the accelerator). Reported:

* time: median wall time of ``--repeats`` calls after a warm-up call (``block_until_ready``);
* temp: XLA's compiled scratch (``memory_analysis().temp_size_in_bytes``): the N x C score
  chunks for XLA; ~nothing for the kernel, whose tiles live in VMEM / registers;
* peak: the device allocator's ``peak_bytes_in_use`` (inputs included) where
  ``memory_stats()`` exists (GPU, TPU); "-" elsewhere;
* agree: the fraction of rows where both pick the same code (random data: a disagreement means
  a near-tie that the two matmuls rounded differently), and ``self-check``: whether the kernel
  equals ``nearest_code`` exactly on tie-heavy integer data on this device
  (``pallas_search.kernel_agrees``).

On CPU the kernel runs in Pallas interpret mode at tiny sizes only: it shows that the script and
the kernel work, and its timings mean nothing.

Usage:
  python benchmarks/fused_search.py [--quick] [--json] [--n 65536]
      [--sizes 16384,65536,262144] [--dims 8,256] [--repeats 3]
      [--block-rows R] [--block-codes C] [--budget-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from quantizer import make_data  # the same seeded data as benchmarks/quantizer.py

MIB = 2**20
METHODS = ("xla", "fused")
# CPU: interpret mode runs the kernel's grid as a loop of XLA ops, so sizes stay tiny.
CPU_SIZES = {"n": 512, "sizes": "1000,4096", "dims": "8,64"}
CPU_QUICK_SIZES = {"n": 128, "sizes": "1000", "dims": "7"}
QUICK_SIZES = {"n": 16_384, "sizes": "16384,65536", "dims": "8,256"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=65_536, help="rows (tokens) to quantize")
    parser.add_argument("--sizes", default="16384,65536,262144", help="codebook sizes K")
    parser.add_argument("--dims", default="8,256", help="code dimensions d")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--block-rows", type=int, default=None, help="kernel row tile")
    parser.add_argument("--block-codes", type=int, default=None, help="kernel code tile")
    parser.add_argument("--budget-mb", type=float, default=256, help="nearest_code budget")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "probe" or "method:K:d:path"
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Worker: one measurement in a fresh process.
# ------------------------------------------------------------------------------------------------


def build_search(method: str, args: argparse.Namespace, on_cpu: bool):
    import functools

    import jax

    from fqgan_jax.quantizers import pallas_search, search

    if method == "xla":
        return jax.jit(functools.partial(search.nearest_code, normalized=True,
                                         memory_budget_bytes=int(args.budget_mb * MIB)))
    return jax.jit(functools.partial(
        pallas_search.fused_nearest_code, normalized=True, block_rows=args.block_rows,
        block_codes=args.block_codes, interpret=on_cpu))


def time_compiled(compiled, operands, repeats: int) -> tuple[np.ndarray, float]:
    indices = compiled(*operands).block_until_ready()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(*operands).block_until_ready()
        times.append(time.perf_counter() - start)
    return np.asarray(indices), statistics.median(times)


def run_worker(args: argparse.Namespace) -> dict:
    import jax

    device = jax.devices()[0]
    on_cpu = jax.default_backend() == "cpu"
    if args.worker == "probe":
        return {"backend": jax.default_backend(), "device": str(device.device_kind)}
    method, size, dim, indices_path = args.worker.split(":", 3)
    operands = [jax.device_put(x) for x in make_data(args.n, int(size), int(dim))]
    compiled = build_search(method, args, on_cpu).lower(*operands).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    indices, seconds = time_compiled(compiled, operands, args.repeats)
    np.save(indices_path, indices)
    stats = device.memory_stats() or {}
    result = {"method": method, "codebook_size": int(size), "dim": int(dim), "time_s": seconds,
              "temp_bytes": temp_bytes, "peak_bytes": stats.get("peak_bytes_in_use")}
    if method == "fused":
        result["self_check"] = fused_self_check(int(dim), on_cpu)
    return result


def fused_self_check(dim: int, on_cpu: bool) -> bool:
    import jax

    from fqgan_jax.quantizers import pallas_search

    target = "tpu" if on_cpu else pallas_search.kernel_target(jax.default_backend())
    return bool(target) and pallas_search.kernel_agrees(target, dim, True, interpret=on_cpu)


# ------------------------------------------------------------------------------------------------
# Parent: spawn workers, compare, print.
# ------------------------------------------------------------------------------------------------


def spawn(args: argparse.Namespace, worker: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", worker,
               "--n", str(args.n), "--repeats", str(args.repeats),
               "--budget-mb", str(args.budget_mb)]
    for flag, value in (("--block-rows", args.block_rows), ("--block-codes", args.block_codes)):
        if value is not None:
            command += [flag, str(value)]
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root,
                                                       os.environ.get("PYTHONPATH", "")]),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")  # GPU: the peak is what the search used
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:g} s"}
    if done.returncode != 0:
        return {"error": " | ".join(done.stderr.strip().splitlines()[-3:])}
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace, size: int, dim: int, workdir: str) -> dict:
    row = {"codebook_size": size, "dim": dim}
    for method in METHODS:
        path = os.path.join(workdir, f"{method}_{size}_{dim}.npy")
        row[method] = spawn(args, f"{method}:{size}:{dim}:{path}")
        if "error" not in row[method]:
            row[method]["indices"] = np.load(path)
    xla, fused = row["xla"], row["fused"]
    if "indices" in xla and "indices" in fused:
        row["agreement"] = float(np.mean(xla["indices"] == fused["indices"]))
        row["speedup_fused_over_xla"] = xla["time_s"] / fused["time_s"]
    for result in (xla, fused):
        result.pop("indices", None)
    return row


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def format_row(row: dict) -> list[str]:
    head = f"{row['codebook_size']:>8} {row['dim']:>4}"
    errors = [f"{head} {m}: {row[m]['error']}" for m in METHODS if "error" in row[m]]
    if errors:
        return errors
    xla, fused = row["xla"], row["fused"]
    return [f"{head} {xla['time_s'] * 1e3:>9.2f} {fused['time_s'] * 1e3:>9.2f} "
            f"{row['speedup_fused_over_xla']:>9.2f} {_mib(xla['temp_bytes']):>9} "
            f"{_mib(fused['temp_bytes']):>9} {_mib(xla['peak_bytes']):>9} "
            f"{_mib(fused['peak_bytes']):>9} {row['agreement']:>7.4f} "
            f"{str(fused.get('self_check')):>6}"]


def format_table(args: argparse.Namespace, probe: dict, rows: list[dict]) -> str:
    lines = [f"fused Pallas search vs XLA nearest_code | N={args.n} | "
             f"backend={probe['backend']} device={probe['device']} | median of {args.repeats}"]
    if probe["backend"] == "cpu":
        lines.append("CPU: the kernel runs in Pallas interpret mode at tiny sizes; the timings "
                     "are NOT meaningful, only that both searches run and agree.")
    lines.append(f"{'K':>8} {'d':>4} {'xla ms':>9} {'fused ms':>9} {'xla/fused':>9} "
                 f"{'xla temp':>9} {'fus temp':>9} {'xla peak':>9} {'fus peak':>9} "
                 f"{'agree':>7} {'check':>6}")
    for row in rows:
        lines += format_row(row)
    lines.append("temp / peak in MiB: XLA compiled scratch / device allocator peak (inputs "
                 "included); check: exact on tie-heavy integer data on this device")
    return "\n".join(lines)


def plan_sizes(args: argparse.Namespace, backend: str) -> None:
    """Tiny sizes on CPU; ``--quick`` sizes on an accelerator unless given explicitly."""
    overrides = (CPU_QUICK_SIZES if args.quick else CPU_SIZES) if backend == "cpu" else (
        QUICK_SIZES if args.quick else {})
    for key, value in overrides.items():
        setattr(args, key, value)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    probe = spawn(args, "probe")
    if "error" in probe:
        raise SystemExit(f"could not start JAX: {probe['error']}")
    plan_sizes(args, probe["backend"])
    sizes = [int(s) for s in args.sizes.split(",") if s]
    dims = [int(d) for d in args.dims.split(",") if d]
    with tempfile.TemporaryDirectory() as workdir:
        rows = [compare(args, size, dim, workdir) for dim in dims for size in sizes]
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker")}
        print(json.dumps({"settings": settings, "probe": probe, "results": rows}))
    else:
        print(format_table(args, probe, rows))


if __name__ == "__main__":
    main()
