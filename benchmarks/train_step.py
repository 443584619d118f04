r"""Train-step benchmark: step time, images/s, memory and FLOP utilization of the real step.

Builds the run training builds (`fqgan_jax.training.build.build_run`: config checks, mesh,
sharded state, frozen nets, the phased train step) and runs it on random uint8 images: no data
pipeline, so this measures the step, not the input. Reported:

* compile: seconds to lower and compile the step ahead of time, and XLA's
  `memory_analysis()` of the compiled program per device: arguments (state, batch, frozen nets),
  outputs, aliased (donated state reused for the new state) and temporaries (activations kept for
  the backward pass, scratch); "program" = arguments + outputs - aliased + temporaries;
* time: median and min wall time of `--steps` steps after `--warmup`, each blocked on the new
  state (`jax.block_until_ready`); images/s = global batch / median;
* peak: the device allocator's `peak_bytes_in_use` (max over local devices, for the process's
  lifetime: state init and compile included). The CPU backend keeps no allocator statistics, so
  there it is n/a; the process's peak RSS (all simulated devices together, compilation
  included) is shown instead as `rss`;
* FLOPs: the compiled program's `cost_analysis()["flops"]`. It counts the FLOPs of the program
  that runs on one device (the SPMD-partitioned module), rematerialized recomputation included,
  so the utilization below is hardware FLOPs utilization (HFU), not strict model FLOPs
  utilization; XLA may also count a loop body once rather than per iteration (the chunked
  codebook search, a small share). On GPU/TPU, MFU = FLOPs per device / median step time / the
  device's dense bf16 peak (PEAK_BF16_FLOPS, by `device_kind`); on CPU or an unknown kind only
  the achieved FLOP/s are shown. A config that computes in float32 is still compared with the
  bf16 peak (flagged in the output).

The adversarial phase (`--phase`) picks a step index where it is active (`step_fn.phase`): by
default the full GAN phase (generator GAN term + discriminator update) if the config has a GAN,
else the only phase. The benchmark uses all devices (or the first `--devices`); `--mesh` must
cover them. `--random_frozen` replaces LPIPS and the teachers by random-init networks of the
same architectures, so the full recipe can be timed where their weight files are missing.

`--compare` runs the base settings and each variant in its own process (peak memory is per
process) and prints them side by side; each variant is `;`-separated `--set` overrides, e.g.
--compare "model.remat=True" --compare "mesh.shape=(8, 1)".

Usage:
  python benchmarks/train_step.py --config=configs/dual.py:smoke [--mesh=8,1] [--batch_size=N]
      [--steps=10] [--warmup=2] [--phase=gan|disc_warmup|no_gan] [--set key=value ...]
      [--random_frozen] [--devices=N] [--compare "key=value;..." ...] [--json]

Measured on a 2-core x86-64 CPU with 8 simulated devices (jax 0.10.2). The 8 devices share 2
cores, so the times are NOT meaningful for speed; the per-device memory and FLOP ratios are.
(A batch of 8 fails the config check here: the smoke preset's per-shard InfoNCE needs >= 2
images per device.)

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_step.py \
      --config=configs/dual.py:smoke --mesh=4,2 --steps=3 --warmup=1 \
      --set data.image_size=32 --set train.batch_size=16 --compare "model.remat=True" \
      --compare "mesh.shape=(8, 1)" --compare "mesh.shape=(8, 1);model.remat=True"

  phase=gan (step 149) | batch=16 image=32 dtype=float32 | 8 x cpu | median of 3 after 1
  mesh (data, fsdp)          4x2       4x2       8x1       8x1
  remat                    False      True     False      True
  compile s                 28.7      24.3      31.1      35.9
  arguments MiB/dev         25.9      25.9      48.1      48.1
  outputs MiB/dev           25.4      25.4      47.6      47.6
  aliased MiB/dev           25.4      25.4      47.6      47.6
  temporaries MiB/dev       53.7      53.7      69.3      69.3
  program MiB/dev           79.6      79.6     117.4     117.5
  step median ms         2,177.1   2,220.5   2,800.4   2,735.8
  step min ms            2,167.1   1,707.1   2,276.1   2,675.9
  images/s                   7.3       7.2       5.7       5.8
  peak device MiB            n/a       n/a       n/a       n/a
  rss peak MiB             2,220     2,207     2,502     2,495
  GFLOP/step/dev            4.14      4.40      3.87      4.13
  TFLOP/s/dev              0.002     0.002     0.001     0.002
  MFU %                      n/a       n/a       n/a       n/a

FSDP over 2 devices (4x2) halves the per-device state (arguments 48.1 -> 25.9 MiB) and lowers
the temporaries (69.3 -> 53.7 MiB). Remat adds 6-7% FLOPs (the recomputation) but leaves XLA's
temporaries unchanged here; so did it at the preset's 64 px on 8x1 (147.7 MiB both; 17.3 -> 18.4
GFLOP) and on one device, --phase=no_gan, batch 16 at 64 px (950 -> 970 MiB; 99.4 -> 108.1
GFLOP). One device running the whole batch 16 at 32 px counts 29.6 GFLOP, 7.6 x the 3.87 of one
of the 8 devices of 8x1: cost_analysis counts per device. Not yet measured on a GPU or TPU.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

MIB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peak FLOP/s of one JAX device, by `device_kind`: exact match first, else the longest
# key that starts it (case-insensitive). A TPU v4/v5p/v6e device is a chip (both cores).
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,  # SXM4 and PCIe, 40 and 80 GB
    "NVIDIA B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}

PHASES = {  # name -> (discriminator update, generator GAN term)
    "no_gan": (False, False),
    "disc_warmup": (True, False),
    "gan": (True, True),
}


class BenchmarkError(ValueError):
    """A setting that cannot work: reported in one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/dual.py:smoke",
                        help="config file[:preset], as fqgan_jax.main's --config")
    parser.add_argument("--mesh", help="(data, fsdp) shape, e.g. 8,1 or -1,2; default: config's")
    parser.add_argument("--batch_size", type=int, help="global batch; default: config's")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--phase", choices=tuple(PHASES),
                        help="adversarial phase; default: gan if the config has a GAN")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, value parsed as a Python literal (else a "
                             "string), e.g. model.remat=True; repeatable; applied after "
                             "--mesh and --batch_size")
    parser.add_argument("--random_frozen", action="store_true",
                        help="random-init LPIPS and teachers of the configured architectures "
                             "instead of their weight files")
    parser.add_argument("--devices", type=int, help="use the first N devices; default: all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")
    parser.add_argument("--compare", action="append", default=[], metavar="'K=V;K=V'",
                        help="a variant to run beside the base settings, each in its own "
                             "process; repeatable")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        raise BenchmarkError("--steps must be >= 1 and --warmup >= 0.")
    return args


