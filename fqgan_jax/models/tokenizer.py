"""The factorized tokenizer: shared trunk -> k branch heads -> k sub-codebooks -> one decoder.

Dataflow (spec fqgan.md §1.1): images [B, H, W, 3] -> `encoder` trunk -> for each branch b, in
the order of `branches`: `branches[b]` head -> latent [B, h, w, d]; the k latents are stacked to
[B, h, w, k, d] and quantized by the quantizer `config.model.quantizer` names (by default one
`FactorizedQuantizer`: codebook [k, K, d], sub-code i uses codebook i only) -> codes
concatenated in branch order to [B, h, w, k*d] -> `post_quant_conv` -> `decoder`. ("vis",
"sem") is FQGAN-Dual, ("vis", "sem_mid", "sem_high") FQGAN-Triple, and ("vq",) with
`adapter_layers=0` is exactly LlamaGen's VQGAN.

`official_key_to_path` is the rename table from the official PyTorch state_dicts (spec §7.2,
`official_keys_tokenizer.tsv`) to this module's parameter paths.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fqgan_jax import sharding
from fqgan_jax.models.decoder import Decoder
from fqgan_jax.models.encoder import Encoder, EncoderBranch
from fqgan_jax.models.feat_pred_head import FeatPredHead
from fqgan_jax.models.layers import conv2d
from fqgan_jax.quantizers import FactorizedQuantizer, QuantizerOutput, registry


class Tokenizer(nnx.Module):
    """FQGAN-Dual/Triple or LlamaGen VQGAN, depending on `branches` and `adapter_layers`."""

    def __init__(self, *, image_size: int, branches: Sequence[str], ch: int,
                 ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float,
                 adapter_layers: int, adapter_heads: int, adapter_mlp_ratio: float,
                 codebook_size: int, code_dim: int, l2_normalize: bool,
                 entropy_temperature: float, search_memory_mb: int, dtype, rngs: nnx.Rngs,
                 teacher_widths: Mapping[str, int] | None = None, shard_codebook: bool = False,
                 remat: bool = False, quantizer: ml_collections.ConfigDict | None = None):
        dtype = jnp.dtype(dtype)
        self.branch_names = tuple(branches)
        self.code_dim = code_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               dropout=dropout, dtype=dtype, rngs=rngs, remat=remat)
        # Branches are looked up by name; iteration order always comes from `branch_names`.
        self.branches = nnx.Dict({
            name: EncoderBranch(width=self.encoder.out_channels,
                                grid_size=self.latent_size(image_size), z_channels=z_channels,
                                code_dim=code_dim, adapter_layers=adapter_layers,
                                adapter_heads=adapter_heads, adapter_mlp_ratio=adapter_mlp_ratio,
                                dtype=dtype, rngs=rngs)
            for name in self.branch_names})
        shard_axis = sharding.FSDP_AXIS if shard_codebook else None
        if quantizer is None:  # FQGAN's factorized VQ from the keyword sizes
            self.quantize = FactorizedQuantizer(
                num_codebooks=len(self.branch_names), codebook_size=codebook_size,
                code_dim=code_dim, l2_normalize=l2_normalize,
                entropy_temperature=entropy_temperature,
                memory_budget_bytes=int(search_memory_mb * 2**20), shard_axis=shard_axis,
                rngs=rngs)
        else:  # a `config.model` naming any quantizer of quantizers/registry.py
            self.quantize = registry.build_quantizer(quantizer, num_codebooks=len(
                self.branch_names), shard_axis=shard_axis, rngs=rngs)
        self.post_quant_conv = conv2d(len(self.branch_names) * code_dim, z_channels, 1,
                                      dtype=dtype, rngs=rngs)
        self.decoder = Decoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               z_channels=z_channels, dropout=dropout, dtype=dtype, rngs=rngs,
                               remat=remat)
        # Training-only heads of representation learning (spec §3.2), one per taught branch,
        # sized by its teacher's width; None when no branch has a teacher.
        unknown = set(teacher_widths or ()) - set(self.branch_names)
        if unknown:
            raise ValueError(f"Teachers for {sorted(unknown)}, which are not branches of "
                             f"{self.branch_names}.")
        self.feat_pred_heads = nnx.Dict({
            name: FeatPredHead(code_dim=code_dim, width=teacher_widths[name],
                               grid_size=self.latent_size(image_size), dtype=dtype, rngs=rngs)
            for name in self.branch_names if name in teacher_widths}) if teacher_widths else None

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict, *, image_size: int,
                    rngs: nnx.Rngs, teacher_widths: Mapping[str, int] | None = None
                    ) -> "Tokenizer":
        """Builds from `config.model` (fqgan_jax/config_lib.py); image_size sizes the adapters,
        `teacher_widths` ({branch: width}) the feature-prediction heads."""
        c = model_config
        return cls(image_size=image_size, branches=tuple(c.branches), ch=c.ch,
                   ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                   z_channels=c.z_channels, dropout=c.dropout, adapter_layers=c.adapter_layers,
                   adapter_heads=c.adapter_heads, adapter_mlp_ratio=c.adapter_mlp_ratio,
                   codebook_size=c.codebook_size, code_dim=c.code_dim,
                   l2_normalize=c.l2_normalize, entropy_temperature=c.entropy_temperature,
                   search_memory_mb=c.search_memory_mb, dtype=c.dtype, rngs=rngs,
                   teacher_widths=teacher_widths, shard_codebook=c.shard_codebook,
                   remat=c.remat, quantizer=c)

    @property
    def num_codebooks(self) -> int:
        return len(self.branch_names)

    def latent_size(self, image_size: int) -> int:
        """Side of the (square) token grid for a square image of side `image_size`."""
        return image_size // self.downsample_factor

    def encode_latents(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Images [B, H, W, 3] -> pre-quantization latents [B, h, w, k, d], float32."""
        features = self.encoder(images, rngs)
        return jnp.stack([self.branches[name](features) for name in self.branch_names], axis=-2)

    def encode(self, images: jax.Array, *, with_entropy: bool = False,
               rngs: nnx.Rngs | None = None) -> QuantizerOutput:
        """Images -> quantizer output; `indices` is int32 [B, h, w, k]."""
        latents = self.encode_latents(images, rngs=rngs)
        return self.quantize(latents, with_entropy=with_entropy)

    def decode_codes(self, codes: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Codes [B, h, w, k, d] -> images [B, H, W, 3], float32."""
        return self.decoder(self._decoder_input(codes), rngs)

    def decode_features(self, codes: jax.Array, *,
                        rngs: nnx.Rngs | None = None) -> jax.Array:
        """Codes -> the input of `decoder.conv_out`; `decoder.conv_out` of it is the image."""
        return self.decoder.features(self._decoder_input(codes), rngs)

    def _decoder_input(self, codes: jax.Array) -> jax.Array:
        # Concatenation in branch order, as torch.cat([vis, sem, ...], dim=1) (spec §1.1).
        stacked = codes.reshape(*codes.shape[:-2], codes.shape[-2] * codes.shape[-1])
        return self.post_quant_conv(stacked)

    def predict_teacher_features(self, codes: jax.Array) -> dict[str, jax.Array]:
        """Codes [B, h, w, k, d] -> {taught branch: predicted teacher CLS [B, W]}, each head
        reading its own branch's sub-codes (straight-through, so the loss reaches the branch)."""
        if self.feat_pred_heads is None:
            return {}
        return {name: self.feat_pred_heads[name](codes[..., index, :])
                for index, name in enumerate(self.branch_names) if name in self.feat_pred_heads}

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Indices int [B, h, w, k] -> images [B, H, W, 3], float32."""
        return self.decode_codes(self.quantize.lookup(indices))

    def __call__(self, images: jax.Array, *, with_entropy: bool = False,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, QuantizerOutput]:
        """Images in [-1, 1] -> (reconstruction float32 [B, H, W, 3], quantizer output).

        `rngs` (with a 'dropout' stream) turns on ResnetBlock dropout when the model was built
        with dropout > 0; without it the forward pass is deterministic (evaluation).
        """
        quantized = self.encode(images, with_entropy=with_entropy, rngs=rngs)
        return self.decode_codes(quantized.quantized, rngs=rngs), quantized


# ------------------------------------------------------------------------------------------------
# Official state_dict names (spec fqgan.md §7.2) -> our parameter paths.
#
#   official (torch)                                  ours (nnx path)
#   encoder.conv_in / conv_blocks.i.res.j / .attn.j   encoder.conv_in / conv_blocks[i].res[j] ...
#   encoder.conv_blocks.i.downsample.conv, mid.0-2    same
#   encoder.<head>.0.*                                branches[b].adapter.*
#       .attn.in_proj_weight / in_proj_bias           .attn.in_proj.kernel / .bias
#   encoder.norm_out<sfx>, encoder.conv_out<sfx>      branches[b].norm_out, branches[b].conv_out
#   quant_conv<sfx>                                   branches[b].quant_conv
#   quantize<sfx>.embedding.weight [K, d]             quantize.codebook[i] (stacked [k, K, d])
#   post_quant_conv, decoder.*                        same
#   <fp>.upscale / .transformer / .ln_pre ...         feat_pred_heads[b].* (same names)
#   <norm>.weight / other .weight                     .scale / .kernel
# with <head> = visual_head (vis), semantic_head<rest> (sem<rest>), <b>_head otherwise, and
# <sfx> = "_<b>", except "" for LlamaGen's single branch "vq", and <fp> = feat_pred_head (sem),
# <x>_sem_feat_pred (sem_<x>: Triple's mid_/high_sem_feat_pred), <b>_feat_pred otherwise.
# Layouts still need converting: conv OIHW -> HWIO, Linear (out, in) -> (in, out);
# `codebook_used` buffers are dropped.


def official_head_name(branch: str) -> str:
    if branch == "vis":
        return "visual_head"
    if branch.startswith("sem"):
        return "semantic_head" + branch[len("sem"):]
    return f"{branch}_head"


def official_feat_pred_name(branch: str) -> str:
    if branch == "sem":
        return "feat_pred_head"
    if branch.startswith("sem_"):
        return branch[len("sem_"):] + "_sem_feat_pred"
    return f"{branch}_feat_pred"


def official_suffix(branch: str) -> str:
    return "" if branch == "vq" else f"_{branch}"


def _rename_leaf(parts: list[str]) -> list[str]:
    """Torch leaf names -> Flax ones: in_proj_* split off, norm weight = scale, else kernel."""
    *modules, leaf = parts
    if leaf in ("in_proj_weight", "in_proj_bias"):
        return modules + ["in_proj", "kernel" if leaf.endswith("weight") else "bias"]
    if leaf == "weight":
        is_norm = modules[-1].startswith(("norm", "ln_"))
        return modules + ["scale" if is_norm else "kernel"]
    return parts


def official_key_to_path(official_key: str,
                         branches: Sequence[str]) -> tuple[tuple, int | None]:
    """Maps one official state_dict key to (our param path, branch index or None).

    The branch index is set only for a codebook, whose k official tables are stacked into our
    one `quantize.codebook` [k, K, d]: the key fills row `index` of it. The feature-prediction
    heads map to `feat_pred_heads[b]`, which a model built without teachers lacks, so a
    converter should reject any path that `nnx.state(model)` does not contain.
    """
    for index, branch in enumerate(branches):
        sfx = re.escape(official_suffix(branch))
        if re.fullmatch(rf"quantize{sfx}\.embedding\.weight", official_key):
            return ("quantize", "codebook"), index
        rules = (
            (rf"encoder\.{re.escape(official_head_name(branch))}\.0\.(.+)",
             f"branches.{branch}.adapter."),
            (rf"encoder\.(norm_out|conv_out){sfx}\.(.+)", rf"branches.{branch}.\1."),
            (rf"(quant_conv){sfx}\.(.+)", rf"branches.{branch}.\1."),
            (rf"{re.escape(official_feat_pred_name(branch))}\.(.+)", f"feat_pred_heads.{branch}."),
        )
        for pattern, prefix in rules:
            match = re.fullmatch(pattern, official_key)
            if match:
                rest = match.expand(prefix) + match.groups()[-1]
                return _to_path(rest.split(".")), None
    return _to_path(official_key.split(".")), None


def _to_path(parts: list[str]) -> tuple:
    """Digit components become list indices, as in nnx.List paths."""
    parts = _rename_leaf(parts)
    return tuple(int(part) if part.isdigit() else part for part in parts)
