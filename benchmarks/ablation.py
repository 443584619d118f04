r"""The paper's Table 3 orderings at small scale: does factorization help, and do the
disentanglement and representation terms?

Four runs of the same trainer on the same data for the same steps, at the same total code count
(--codes, default 2048, the Dual smoke preset's 2 x 1024):

* vqgan:      LlamaGen VQGAN, one codebook of K codes (`configs/vqgan.py`);
* fqgan:      FQGAN-Dual, two sub-codebooks of K / 2, without the disentanglement and
              representation terms;
* fqgan+dis:  with disentanglement (0.1);
* fqgan+dis+rep: with both (the full Dual recipe; on a CPU the teacher is a random tower).

Each starts from the `:smoke` preset of its config file, so the CPU sizes are the quickstart's
(64 px, ds4, 200 steps of 16 photos); `--set key=value` changes all of them (e.g.
`--set gan.weight=0` for reconstruction-only runs, or a GPU-sized config with `--preset=`).
Reported: held-out PSNR, SSIM and usage of the final eval, and for the factorized runs the PSNR
of the reconstruction from each sub-codebook alone (the others zeroed, FQGAN Figure 3).

Paper (FQGAN Table 3, ImageNet 256, FQGAN-Dual; rFID / PSNR / usage): VQGAN 16384: 3.71 / 20.56
/ 98%; VQGAN 32768 (FQGAN's total): 3.60 / 20.56 / 84%; FQGAN 16384 x 2 without dis and rep:
2.00 / 22.21 / 97%; + dis: 1.84 / 22.04 / 98%; + rep: 1.73 / 21.61 / 98%; + dis + rep: 1.66 /
21.62 / 98%. Factorizing gains 1.65 dB at the same total; the two terms buy rFID, not PSNR. A
toy run on six photos measures the same quantities but cannot be expected to reproduce
ImageNet-scale gaps; it shows whether the ordering holds here.

Usage:
  python benchmarks/ablation.py [--codes=2048] [--workdir=/tmp/ablation] [--variants=...]
                                [--preset=smoke] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from quickstart_runs import REPO, train

VARIANTS = {
    "vqgan": ("configs/vqgan.py", 1, []),
    "fqgan": ("configs/dual.py", 2, ["loss.disentangle_weight=0.0", "loss.semantic_weight=0.0"]),
    "fqgan+dis": ("configs/dual.py", 2, ["loss.semantic_weight=0.0"]),
    "fqgan+dis+rep": ("configs/dual.py", 2, []),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", type=int, default=2048, help="total codes of every variant")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workdir", default="/tmp/ablation")
    parser.add_argument("--preset", default="smoke", help="preset of each config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.codes % 2 or args.codes < 4:
        parser.error(f"--codes={args.codes} must be even (two sub-codebooks of half) and >= 4")
    return args


def single_codebook_psnrs(workdir: str) -> list[float]:
    """Held-out PSNR over the whole eval set of the reconstruction from all sub-codebooks, then
    from each alone (Figure 3's rows), all from the same images."""
    import jax  # noqa: PLC0415 (the parent process imports jax only for this)

    import fqgan_jax  # noqa: PLC0415
    from fqgan_jax import data  # noqa: PLC0415
    from fqgan_jax.eval import image_metrics  # noqa: PLC0415

    tok = fqgan_jax.load_tokenizer(workdir)
    config = tok.config
    unit = lambda x: np.asarray(x, np.float32) / 255.0  # noqa: E731
    per_image = []  # [k + 1] PSNRs per eval image
    for batch in data.make_eval_batches(config.data, batch_size=config.eval.batch_size):
        images = np.asarray(batch["image"])[np.asarray(batch["mask"])]
        rows = tok.single_codebook_reconstructions(images)  # [k + 1, B, H, W, 3]
        per_image.append(np.stack([jax.device_get(image_metrics.psnr(unit(images), unit(row)))
                                   for row in rows], axis=-1))
    return np.concatenate(per_image).mean(axis=0).tolist()


def run_variant(name: str, args: argparse.Namespace) -> dict:
    config_file, num_codebooks, extra = VARIANTS[name]
    spec = f"{config_file}:{args.preset}" if args.preset else config_file
    overrides = [f"--config.{s}" for s in [f"model.codebook_size={args.codes // num_codebooks}",
                                             *extra, *args.set]]
    workdir = os.path.join(args.workdir, name)
    evals, minutes = train(spec, overrides, workdir)
    final = evals[max(evals)]
    return {"variant": name, "codebooks": f"{num_codebooks} x {args.codes // num_codebooks}",
            "psnr": final["psnr"], "ssim": final["ssim"], "usage": final["usage"],
            "single": single_codebook_psnrs(workdir)[1:] if num_codebooks > 1 else [],
            "step": max(evals), "minutes": minutes}


def format_table(rows: list[dict]) -> str:
    lines = ["| variant | codes | PSNR | SSIM | usage | PSNR from one sub-codebook | minutes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        single = ", ".join(f"{p:.2f}" for p in r["single"]) or "—"
        usage = ", ".join(f"{u:.1%}" for u in r["usage"])
        lines.append(f"| {r['variant']} | {r['codebooks']} | {r['psnr']:.2f} | {r['ssim']:.3f} "
                     f"| {usage} | {single} | {r['minutes']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(name, args))
        print(format_table(rows[-1:]).split("\n")[-1], flush=True)
    print(format_table(rows))
    print(f"(final eval at step {rows[-1]['step']}; repository {REPO})")
    return rows


if __name__ == "__main__":
    main()
