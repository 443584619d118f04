"""Converts official PyTorch weights into fqgan_jax weights files (the .npz format of
fqgan_jax.frozen.weights).

    python -m fqgan_jax.tools.convert lpips --vgg16=vgg16-397923af.pth [--lin=vgg.pth] [--out=PATH]
    python -m fqgan_jax.tools.convert inception --pth=pt_inception-2015-12-05-6726825d.pth \
        [--out=PATH]

`lpips`: LPIPS-VGG16. --vgg16 is torchvision's ImageNet VGG16 state dict
(https://download.pytorch.org/models/vgg16-397923af.pth), or an `lpips.LPIPS(net='vgg')`
module's full state dict, which also holds the heads. --lin defaults to the heads file shipped
inside the installed `lpips` package (weights/v0.1/vgg.pth). --out defaults to where training
looks: $FQGAN_JAX_WEIGHTS_DIR/lpips_vgg16.npz, else ~/.cache/fqgan_jax/lpips_vgg16.npz.

`inception`: the FID InceptionV3 (TF's inception-2015-12-05 graph). --pth is pytorch-fid's port
of it (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
pt_inception-2015-12-05-6726825d.pth), not torchvision's ImageNet inception_v3, which the
converter recognises and refuses. --out defaults to fid_inception_v3.npz in the same directory.

Only this conversion needs torch; training and evaluation read the .npz alone. The CLIP and
DINOv2 teachers need no conversion: they load from Hugging Face snapshots
(fqgan_jax/frozen/teachers.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import jax
from flax import nnx

from fqgan_jax.frozen import inception, lpips, weights

EXIT_USER_ERROR = 2  # as argparse's own usage errors


def packaged_lpips_heads() -> str:
    """weights/v0.1/vgg.pth of the installed `lpips` package, found without importing it (its
    import pulls in torchvision, whose C extension may not load beside this torch)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise weights.PretrainedError(
            "--lin not given and the lpips package is not installed: pip install lpips==0.1.4, "
            "or pass --lin=PATH to its weights/v0.1/vgg.pth.")
    return os.path.join(spec.submodule_search_locations[0], "weights", "v0.1", "vgg.pth")


def convert_lpips(args: argparse.Namespace) -> None:
    vgg_state = weights.read_torch_state_dict(args.vgg16, flag="--vgg16")
    has_heads = any(key.startswith("lin") for key in vgg_state)
    if args.lin is None and has_heads:
        lin_state = vgg_state  # an lpips.LPIPS state dict: its own heads
    else:
        if args.lin is not None and has_heads:
            print(f"Using the heads of --lin={args.lin}, not those in --vgg16.")
        lin_state = weights.read_torch_state_dict(args.lin or packaged_lpips_heads(),
                                                   flag="--lin")
    params = lpips.convert_torch_state_dict(vgg_state, lin_state)
    save_weights(params, args.out or weights.default_path(lpips.WEIGHTS_FILENAME),
                 kind=lpips.WEIGHTS_KIND)


def convert_inception(args: argparse.Namespace) -> None:
    params = inception.convert_torch_state_dict(
        weights.read_torch_state_dict(args.pth, flag="--pth"), source="The --pth file")
    save_weights(params, args.out or weights.default_path(inception.WEIGHTS_FILENAME),
                 kind=inception.WEIGHTS_KIND)


def save_weights(params: nnx.State, out: str, *, kind: str) -> None:
    """Writes `params` to `out` (the --out value, or its default) and prints a summary line."""
    out = os.path.expanduser(out)
    try:
        weights.save(out, params, kind=kind)
    except OSError as error:
        raise weights.PretrainedError(f"--out: cannot write {out} ({error}).") from error
    leaves = jax.tree.leaves(nnx.to_pure_dict(params))
    print(f"Wrote {out}: {kind}, {len(leaves)} arrays, "
          f"{sum(leaf.size for leaf in leaves):,} parameters, "
          f"{os.path.getsize(out) / 2**20:.1f} MiB.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fqgan_jax.tools.convert",
        description="Convert official PyTorch weights into fqgan_jax weights files.")
    commands = parser.add_subparsers(dest="command", required=True)
    lpips_parser = commands.add_parser("lpips", help="LPIPS-VGG16 (the perceptual loss)")
    lpips_parser.add_argument("--vgg16", required=True,
                              help="torchvision vgg16-397923af.pth, or an lpips.LPIPS state dict")
    lpips_parser.add_argument("--lin", default=None,
                              help="LPIPS heads (default: the lpips package's v0.1/vgg.pth)")
    lpips_parser.add_argument("--out", default=None, help=(
        f"output .npz (default: {weights.default_path(lpips.WEIGHTS_FILENAME)})"))
    lpips_parser.set_defaults(run=convert_lpips)
    inception_parser = commands.add_parser(
        "inception", help="the FID InceptionV3 (TF's inception-2015-12-05, for FID and IS)")
    inception_parser.add_argument("--pth", required=True,
                                  help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    inception_parser.add_argument("--out", default=None, help=(
        f"output .npz (default: {weights.default_path(inception.WEIGHTS_FILENAME)})"))
    inception_parser.set_defaults(run=convert_inception)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one conversion; returns the exit status (2 for a user error, told on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except weights.PretrainedError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
