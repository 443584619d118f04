"""Nearest-code search: chunked ``nearest_code`` vs the naive full-distance argmin.

For each codebook size K, both searches run on the same seeded unit-norm data (N rows, d dims).
Each measurement runs in its own subprocess so that its peak RSS is its own: the parent spawns
``--worker`` children and compares their results side by side. Reported per method:

* time: median wall time of ``--repeats`` calls after a warm-up call (``block_until_ready``);
* temp: XLA's compiled scratch memory (``compiled.memory_analysis().temp_size_in_bytes``);
* peak: on CPU, peak RSS growth during execution (VmHWM reset through /proc/self/clear_refs after
  compiling); on accelerators, the device allocator's ``peak_bytes_in_use``;
* agree: the fraction of rows where the two methods pick the same code (ties may differ).

The naive run is skipped when its N x K float32 matrix exceeds ``--naive-limit-gb`` or the
memory currently available.

Usage:
  python benchmarks/quantizer.py [--json] [--n 16384] [--sizes 16384,65536,262144] [--dim 8]
                                 [--budget-mb 256] [--naive-limit-gb 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

MIB, GIB = 2**20, 2**30
METHODS = ("ours", "naive")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, default=16_384, help="rows (tokens) to quantize")
    parser.add_argument("--sizes", default="16384,65536,262144", help="codebook sizes K")
    parser.add_argument("--dim", type=int, default=8, help="code dimension d")
    parser.add_argument("--budget-mb", type=float, default=256, help="nearest_code budget")
    parser.add_argument("--naive-limit-gb", type=float, default=4, help="largest naive matrix")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "method:K:indices_path"
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Memory probes (Linux /proc; None where unavailable).
# ------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so later peaks exclude compilation."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------------
# Worker: one (method, K) measurement in a fresh process.
# ------------------------------------------------------------------------------------------------


def make_data(num_rows: int, codebook_size: int, dim: int):
    """Seeded unit-norm rows, as the FQGAN quantizer searches them (spec fqgan.md §1.4)."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(num_rows, dim)).astype(np.float32)
    codebook = rng.normal(size=(codebook_size, dim)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    codebook /= np.linalg.norm(codebook, axis=-1, keepdims=True)
    return z, codebook


def build_search(method: str, budget_bytes: int):
    import jax
    import jax.numpy as jnp

    from fqgan_jax.quantizers import nearest_code

    if method == "ours":
        return jax.jit(functools.partial(nearest_code, memory_budget_bytes=budget_bytes))

    def naive(z, codebook):
        squared_distance = (
            jnp.sum(z * z, -1, keepdims=True) + jnp.sum(codebook * codebook, -1)
            - 2.0 * jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)
        )
        return jnp.argmin(squared_distance, axis=-1)

    return jax.jit(naive)


def run_worker(args: argparse.Namespace) -> dict:
    import jax

    method, size, indices_path = args.worker.split(":", 2)
    codebook_size = int(size)
    z, codebook = (jax.device_put(x) for x in make_data(args.n, codebook_size, args.dim))
    search = build_search(method, int(args.budget_mb * MIB))
    compiled = search.lower(z, codebook).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    on_cpu = jax.default_backend() == "cpu"
    peak_reset = on_cpu and _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    indices = compiled(z, codebook).block_until_ready()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        compiled(z, codebook).block_until_ready()
        times.append(time.perf_counter() - start)
    np.save(indices_path, np.asarray(indices))
    if on_cpu:
        peak = (_proc_status_kib("VmHWM") - rss_before) * 1024 if peak_reset else None
        peak_kind = "rss"
    else:
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
        peak_kind = "device"
    return {
        "method": method, "codebook_size": codebook_size, "time_s": statistics.median(times),
        "temp_bytes": temp_bytes, "peak_bytes": peak, "peak_kind": peak_kind,
        "device": str(jax.devices()[0].device_kind),
    }


# ------------------------------------------------------------------------------------------------
# Parent: spawn workers, compare, print.
# ------------------------------------------------------------------------------------------------


