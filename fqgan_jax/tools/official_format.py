"""The official PyTorch tokenizer state-dict format (FQGAN, LlamaGen): the official families,
what a state dict says about its model, the checks against a config, and the key and layout
mapping in both directions. `official.py` reads and writes the files with it.

The architecture is read off the keys and shapes (`infer_architecture`: branches from the
quantize*/quant_conv* keys, ds16/ds8 from the encoder's levels, every width from a shape) and
compared with the config; each difference is named with its fix (the official config file and
preset for an official layout, else the --config.model overrides). Not in the shapes, so taken
from the config: adapter_heads (official: 8) and the feature heads' depth and heads (3, 8).
`codebook_used` buffers are dropped on the way in and written as zeros on the way out (see
official.py for the head and discriminator policies).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from flax import nnx

from fqgan_jax import architecture, config_lib
from fqgan_jax.frozen import teachers, weights
from fqgan_jax.frozen.weights import PretrainedError
from fqgan_jax.models import discriminator
from fqgan_jax.models.tokenizer import (
    official_feat_pred_name,
    official_head_name,
    official_key_to_path,
    official_suffix,
)

USAGE_WINDOW = 65536  # the official VectorQuantizer's `codebook_used` buffer length
CODEBOOK_PATH = ("quantize", "codebook")


@dataclasses.dataclass(frozen=True)
class Layout:
    """An official tokenizer family: its branches in decoder order, the config that builds it."""
    name: str
    branches: tuple[str, ...]
    config_file: str
    adapter_layers: int


LAYOUTS = (Layout("FQGAN-Dual", ("vis", "sem"), "configs/dual.py", 6),
           Layout("FQGAN-Triple", ("vis", "sem_mid", "sem_high"), "configs/triple.py", 6),
           Layout("LlamaGen VQ", ("vq",), "configs/vqgan.py", 0))
# The official sizes besides the branches and adapters; ch_mult by downsampling factor.
OFFICIAL_MODEL = dict(ch=128, num_res_blocks=2, z_channels=256, adapter_mlp_ratio=4.0,
                      codebook_size=16384, code_dim=8)
OFFICIAL_CH_MULT = {16: (1, 1, 2, 2, 4), 8: (1, 2, 2, 4)}
PRESETS = {16: "", 8: ":ds8"}


def layout_of(branches) -> Layout | None:
    """The official family with these branches (in any order), if any."""
    return next((layout for layout in LAYOUTS if set(layout.branches) == set(branches)), None)


def describe_branches(branches) -> str:
    """"FQGAN-Dual (vis, sem)", "LlamaGen VQ (1 codebook)", or "3-codebook (a, b, c)"."""
    layout = layout_of(branches)
    if layout is not None and layout.branches == tuple(branches):
        return (f"{layout.name} (1 codebook)" if len(branches) == 1
                else f"{layout.name} ({', '.join(branches)})")
    return f"{len(branches)}-codebook ({', '.join(branches)})"


# ------------------------------------------------------------------------------------------------
# What a state dict says about its model.


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The architecture a tokenizer state dict's keys and shapes imply."""
    model: dict  # config.model fields: branches, ch, ch_mult, num_res_blocks, z_channels,
    # adapter_layers, adapter_mlp_ratio (only with adapters), codebook_size, code_dim
    image_size: int | None  # from the adapters' positional tables; None without adapters
    head_widths: dict  # {branch: width of its feature-prediction head}

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.model["ch_mult"]) - 1)

    def official_config(self) -> str | None:
        """"configs/dual.py:ds8" when this is exactly an official layout, else None."""
        layout = layout_of(self.model["branches"])
        expected = dict(OFFICIAL_MODEL, branches=layout.branches if layout else None,
                        adapter_layers=layout.adapter_layers if layout else None,
                        ch_mult=OFFICIAL_CH_MULT.get(self.downsample))
        if layout is None or any(self.model.get(key, value) != value
                                 for key, value in expected.items()):
            return None
        if self.image_size not in (None, 256):
            return None
        return layout.config_file + PRESETS[self.downsample]

    def describe(self) -> str:
        return f"{describe_branches(self.model['branches'])} ds{self.downsample}"


def _shape(state: dict, key: str) -> tuple:
    if key not in state:
        raise PretrainedError(f"The state dict has no {key}, which every FQGAN and LlamaGen "
                              "tokenizer has: is it a tokenizer checkpoint?")
    return tuple(np.shape(state[key]))


