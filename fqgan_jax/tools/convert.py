"""Converts official PyTorch weights into fqgan_jax weights files (the .npz format of
fqgan_jax.frozen.weights), and official tokenizer checkpoints into fqgan_jax workdirs and back.

    python -m fqgan_jax.tools.convert lpips --vgg16=vgg16-397923af.pth [--lin=vgg.pth] [--out=PATH]
    python -m fqgan_jax.tools.convert inception --pth=pt_inception-2015-12-05-6726825d.pth \
        [--out=PATH]
    python -m fqgan_jax.tools.convert official --ckpt=fqgan_dual_ds16.pt \
        --config=configs/dual.py --workdir=DIR [--use_ema] [--config.KEY=VALUE ...]
    python -m fqgan_jax.tools.convert export --workdir=DIR --out=model.pt [--step=N]

`lpips`: LPIPS-VGG16. --vgg16 is torchvision's ImageNet VGG16 state dict
(https://download.pytorch.org/models/vgg16-397923af.pth), or an `lpips.LPIPS(net='vgg')`
module's full state dict, which also holds the heads. --lin defaults to the heads file shipped
inside the installed `lpips` package (weights/v0.1/vgg.pth). --out defaults to where training
looks: $FQGAN_JAX_WEIGHTS_DIR/lpips_vgg16.npz, else ~/.cache/fqgan_jax/lpips_vgg16.npz.

`inception`: the FID InceptionV3 (TF's inception-2015-12-05 graph). --pth is pytorch-fid's port
of it (https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/
pt_inception-2015-12-05-6726825d.pth), not torchvision's ImageNet inception_v3, which the
converter recognises and refuses. --out defaults to fid_inception_v3.npz in the same directory.

`official`: an official FQGAN (Dual, Triple; ds16, ds8) or LlamaGen VQ tokenizer checkpoint into
a new workdir that `load_tokenizer`, `--mode=eval` and `--mode=train` read (step 0). --config
(with `--config.KEY=VALUE` overrides, as fqgan_jax.main takes them) must describe the file's
architecture; a mismatch is refused with the fix. `export`: a workdir's checkpoint (default: the
latest) as an official checkpoint. Both are fqgan_jax/tools/official.py, whose docstring has the
details.

Only these conversions need torch; training and evaluation read the .npz and workdirs alone. The
CLIP and DINOv2 teachers need no conversion: they load from Hugging Face snapshots
(fqgan_jax/frozen/teachers.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from fqgan_jax import checkpointing, config_lib
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


def load_config(spec: str, overrides: list[str]):
    """The config of `--config=spec` with its `--config.KEY=VALUE` overrides, parsed exactly as
    fqgan_jax.main parses them (ml_collections' config flag)."""
    argv = ["convert", f"--config={spec}", *overrides]
    config_lib.check_overrides(argv)  # an unknown key fails with close matches
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file[:preset].", flag_values=values,
                                    lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except flags.Error as error:
        raise config_lib.ConfigError(f"--config: {error}") from error
    return values.config


def import_official(args: argparse.Namespace) -> None:
    from fqgan_jax.tools import official  # noqa: PLC0415 (builds the train state: heavy imports)

    config = load_config(args.config, args.overrides)
    imported = official.import_checkpoint(args.ckpt, config, args.workdir, use_ema=args.use_ema,
                                          config_name=args.config)
    for note in imported.notes:
        print(f"note: {note}")
    flags_used = shlex.join([f"--config={args.config}", *args.overrides])
    print(f"Imported {args.ckpt} into {args.workdir}: {imported.summary()}.\n"
          f"Evaluate it: python -m fqgan_jax.main --mode=eval --workdir={args.workdir} "
          f"{flags_used}")


def export_official(args: argparse.Namespace) -> None:
    from fqgan_jax.tools import official  # noqa: PLC0415

    checkpoint, step = official.export_checkpoint(args.workdir, args.out, step=args.step)
    entries = ", ".join(f"{entry!r} ({len(state)} tensors)" for entry, state in checkpoint.items())
    print(f"Wrote {args.out}: {entries}, from step {step} of {args.workdir}.")


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
        description="Convert official PyTorch weights into fqgan_jax weights files and "
        "workdirs, and workdirs back into official tokenizer checkpoints.")
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
    _add_official_commands(commands)
    return parser


def _add_official_commands(commands) -> None:
    official_parser = commands.add_parser(
        "official", help="an official FQGAN / LlamaGen tokenizer checkpoint -> a new workdir",
        description="Extra --config.KEY=VALUE arguments override config keys.")
    official_parser.add_argument("--ckpt", required=True,
                                 help="the official .pt (e.g. fqgan_dual_ds16.pt, vq_ds16_c2i.pt)")
    official_parser.add_argument("--config", required=True,
                                 help="config file[:preset] of the same architecture")
    official_parser.add_argument("--workdir", required=True, help="a new (or empty) folder")
    official_parser.add_argument("--use_ema", action="store_true",
                                 help="import the file's 'ema' weights instead of 'model'")
    official_parser.set_defaults(run=import_official)
    export_parser = commands.add_parser(
        "export", help="a workdir's checkpoint -> an official PyTorch tokenizer checkpoint")
    export_parser.add_argument("--workdir", required=True,
                               help="a workdir, its checkpoints/ folder or one step folder")
    export_parser.add_argument("--out", required=True, help="the .pt to write")
    export_parser.add_argument("--step", type=int, default=None,
                               help="checkpoint step (default: the latest)")
    export_parser.set_defaults(run=export_official)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags; `--config.KEY=VALUE` overrides are collected for `official` only."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [arg for arg in extra if arg.startswith("--config.")]
    if len(overrides) != len(extra) or (overrides and args.command != "official"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs one conversion; returns the exit status (2 for a user error, told on stderr)."""
    args = parse_args(argv)
    try:
        args.run(args)
    except (weights.PretrainedError, checkpointing.CheckpointError,
            config_lib.ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