# ------------------------------------------------------------------------------------------------
# Config: overrides, mesh, phase.
# ------------------------------------------------------------------------------------------------


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides: list[str]) -> None:
    """`key=value` overrides onto `config`, in place; unknown keys raise ConfigError."""
    from fqgan_jax import config_lib

    known = config_lib.flat_keys(config)
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or not key:
            raise config_lib.ConfigError(f"--set {override!r} must look like key=value.")
        if key not in known:
            raise config_lib.ConfigError(config_lib.unknown_key_message(key, known))
        *sections, name = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        value = parse_value(text)
        try:
            target[name] = value
        except (TypeError, ValueError) as error:
            raise config_lib.ConfigError(f"--set {override}: {error}") from error


def parse_mesh(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(s == 0 or s < -1 for s in shape):
        raise BenchmarkError(f"--mesh={text!r} must be comma-separated sizes, e.g. 8,1 or -1,2.")
    return shape


def build_config(args: argparse.Namespace, num_devices: int):
    """The config as overridden and checked (frozen nets not resolved yet)."""
    from fqgan_jax import config_lib

    config = config_lib.load_config_file(args.config)
    if args.mesh:
        config.mesh.shape = parse_mesh(args.mesh)
    if args.batch_size is not None:
        config.train.batch_size = args.batch_size
    apply_overrides(config, args.set)  # last: a --compare variant's mesh.shape wins over --mesh
    # The eval keys are not used here; keep their batch from failing the device-count check.
    if config.eval.batch_size % num_devices:
        config.eval.batch_size = config.train.batch_size
    config_lib.check_config(config, num_devices)
    return config


def phase_step(config, name: str) -> int:
    """The first step index at which `name` is the adversarial phase of `config`."""
    from fqgan_jax.objectives import adversarial

    gan = config.gan
    candidates = (0, max(gan.start - gan.disc_warmup_steps - 1, 0), max(gan.start - 1, 0))
    wanted = adversarial.Phase(*PHASES[name])
    for step in candidates:
        if adversarial.phase(step, gan) == wanted:
            return step
    raise BenchmarkError(
        f"--phase={name} never runs with config.gan.weight={gan.weight}, start={gan.start}, "
        f"disc_warmup_steps={gan.disc_warmup_steps}.")


def peak_flops(device_kind: str) -> tuple[float | None, str | None]:
    """(dense bf16 peak FLOP/s, table key) for a device kind, or (None, None)."""
    kind = device_kind.lower()
    exact = {k.lower(): k for k in PEAK_BF16_FLOPS}
    if kind in exact:
        return PEAK_BF16_FLOPS[exact[kind]], exact[kind]
    prefixes = [k for k in PEAK_BF16_FLOPS if kind.startswith(k.lower())]
    if not prefixes:
        return None, None
    key = max(prefixes, key=len)
    return PEAK_BF16_FLOPS[key], key


# ------------------------------------------------------------------------------------------------
# Building and measuring the step.
# ------------------------------------------------------------------------------------------------


def random_frozen_nets(config, mesh) -> dict:
    """networks.load's pytree, with random-init networks of the same architectures."""
    import jax
    from flax import nnx

    from fqgan_jax import config_lib
    from fqgan_jax.frozen import lpips, networks, teachers

    frozen = {}
    if config.loss.perceptual_weight > 0:
        frozen["lpips"] = nnx.state(lpips.LPIPS(dtype=config.model.dtype, rngs=nnx.Rngs(0)),
                                    nnx.Param)
    taught = config_lib.taught_branches(config)
    if taught:
        frozen["teachers"] = {
            branch: nnx.state(teachers.random_teacher(name, seed=index,
                                                      dtype=config.model.dtype), nnx.Param)
            for index, (branch, name) in enumerate(taught.items())}
    return jax.device_put(frozen, networks.shardings(frozen, mesh,
                                                        shard=config.mesh.shard_frozen))


def _memory_analysis(compiled) -> dict:
    try:
        memory = compiled.memory_analysis()
    except Exception as error:  # noqa: BLE001 (backends without it raise various errors)
        return {"memory_analysis_note": f"memory_analysis() failed: {error}"}
    if memory is None:
        return {"memory_analysis_note": "memory_analysis() returned None on this backend"}
    out = {f"{name}_bytes": int(getattr(memory, f"{name}_size_in_bytes", 0) or 0)
           for name in ("argument", "output", "alias", "temp")}
    out["program_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                            + out["temp_bytes"])
    return out


def _cost_flops(compiled) -> dict:
    """FLOPs of the compiled (per-device, SPMD-partitioned) program, and where they came from."""
    try:
        cost = compiled.cost_analysis()
    except Exception as error:  # noqa: BLE001
        return {"flops_per_device": None, "flops_source": f"cost_analysis() failed: {error}"}
    if isinstance(cost, (list, tuple)):  # older JAX: a list with one dict per program
        source = f"cost_analysis() list of {len(cost)}, first entry"
        cost = cost[0] if cost else {}
    else:
        source = "cost_analysis() dict"
    flops = (cost or {}).get("flops")
    if flops is None or flops < 0:
        return {"flops_per_device": None, "flops_source": source + ": no 'flops'"}
    return {"flops_per_device": float(flops),
            "flops_source": source + " (the program one device runs)"}


def _device_memory(devices) -> dict:
    stats = [device.memory_stats() for device in devices]
    if not all(stats) or not all("peak_bytes_in_use" in s for s in stats):
        backend = devices[0].platform
        return {"peak_bytes_in_use": None,
                "peak_note": f"n/a: the {backend} backend keeps no allocator statistics "
                             "(device.memory_stats() gives no peak_bytes_in_use)"}
    peak = max(s["peak_bytes_in_use"] for s in stats)
    limits = [s.get("bytes_limit") for s in stats if s.get("bytes_limit")]
    return {"peak_bytes_in_use": int(peak), "bytes_limit": int(min(limits)) if limits else None,
            "peak_note": "device allocator peak, max over local devices, process lifetime"}


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_benchmark(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp

    from fqgan_jax import sharding
    from fqgan_jax.training.build import build_run

    devices = jax.devices()
    if args.devices is not None:
        if not 1 <= args.devices <= len(devices):
            raise BenchmarkError(f"--devices={args.devices}: {len(devices)} are available.")
        devices = devices[:args.devices]
    config = build_config(args, len(devices))
    phase_name = args.phase or ("gan" if config.gan.weight > 0 else "no_gan")
    step_index = phase_step(config, phase_name)
    mesh = sharding.make_mesh(config.mesh, devices)
    run = build_run(config, mesh,
                    frozen=random_frozen_nets(config, mesh) if args.random_frozen else None)
    config, frozen = run.config, run.frozen
    state = run.init_state()
    state = state.replace(step=jax.device_put(jnp.int32(step_index), state.step.sharding))
    size, global_batch = config.data.image_size, config.train.batch_size
    local = global_batch // jax.process_count()
    images = np.random.default_rng(args.seed + jax.process_index()).integers(
        0, 256, (local, size, size, 3), dtype=np.uint8)
    batch = sharding.to_global_batch({"image": images}, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    compiled = run.train_step.compile_ahead(step_index, state, batch, frozen)
    compile_s = time.perf_counter() - start

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(state)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    skipped = int(jax.device_get(state.nonfinite_total))
    loss = float(jax.device_get(metrics["loss"]))

    median = statistics.median(times)
    kind = devices[0].device_kind
    result = {
        "config": args.config, "overrides": list(args.set), "random_frozen": args.random_frozen,
        "phase": phase_name, "step_index": step_index,
        "mesh": [int(s) for s in mesh.devices.shape], "num_devices": len(devices),
        "backend": devices[0].platform, "device_kind": kind, "jax": jax.__version__,
        "global_batch": global_batch, "image_size": size, "dtype": config.model.dtype,
        "remat": bool(config.model.get("remat", False)),
        "frozen_nets": (["lpips"] if "lpips" in frozen else [])
        + [f"teacher:{branch}" for branch in frozen.get("teachers", {})],
        "compile_s": compile_s,
        **_memory_analysis(compiled),
        "steps": args.steps, "warmup": args.warmup,
        "step_time_median_s": median, "step_time_min_s": min(times), "step_times_s": times,
        "images_per_s": global_batch / median,
        **_device_memory(devices),
        "process_peak_rss_bytes": _peak_rss_bytes(),
        **_cost_flops(compiled),
        "skipped_updates": skipped, "last_loss": loss,
    }
    flops = result["flops_per_device"]
    result["achieved_flops_per_s_per_device"] = flops / median if flops else None
    peak, key = peak_flops(kind)
    result["peak_bf16_flops_per_device"], result["peak_table_key"] = peak, key
    if flops and peak and result["backend"] != "cpu":
        result["mfu"] = flops / median / peak
        result["mfu_note"] = "hardware FLOPs (cost_analysis, remat included) / bf16 dense peak"
        if config.model.dtype != "bfloat16":
            result["mfu_note"] += f"; this config computes in {config.model.dtype}"
    else:
        result["mfu"] = None
        result["mfu_note"] = ("n/a: " + ("no FLOP count" if not flops else
                                         "CPU" if result["backend"] == "cpu" else
                                         f"no peak FLOP/s known for device kind {kind!r}"))
    return result


# ------------------------------------------------------------------------------------------------
# Side by side: each variant in its own process.
# ------------------------------------------------------------------------------------------------


def _base_argv(args: argparse.Namespace) -> list[str]:
    argv = [f"--config={args.config}", f"--steps={args.steps}", f"--warmup={args.warmup}",
            f"--seed={args.seed}", "--json"]
    for name in ("mesh", "batch_size", "phase", "devices"):
        if getattr(args, name) is not None:
            argv.append(f"--{name}={getattr(args, name)}")
    if args.random_frozen:
        argv.append("--random_frozen")
    return argv + [f"--set={override}" for override in args.set]


def spawn(argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), *argv],
                               capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-2:]
        return {"error": " | ".join(tail)}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace) -> list[tuple[str, dict]]:
    base = _base_argv(args)
    columns = [("base", spawn(base))]
    for variant in args.compare:
        overrides = [part.strip() for part in variant.split(";") if part.strip()]
        columns.append((variant, spawn(base + [f"--set={o}" for o in overrides])))
    return columns


def _fmt(value, scale=1.0, digits=0) -> str:
    if value is None:
        return "n/a"
    return f"{value / scale:,.{digits}f}"


ROWS = (  # label, key, scale, digits
    ("compile s", "compile_s", 1, 1),
    ("arguments MiB/dev", "argument_bytes", MIB, 1),
    ("outputs MiB/dev", "output_bytes", MIB, 1),
    ("aliased MiB/dev", "alias_bytes", MIB, 1),
    ("temporaries MiB/dev", "temp_bytes", MIB, 1),
    ("program MiB/dev", "program_bytes", MIB, 1),
    ("step median ms", "step_time_median_s", 1e-3, 1),
    ("step min ms", "step_time_min_s", 1e-3, 1),
    ("images/s", "images_per_s", 1, 1),
    ("peak device MiB", "peak_bytes_in_use", MIB, 0),
    ("rss peak MiB", "process_peak_rss_bytes", MIB, 0),
    ("GFLOP/step/dev", "flops_per_device", 1e9, 2),
    ("TFLOP/s/dev", "achieved_flops_per_s_per_device", 1e12, 3),
    ("MFU %", "mfu", 0.01, 1),
)


def format_table(columns: list[tuple[str, dict]]) -> str:
    ok = [r for _, r in columns if "error" not in r]
    first = ok[0] if ok else {}
    lines = []
    if first:
        lines.append(
            f"train step | {first['config']} {' '.join(first['overrides'])} | phase="
            f"{first['phase']} (step {first['step_index']}) | batch={first['global_batch']} "
            f"image={first['image_size']} dtype={first['dtype']} | {first['num_devices']} x "
            f"{first['device_kind']} ({first['backend']}), jax {first['jax']} | frozen nets: "
            f"{', '.join(first['frozen_nets']) or 'none'}"
            f"{' (random-init)' if first['random_frozen'] and first['frozen_nets'] else ''} | "
            f"median of {first['steps']} after {first['warmup']}")
    width = max([12] + [len(label) + 2 for label, _ in columns])
    labels = [label for label, _ in columns]
    lines.append(f"{'':<22}" + "".join(f"{label:>{width}}" for label in labels))
    lines.append(f"{'mesh (data, fsdp)':<22}" + "".join(
        f"{'x'.join(map(str, r['mesh'])) if 'mesh' in r else '-':>{width}}"
        for _, r in columns))
    lines.append(f"{'remat':<22}" + "".join(f"{r.get('remat', '-')!s:>{width}}"
                                           for _, r in columns))
    for label, key, scale, digits in ROWS:
        if not any(r.get(key) is not None for r in ok) and key not in (
                "peak_bytes_in_use", "mfu"):
            continue
        lines.append(f"{label:<22}" + "".join(
            f"{'-' if 'error' in r else _fmt(r.get(key), scale, digits):>{width}}"
            for _, r in columns))
    for label, result in columns:
        if "error" in result:
            lines.append(f"{label}: error: {result['error']}")
    if first:
        notes = [f"peak: {first['peak_note']}",
                 f"FLOPs: {first['flops_source']}; MFU: {first['mfu_note']}"]
        if first.get("peak_table_key"):
            notes[-1] += (f" ({first['peak_table_key']}: "
                          f"{first['peak_bf16_flops_per_device'] / 1e12:g} TFLOP/s)")
        if any(r.get("skipped_updates") for r in ok):
            notes.append("some updates were skipped as non-finite (same compute; see JSON)")
        lines += notes
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    """Runs the benchmark, prints the table (or JSON) and returns the results: one result dict,
    or with --compare {"columns": [{"label", **result}]}. Bad settings exit with status 2."""
    from fqgan_jax import config_lib
    from fqgan_jax.frozen import weights

    try:
        args = parse_args(argv)
        if args.compare:
            columns = compare(args)
            output = {"columns": [{"label": label, **result} for label, result in columns]}
        else:
            output = run_benchmark(args)
            columns = [("measured", output)]
    except (BenchmarkError, config_lib.ConfigError, weights.PretrainedError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(output) if args.json else format_table(columns))
    return output


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