def _indices(state: dict, prefix: str) -> list[int]:
    """The sorted i of every key `prefix<i>.*`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for m in map(pattern.match, state) if m})


def file_branches(state: dict) -> tuple[str, ...]:
    """Branch names from the codebooks (quantize_<b>.embedding.weight; LlamaGen's quantize.* is
    "vq"), in the official decoder order for an official family, else in the file's order."""
    found = [m.group(1) or "vq" for m in map(
        re.compile(r"quantize(?:_(\w+))?\.embedding\.weight").fullmatch, state) if m]
    if not found:
        raise PretrainedError("The state dict has no codebook (quantize*.embedding.weight): it "
                              "is not an FQGAN or LlamaGen tokenizer state dict.")
    layout = layout_of(found)
    return layout.branches if layout is not None and len(found) == len(layout.branches) \
        else tuple(found)


def infer_architecture(state: dict) -> Architecture:
    """The tokenizer architecture of an official-layout state dict, from keys and shapes."""
    branches = file_branches(state)
    shapes = {_shape(state, f"quantize{official_suffix(b)}.embedding.weight") for b in branches}
    if len(shapes) != 1:
        raise PretrainedError(f"The state dict's codebooks differ in shape ({sorted(shapes)}); "
                              "every sub-codebook must be K x d alike.")
    (codebook_size, code_dim), = shapes
    ch = _shape(state, "encoder.conv_in.weight")[0]
    levels = _indices(state, "encoder.conv_blocks.")
    model = dict(branches=branches, ch=ch, num_res_blocks=len(
        _indices(state, "encoder.conv_blocks.0.res.")), codebook_size=codebook_size,
        code_dim=code_dim, z_channels=_shape(state, "post_quant_conv.weight")[0],
        ch_mult=tuple(_shape(state, f"encoder.conv_blocks.{i}.res.0.conv2.weight")[0] // ch
                      for i in levels))
    adapter = f"encoder.{official_head_name(branches[0])}.0."
    model["adapter_layers"] = len(_indices(state, adapter + "transformer."))
    image_size = None
    if model["adapter_layers"]:
        width = _shape(state, adapter + "ln_pre.weight")[0]
        model["adapter_mlp_ratio"] = _shape(
            state, adapter + "transformer.0.mlp.c_fc.weight")[0] / width
        grid = math.isqrt(_shape(state, adapter + "positional_embedding")[0])
        image_size = grid * 2 ** (len(levels) - 1)
    heads = {b: _shape(state, f"{official_feat_pred_name(b)}.class_embedding")[-1] for b in branches
             if f"{official_feat_pred_name(b)}.class_embedding" in state}
    return Architecture(model=model, image_size=image_size, head_widths=heads)


# ------------------------------------------------------------------------------------------------
# The checks against the config, before anything is written.


def _override(key: str, value) -> str:
    """The command-line override that sets `key` to `value`, as config_flags parses it."""
    if isinstance(value, tuple):  # a tuple parses from its Python literal, quoted for the shell
        return f'--config.{key}="{value!r}"'.replace(" ", "")
    return f"--config.{key}={value}"


def _model_differences(arch: Architecture, config, config_name: str
                       ) -> list[tuple[str, str]]:
    """(what differs, the override that fixes it) for every config field the file contradicts."""
    found, wanted = arch.model, config.model
    differences = []
    if tuple(wanted.branches) != found["branches"]:
        differences.append((f"this is a {describe_branches(found['branches'])} checkpoint, but "
                            f"--config={config_name} expects "
                            f"{describe_branches(wanted.branches)}",
                            _override("model.branches", found["branches"])))
    if tuple(wanted.ch_mult) != found["ch_mult"]:
        downsample = 2 ** (len(wanted.ch_mult) - 1)
        differences.append((f"the file is ds{arch.downsample} (ch_mult {found['ch_mult']}), "
                            f"the config ds{downsample} (ch_mult {tuple(wanted.ch_mult)})",
                            _override("model.ch_mult", found["ch_mult"])))
    for key, value in found.items():
        if key not in ("branches", "ch_mult") and wanted[key] != value:
            differences.append((f"config.model.{key} is {wanted[key]!r}, the file has {value!r}",
                                _override(f"model.{key}", value)))
    if arch.image_size is not None and config.data.image_size != arch.image_size:
        differences.append(
            (f"the file's adapters are sized for {arch.image_size} px images, the config for "
             f"{config.data.image_size} (config.data.image_size)",
             _override("data.image_size", arch.image_size)))
    return differences


