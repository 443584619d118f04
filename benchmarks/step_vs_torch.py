r"""The JAX train step beside a plain PyTorch one doing the same work, in one run.

Both sides run the generator phase of `--config` (default FQGAN-Dual ds16, `configs/dual.py`)
at `--image_size` (256) and `--batch_size` (2) in float32 with L2 + codebook + commitment +
entropy + disentanglement and clipped Adam(+EMA): LPIPS, the teachers and the GAN are off on
both. The PyTorch side is `torch_tokenizer.py`, written from the spec, NCHW with stock torch
ops, and checked equal to the JAX step's loss, gradients and update on the same weights
(tests/test_torch_step_reference.py).

Each side runs in its own process, one after the other (`--rounds` times, alternating), so
neither competes for the cores and each reports its own peak RSS: the JAX side is
`train_step.py --json` on the same settings (compile timed apart from the steps), the torch
side times `torch_tokenizer.train_step` on the same random uint8 images. Reported: median and
min step, the first call (JAX: ahead-of-time compile; torch: its first step), peak
RSS and the speed-up torch median / JAX median. The machine's other load skews both sides, so
run it alone.

Usage:
  python benchmarks/step_vs_torch.py [--config=configs/dual.py] [--image_size=256]
      [--batch_size=2] [--steps=3] [--warmup=1] [--rounds=1] [--threads=N] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# What neither side computes: the generator phase without LPIPS, teachers or GAN, in float32.
COMMON = ("loss.perceptual_weight=0", "loss.semantic_weight=0", "gan.weight=0",
          "model.dtype='float32'")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/dual.py")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=1, help="alternating JAX/torch rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch intra-op threads (default: every core, as XLA uses)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for both sides (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.image_size={args.image_size}", *COMMON, *args.set]


def torch_worker(args: argparse.Namespace) -> dict:
    """Times the torch step in this process; one JSON line on stdout."""
    import numpy as np
    import torch
    import torch_tokenizer
    import train_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bench_args = train_step.parse_args(
        [f"--config={args.config}", f"--batch_size={args.batch_size}",
         *[f"--set={o}" for o in overrides(args)]])
    config = train_step.build_config(bench_args, 1)
    model = torch_tokenizer.build(config).train()
    optimizer = torch_tokenizer.make_optimizer(model, config)
    size = config.data.image_size
    images = torch.from_numpy(np.random.default_rng(args.seed).integers(
        0, 256, (args.batch_size, size, size, 3), dtype=np.uint8)).permute(0, 3, 1, 2)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = torch_tokenizer.train_step(model, optimizer, images, config)
        times.append(time.perf_counter() - start)
    timed = times[args.warmup:]
    return {"first_s": times[0], "step_time_median_s": statistics.median(timed),
            "step_time_min_s": min(timed), "process_peak_rss_bytes": train_step._peak_rss_bytes(),
            "last_loss": float(loss), "torch": torch.__version__, "threads": args.threads}


def _run(command: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, HERE, os.environ.get("PYTHONPATH",
                                                                                   "")]))
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_jax(args: argparse.Namespace) -> dict:
    result = _run([sys.executable, os.path.join(HERE, "train_step.py"), f"--config={args.config}",
                   f"--batch_size={args.batch_size}", f"--steps={args.steps}",
                   f"--warmup={args.warmup}", f"--seed={args.seed}", "--devices=1", "--json",
                   *[f"--set={o}" for o in overrides(args)]])
    result["first_s"] = result["compile_s"]
    return result


def run_torch(args: argparse.Namespace) -> dict:
    argv = [f"--{name}={getattr(args, name)}" for name in (
        "config", "image_size", "batch_size", "steps", "warmup", "threads", "seed")]
    return _run([sys.executable, os.path.abspath(__file__), *argv,
                 *[f"--set={o}" for o in args.set], "--torch_worker"])


def format_table(args: argparse.Namespace, rounds: list[tuple[dict, dict]]) -> str:
    jax_result = rounds[0][0]
    lines = [f"generator step | {args.config} {' '.join(overrides(args))} | batch "
             f"{args.batch_size} | jax {jax_result['jax']} ({jax_result['backend']}), torch "
             f"{rounds[0][1]['torch']} ({args.threads} threads) | median of {args.steps} after "
             f"{args.warmup}",
             "| round | JAX step s (min) | torch step s (min) | torch / JAX | JAX compile s | "
             "torch first step s | JAX RSS MiB | torch RSS MiB | JAX GFLOP/step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for index, (j, t) in enumerate(rounds, 1):
        lines.append(
            f"| {index} | {j['step_time_median_s']:.2f} ({j['step_time_min_s']:.2f}) | "
            f"{t['step_time_median_s']:.2f} ({t['step_time_min_s']:.2f}) | "
            f"{t['step_time_median_s'] / j['step_time_median_s']:.2f}x | {j['first_s']:.1f} | "
            f"{t['first_s']:.1f} | {j['process_peak_rss_bytes'] / 2**20:,.0f} | "
            f"{t['process_peak_rss_bytes'] / 2**20:,.0f} | {j['flops_per_device'] / 1e9:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> list[tuple[dict, dict]]:
    args = parse_args(argv)
    if args.torch_worker:
        print(json.dumps(torch_worker(args)))
        return []
    rounds = []
    for index in range(args.rounds):
        # Alternate which side goes first, so a drift in the machine's speed hits both.
        if index % 2:
            torch_result = run_torch(args)
            jax_result = run_jax(args)
        else:
            jax_result = run_jax(args)
            torch_result = run_torch(args)
        rounds.append((jax_result, torch_result))
        print(format_table(args, rounds).splitlines()[-1], flush=True)
    print(format_table(args, rounds))
    return rounds


if __name__ == "__main__":
    sys.path[:0] = [REPO, HERE]
    main()