def naive_skip_reason(args: argparse.Namespace, codebook_size: int) -> str | None:
    matrix_bytes = args.n * codebook_size * 4
    if matrix_bytes > args.naive_limit_gb * GIB:
        return f"N x K matrix {matrix_bytes / GIB:.1f} GiB > --naive-limit-gb {args.naive_limit_gb}"
    available = available_memory_bytes()
    if available is not None and matrix_bytes > available:
        return f"N x K matrix {matrix_bytes / GIB:.1f} GiB > available {available / GIB:.1f} GiB"
    return None


def spawn_worker(args: argparse.Namespace, method: str, codebook_size: int, workdir: str):
    indices_path = os.path.join(workdir, f"{method}_{codebook_size}.npy")
    command = [
        sys.executable, os.path.abspath(__file__), "--worker",
        f"{method}:{codebook_size}:{indices_path}", "--n", str(args.n), "--dim", str(args.dim),
        "--budget-mb", str(args.budget_mb), "--repeats", str(args.repeats),
    ]
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python_path = os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=python_path)
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-3:]
        return {"method": method, "codebook_size": codebook_size, "error": " | ".join(tail)}
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["indices"] = np.load(indices_path)
    return result


def compare_size(args: argparse.Namespace, codebook_size: int, workdir: str) -> dict:
    measure = functools.partial(spawn_worker, args, codebook_size=codebook_size, workdir=workdir)
    row = {"codebook_size": codebook_size, "ours": measure("ours")}
    skip = naive_skip_reason(args, codebook_size)
    row["naive"] = {"skipped": skip} if skip else measure("naive")
    ours, naive = row["ours"], row["naive"]
    if "indices" in ours and "indices" in naive:
        row["agreement"] = float(np.mean(ours["indices"] == naive["indices"]))
        row["speedup_naive_over_ours"] = naive["time_s"] / ours["time_s"]
        row["temp_ratio_naive_over_ours"] = naive["temp_bytes"] / max(ours["temp_bytes"], 1)
    for result in (ours, naive):
        result.pop("indices", None)
    return row


def _mib(value) -> str:
    return "-" if value is None else f"{value / MIB:,.0f}"


def format_table(args: argparse.Namespace, rows: list[dict]) -> str:
    device = next((r["ours"].get("device") for r in rows if "device" in r["ours"]), "?")
    lines = [
        f"nearest_code vs naive argmin | N={args.n} d={args.dim} budget={args.budget_mb:g} MiB "
        f"| device={device} | median of {args.repeats}",
        f"{'K':>8} {'method':<6} {'time ms':>9} {'temp MiB':>9} {'peak MiB':>9} {'agree':>7} "
        f"{'naive/ours time':>15} {'naive/ours temp':>15}",
    ]
    for row in rows:
        for method in METHODS:
            result = row[method]
            if "skipped" in result or "error" in result:
                note = result.get("skipped") or result["error"]
                lines.append(f"{row['codebook_size']:>8} {method:<6} skipped: {note}")
                continue
            extra = ""
            if method == "naive" and "agreement" in row:
                extra = (f"{row['agreement']:>7.4f} {row['speedup_naive_over_ours']:>15.2f} "
                         f"{row['temp_ratio_naive_over_ours']:>15.2f}")
            lines.append(
                f"{row['codebook_size']:>8} {method:<6} {result['time_s'] * 1e3:>9.1f} "
                f"{_mib(result['temp_bytes']):>9} {_mib(result['peak_bytes']):>9} {extra}"
            )
    peak_kind = next((r["ours"].get("peak_kind") for r in rows if "peak_kind" in r["ours"]), "")
    lines.append("temp = XLA compiled scratch; peak = "
                 + ("process RSS growth while running" if peak_kind == "rss"
                    else "device allocator peak"))
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    sizes = [int(size) for size in args.sizes.split(",") if size]
    with tempfile.TemporaryDirectory() as workdir:
        rows = [compare_size(args, size, workdir) for size in sizes]
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker")}
        print(json.dumps({"settings": settings, "results": rows}))
    else:
        print(format_table(args, rows))


if __name__ == "__main__":
    main()