def check_architecture(arch: Architecture, config, *, config_name: str = "the config") -> None:
    """Raises a PretrainedError naming every difference between the file and the config's
    tokenizer, and the fix: the official config (and preset) for an official layout, else the
    overrides."""
    differences = _model_differences(arch, config, config_name)
    if not differences:
        return
    official = arch.official_config()
    if official is not None:
        fix = (f"use --config={official}, without --config.model overrides (the file has the "
               f"official {arch.describe()} layout)")
    else:
        fix = "add " + " ".join(override for _, override in differences)
    raise PretrainedError(
        f"The checkpoint ({arch.describe()}) does not fit --config={config_name}:\n  - "
        + "\n  - ".join(what for what, _ in differences) + f"\nFix: {fix}.")


def _kinds_of_width(width: int) -> str:
    kinds = [name for name, kind in teachers.KINDS.items() if kind.width == width]
    return " or ".join(kinds) if kinds else f"a teacher of width {width}"


def plan_heads(arch: Architecture, config) -> tuple[list[str], list[str], list[str]]:
    """(branches whose heads are imported, notes, problems) for the feature-prediction heads:
    the policy of the module docstring."""
    taught = config_lib.taught_branches(config)
    keep, notes, problems = [], [], []
    for branch, width in arch.head_widths.items():
        if branch not in taught:
            notes.append(
                f"Dropped the feature-prediction head of {branch!r} "
                f"({official_feat_pred_name(branch)}.*, width {width}): the config trains no head "
                f"for it (loss.semantic_weight={config.loss.semantic_weight}, teachers: "
                f"{sorted(config.teachers.keys()) or 'none'}). The tokenizer never uses it; to "
                "keep it, use a config that teaches that branch.")
        elif teachers.kind(taught[branch]).width != width:
            problems.append(
                f"the file's {branch!r} feature-prediction head has width {width}, but the "
                f"config's teacher {taught[branch]} has width {teachers.kind(taught[branch]).width}"
                f"; set --config.teachers.{branch}.kind={_kinds_of_width(width)}")
        else:
            keep.append(branch)
    for branch in taught:
        if branch not in arch.head_widths:
            problems.append(
                f"the config trains a feature-prediction head for {branch!r} (teacher "
                f"{taught[branch]}), but the file has none "
                f"({official_feat_pred_name(branch)}.*); train without representation learning "
                "(--config.loss.semantic_weight=0), or import a checkpoint that has the head")
    return keep, notes, problems


# ------------------------------------------------------------------------------------------------
# Official state dict -> our variables.


def without_unused(state: dict, branches, dropped_heads) -> dict:
    """The state dict less codebook_used buffers and the heads the config does not train."""
    prefixes = tuple(f"{official_feat_pred_name(b)}." for b in dropped_heads)
    return {key: value for key, value in state.items()
            if not re.fullmatch(r"quantize(_\w+)?\.codebook_used", key)
            and not (prefixes and key.startswith(prefixes))}


def _codebook_key(branches) -> str:
    """The name of the k stacked codebooks in messages: their k official keys."""
    return "+".join(f"quantize{official_suffix(b)}.embedding.weight" for b in branches)


def tokenizer_params(state: dict, config, *, source: str = "The state dict") -> nnx.State:
    """The config's tokenizer params (float32 nnx.State) from an official-layout state dict that
    `check_architecture` accepted: the k codebooks [K, d] stacked into quantize.codebook
    [k, K, d], kernels transposed. Every key must fill exactly one parameter (PretrainedError
    naming the missing, unexpected and wrong-shape keys)."""
    branches = tuple(config.model.branches)
    abstract, _ = architecture.abstract_model_variables(config)
    tables = [f"quantize{official_suffix(b)}.embedding.weight" for b in branches]
    state = dict(state)
    if all(table in state for table in tables):
        state[_codebook_key(branches)] = np.stack([state.pop(table) for table in tables])

    def key_to_path(key):
        if key == _codebook_key(branches):
            return CODEBOOK_PATH
        path, index = official_key_to_path(key, branches)
        # A codebook whose siblings are missing is skipped: the stacked one is reported missing.
        return path if index is None else None

    def path_to_key(path):
        return _codebook_key(branches) if path == CODEBOOK_PATH \
            else path_to_official_key(path, branches)

    return weights.fill_params(
        state, abstract, key_to_path=key_to_path, path_to_key=path_to_key,
        what=f"tokenizer of the config ({describe_branches(branches)})", source=source,
        hint="Was the file written by another version of the model code?")


