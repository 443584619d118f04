r"""The GAN start, side by side: how each setting moves the held-out PSNR across the adversarial
phase's start, and how much of the reconstruction saturates.

Each variant is the same run (`--config`, default the quickstart `configs/dual.py:smoke`) with a
few overrides, trained in its own process in its own workdir. Reported per variant, from its
`eval/<step>.json` files and its reconstruction grid of the held-out eval batch
(`eval/<step>.png`: originals over reconstructions):

* PSNR at the last eval before the generator sees the GAN (step < `gan.start`; the quickstart's
  step 100) and at the end, their difference, and the end's distance to the best PSNR of any
  eval: the quickstart's target is an end within 1 dB of the best;
* saturation: the share of the final reconstructions' pixel values at 0 or 255, minus the
  originals' share (the "blue blob" artifact measure of `training/gan_health.py`);
* wall time of the run, and the step it started from. "official" runs first; a variant whose
  settings act only once D trains starts from official's last checkpoint before that (and its
  evals up to it): until then the runs are the same computation, and resume is exact.

Usage:
  python benchmarks/gan_start.py [--config=configs/dual.py:smoke] [--variants=NAME,...]
                                 [--workdir=/tmp/gan_start] [--set key=value ...]
Variants (`--list` prints them): official (the preset as it is), warmup (D alone for 100 steps
instead of 50), ramp (the generator's GAN weight grows over 50 steps), lecam (LeCam 0.05),
adaptive (taming's adaptive weight), slow_d (D's lr / 4), damped_adam
(gan.official_disc_adam_count: D's Adam counted from step 1), weight_0.05 (half the GAN weight).
Each run takes as long as the quickstart (minutes on a CPU); run them alone on the machine for
meaningful times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
from PIL import Image
from quickstart_runs import REPO, train

VARIANTS = {
    "official": [],
    "no_gan": ["--config.gan.start=1000000"],  # the control: D never trains
    "warmup": ["--config.gan.disc_warmup_steps=100"],
    "ramp": ["--config.gan.ramp_steps=50"],
    "lecam": ["--config.gan.lecam_weight=0.05"],
    "adaptive": ["--config.gan.adaptive_weight=True"],
    "slow_d": ["--config.gan.optimizer.learning_rate=5e-05"],
    "damped_adam": ["--config.gan.official_disc_adam_count=True"],
    "weight_0.05": ["--config.gan.weight=0.05"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/dual.py:smoke")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", default="/tmp/gan_start")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every variant (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    return args


# Keys that change the computation before D's first update (beyond when that is): variants
# setting them cannot start from the base run's checkpoint.
_ACT_EARLY = ("gan.official_disc_adam_count", "optimizer.", "model.", "loss.", "data.", "seed")


def _gan_settings(config_spec: str, overrides: list[str]):
    """(gan.start, the first step D trains) of the config with `overrides`."""
    sys.path.insert(0, REPO)
    from fqgan_jax import config_lib  # noqa: PLC0415

    config = config_lib.load_config_file(os.path.join(REPO, config_spec))
    gan = config.gan
    for override in overrides:
        key, _, value = override.removeprefix("--config.").partition("=")
        if key in ("gan.start", "gan.disc_warmup_steps"):
            gan[key[4:]] = int(value)
    return int(gan.start), int(gan.start - gan.disc_warmup_steps)


def branch(base: str, workdir: str, before: int) -> int | None:
    """Starts `workdir` from the base run's last checkpoint at a step <= `before` (and its evals
    up to it): until D's first update the variants train identically, and the resume is exact,
    so the branched run equals a run from scratch. Returns that step, or None."""
    checkpoints = os.path.join(base, "checkpoints")
    steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit() and int(n) <= before] \
        if os.path.isdir(checkpoints) else []
    if not steps or os.path.exists(workdir):
        return None
    step = max(steps)
    shutil.copytree(os.path.join(checkpoints, str(step)),
                    os.path.join(workdir, "checkpoints", str(step)))
    os.makedirs(os.path.join(workdir, "eval"))
    for name in os.listdir(os.path.join(base, "eval")):  # <step>.json, <step>_tsne.png, ...
        prefix = name.split(".")[0].split("_")[0]
        if prefix.isdigit() and int(prefix) <= step:
            shutil.copy2(os.path.join(base, "eval", name), os.path.join(workdir, "eval", name))
    return step


def run_variant(name: str, args: argparse.Namespace) -> dict:
    workdir = os.path.join(args.workdir, name)
    overrides = [f"--config.{s}" for s in args.set] + VARIANTS[name]
    _, disc_start = _gan_settings(args.config, overrides)
    shares_start = not any(o.startswith(f"--config.{key}") for o in VARIANTS[name]
                           for key in _ACT_EARLY)
    # "Before" is the base settings' GAN start for every variant, the control's included.
    start, base_disc_start = _gan_settings(args.config, [f"--config.{s}" for s in args.set])
    branched = (branch(os.path.join(args.workdir, "official"), workdir,
                       min(disc_start, base_disc_start))
                if name != "official" and shares_start else None)
    evals, minutes = train(args.config, overrides, workdir)
    last = max(evals)
    before = max(step for step in evals if step < start) if any(
        step < start for step in evals) else min(evals)
    return {"variant": name, "psnr_before": evals[before]["psnr"], "before_step": before,
            "psnr_end": evals[last]["psnr"], "end_step": last,
            "best": max(e["psnr"] for e in evals.values()),
            "saturation": saturation(os.path.join(workdir, "eval", f"{last}.png")),
            "minutes": minutes, "from_step": branched or 0}


def saturation(grid_png: str) -> float:
    """Extra share of 0/255 values in the reconstructions (bottom half) over the originals."""
    grid = np.asarray(Image.open(grid_png).convert("RGB"))
    half = grid.shape[0] // 2
    extreme = lambda x: float(np.mean((x == 0) | (x == 255)))  # noqa: E731
    return extreme(grid[half:]) - extreme(grid[:half])


def format_table(rows: list[dict]) -> str:
    lines = ["| variant | PSNR before GAN (step) | PSNR end (step) | change | end − best | "
             "saturation | minutes (from step) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['psnr_before']:.2f} ({r['before_step']}) | "
            f"{r['psnr_end']:.2f} ({r['end_step']}) | {r['psnr_end'] - r['psnr_before']:+.2f} | "
            f"{r['psnr_end'] - r['best']:+.2f} | {r['saturation']:+.1%} | {r['minutes']:.1f} "
            f"({r['from_step']}) |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.list:
        for name, overrides in VARIANTS.items():
            print(f"{name}: {' '.join(overrides) or '(the config as it is)'}")
        return []
    rows = []
    names = args.variants.split(",")
    if "official" in names:  # first: the others start from its checkpoint where they can
        names.remove("official")
        names.insert(0, "official")
    for name in names:
        rows.append(run_variant(name, args))
        print(format_table(rows[-1:]).split("\n")[-1], flush=True)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