def discriminator_architecture(state: dict) -> dict:
    """{"ndf", "n_layers"} of a PatchGAN state dict (its BatchNorms count the layers)."""
    return {"ndf": _shape(state, "main.0.weight")[0],
            "n_layers": len([key for key in state if key.endswith(".running_mean")])}


def discriminator_variables(state: dict, config, *, source: str = "The discriminator"
                            ) -> tuple[nnx.State, nnx.State]:
    """(params, batch_stats) of the config's PatchGAN from an official state dict."""
    abstract = nnx.state(nnx.eval_shape(
        lambda: architecture.create_discriminator(config, nnx.Rngs(0))))
    filled = weights.fill_params(
        state, abstract, key_to_path=discriminator.official_key_to_path,
        path_to_key=_discriminator_key, what="PatchGAN discriminator of the config",
        source=source)
    return nnx.split_state(filled, nnx.Param, nnx.BatchStat)


# ------------------------------------------------------------------------------------------------
# Our variables -> official state dict.


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def path_to_official_key(path: tuple, branches) -> str:
    """Our tokenizer parameter path -> its official key; the inverse of official_key_to_path
    (the codebook, one path for k keys, is the caller's)."""
    *modules, leaf = [str(part) for part in path]
    if modules[-1:] == ["in_proj"]:  # torch MHA's fused in_proj_weight / in_proj_bias
        modules, leaf = modules[:-1], "in_proj_" + _TORCH_LEAF[leaf]
    else:
        leaf = _TORCH_LEAF.get(leaf, leaf)
    if modules[0] == "branches":
        branch, part, rest = modules[1], modules[2], modules[3:]
        if part == "adapter":
            modules = ["encoder", official_head_name(branch), "0", *rest]
        elif part == "quant_conv":
            modules = [part + official_suffix(branch), *rest]
        else:  # norm_out, conv_out
            modules = ["encoder", part + official_suffix(branch), *rest]
    elif modules[0] == "feat_pred_heads":
        modules = [official_feat_pred_name(modules[1]), *modules[2:]]
    return ".".join([*modules, leaf])


def _discriminator_key(path: tuple) -> str:
    return f"main.{path[1]}.{_TORCH_LEAF[path[-1]]}"


def flax_to_torch(path: tuple, array) -> np.ndarray:
    """The inverse of weights.torch_to_flax: Dense [in, out] -> [out, in], HWIO -> OIHW."""
    array = np.asarray(jax.device_get(array))
    if path[-1] == "kernel" and array.ndim == 2:
        array = array.T
    elif path[-1] == "kernel" and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
    return np.ascontiguousarray(array)


def usage_buffer(codebook_size: int) -> np.ndarray:
    """The official `codebook_used` buffer, zeroed: float32 [65536] (FVQ: [K + 1] once K is at
    least that), as the module registers it."""
    length = USAGE_WINDOW if codebook_size < USAGE_WINDOW else codebook_size + 1
    return np.zeros((length,), np.float32)


def tokenizer_state_dict(params: nnx.State, branches) -> dict[str, np.ndarray]:
    """The official state dict of our tokenizer params, codebook_used buffers zeroed."""
    state = {}
    for path, leaf in nnx.to_flat_state(params):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        if path == CODEBOOK_PATH:
            codebooks = np.asarray(jax.device_get(value))
            for branch, table in zip(branches, codebooks):
                prefix = f"quantize{official_suffix(branch)}"
                state[f"{prefix}.codebook_used"] = usage_buffer(table.shape[0])
                state[f"{prefix}.embedding.weight"] = table
        else:
            state[path_to_official_key(path, branches)] = flax_to_torch(path, value)
    return state


def discriminator_state_dict(params: nnx.State, batch_stats: nnx.State) -> dict[str, np.ndarray]:
    """The official PatchGAN state dict; num_batches_tracked (never read) is written as 0."""
    state = {}
    for variables in (params, batch_stats):
        for path, leaf in nnx.to_flat_state(variables):
            value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            state[_discriminator_key(path)] = flax_to_torch(path, value)
            if path[-1] == "mean":
                state[f"main.{path[1]}.num_batches_tracked"] = np.zeros((), np.int64)
    return state
