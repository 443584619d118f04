"""A plain PyTorch FQGAN tokenizer and its generator train step: the speed reference that the
JAX step (fqgan_jax/training/train_step.py) is measured against, side by side.

Written from spec fqgan.md §1-2, §4 and the JAX modules it mirrors (fqgan_jax/models,
fqgan_jax/quantizers, fqgan_jax/objectives/losses.py), not from the official code. NCHW, stock
torch ops. Parameter names are the official state-dict names (spec §7.2), so the project's
export (`fqgan_jax.tools.official_format.tokenizer_state_dict`) loads into it strictly; the
feature-prediction heads are not built (they only serve the teachers' loss, which the benchmark
turns off), so `load_official_state_dict` drops their keys.

The step is the generator phase without GAN, LPIPS or teachers: L2 (or L1) + codebook +
commitment + entropy + disentanglement, then global-norm clipping, Adam(W), the non-finite skip
and the EMA when the config keeps one. `build(config)` refuses a config whose JAX step would do
more (LPIPS, teachers); the GAN is the caller's to keep off (a step before gan.start).

Not imported by the package: it needs torch, which training never does. It takes the
official names from fqgan_jax.models.tokenizer, so they are written once.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fqgan_jax.models.tokenizer import official_head_name, official_suffix
from fqgan_jax.quantizers.factorized_vq import FactorizedQuantizer
from fqgan_jax.tools.official_format import usage_buffer

NUM_GROUPS = 32  # GroupNorm(32, eps 1e-6) everywhere in the CNN (spec §1.2)
GROUP_NORM_EPS = 1e-6
AVG_ENTROPY_EPS = 1e-5  # LlamaGen's log(avg_p + 1e-5) (spec §1.4)
# Keys of the official feature-prediction heads (feat_pred_head, <x>_sem_feat_pred,
# <b>_feat_pred): training-only teacher heads that this model does not build.
_FEAT_PRED_KEY = re.compile(r"(feat_pred_head|\w+_feat_pred)\.")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NUM_GROUPS, channels, eps=GROUP_NORM_EPS)


# ------------------------------------------------------------------------------------------------
# The CNN blocks (spec §1.2, §1.5).


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus the residual."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # The 1x1 shortcut exists only where the width changes, as in the official state dict.
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """GN -> 1x1 q, k, v -> single-head attention over H*W (scale c^-0.5) -> proj_out, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(conv):  # [B, C, H, W] -> [B, H*W, C]
            return conv(h).flatten(2).transpose(1, 2)

        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        return x + self.proj_out(out.transpose(1, 2).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    """Pad right/bottom by one zero, then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels: int, dropout: float) -> nn.Sequential:
    """`mid.0-2` = ResnetBlock -> AttnBlock -> ResnetBlock."""
    return nn.Sequential(ResnetBlock(channels, channels, dropout), AttnBlock(channels),
                         ResnetBlock(channels, channels, dropout))


class ResolutionLevel(nn.Module):
    """`res[j]` (each followed by `attn[j]` at the lowest resolution), then the resampling conv
    under its official name (`downsample` or `upsample`)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_res_blocks: int,
                 with_attention: bool, resample: type | None, dropout: float):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_res_blocks
        self.res = nn.ModuleList(ResnetBlock(widths[j], widths[j + 1], dropout)
                                 for j in range(num_res_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels)
                                  for _ in range(num_res_blocks if with_attention else 0))
        self.resample_name = resample.__name__.lower() if resample else None
        if resample:
            self.add_module(self.resample_name, resample(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


# ------------------------------------------------------------------------------------------------
# The FactorizedAdapter (spec §1.3).


class ResidualAttentionBlock(nn.Module):
    """Pre-LN: x + MHA(ln_1(x)); x + MLP(ln_2(x)), exact GELU, LayerNorm eps 1e-5."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class FactorizedAdapter(nn.Module):
    """Transformer over the trunk's tokens; its output replaces them (no outer residual).

    The positional table is sized for the configured image size's token grid; unlike the JAX
    adapter it is not resized for other grids (the benchmark runs at the configured size).
    """

    def __init__(self, *, width: int, grid_size: int, num_layers: int, num_heads: int,
                 mlp_ratio: float):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(grid_size * grid_size, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Sequential(*(ResidualAttentionBlock(width, num_heads, mlp_ratio)
                                           for _ in range(num_layers)))
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2) + self.positional_embedding
        tokens = self.ln_post(self.transformer(self.ln_pre(tokens)))
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


# ------------------------------------------------------------------------------------------------
# Encoder (shared trunk + per-branch heads) and decoder.


class Encoder(nn.Module):
    """conv_in -> conv_blocks -> mid (the shared trunk), then per branch b:
    [<head>.0 adapter] -> norm_out<sfx> -> swish -> conv_out<sfx> (its quant_conv is the
    tokenizer's, as in the official state dict)."""

    def __init__(self, m, image_size: int):
        super().__init__()
        num_levels = len(m.ch_mult)
        level_in = [m.ch * mult for mult in (1,) + tuple(m.ch_mult[:-1])]
        self.conv_in = nn.Conv2d(3, m.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            ResolutionLevel(level_in[i], m.ch * m.ch_mult[i], num_res_blocks=m.num_res_blocks,
                            with_attention=i == num_levels - 1,
                            resample=Downsample if i != num_levels - 1 else None,
                            dropout=m.dropout)
            for i in range(num_levels))
        width = m.ch * m.ch_mult[-1]
        self.mid = mid_block(width, m.dropout)
        self.branch_names = tuple(m.branches)
        self.has_adapter = m.adapter_layers > 0
        grid_size = image_size // 2 ** (num_levels - 1)
        for branch in self.branch_names:
            if self.has_adapter:
                self.add_module(official_head_name(branch), nn.Sequential(FactorizedAdapter(
                    width=width, grid_size=grid_size, num_layers=m.adapter_layers,
                    num_heads=m.adapter_heads, mlp_ratio=m.adapter_mlp_ratio)))
            self.add_module("norm_out" + official_suffix(branch), group_norm(width))
            self.add_module("conv_out" + official_suffix(branch),
                            nn.Conv2d(width, m.z_channels, 3, padding=1))

    def branch(self, features: torch.Tensor, branch: str) -> torch.Tensor:
        h = getattr(self, official_head_name(branch))(features) if self.has_adapter else features
        suffix = official_suffix(branch)
        return getattr(self, "conv_out" + suffix)(F.silu(getattr(self, "norm_out" + suffix)(h)))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images [B, 3, H, W] -> one [B, z_channels, h, w] map per branch, in branch order."""
        h = self.conv_in(images)
        for level in self.conv_blocks:
            h = level(h)
        features = self.mid(h)
        return [self.branch(features, branch) for branch in self.branch_names]


class Decoder(nn.Module):
    """conv_in -> mid -> conv_blocks from the lowest resolution up (num_res_blocks + 1 blocks,
    attention at the lowest only, upsample except after the last) -> norm_out -> swish ->
    conv_out."""

    def __init__(self, m):
        super().__init__()
        num_levels = len(m.ch_mult)
        widths = [m.ch * m.ch_mult[num_levels - 1 - i] for i in range(num_levels)]
        self.conv_in = nn.Conv2d(m.z_channels, widths[0], 3, padding=1)
        self.mid = mid_block(widths[0], m.dropout)
        level_in = [widths[0]] + widths[:-1]
        self.conv_blocks = nn.ModuleList(
            ResolutionLevel(level_in[i], widths[i], num_res_blocks=m.num_res_blocks + 1,
                            with_attention=i == 0,
                            resample=Upsample if i != num_levels - 1 else None,
                            dropout=m.dropout)
            for i in range(num_levels))
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------
# The quantizer (spec §1.4): one VectorQuantizer per branch.


def entropy_loss(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-row entropy of softmax(-d / T) minus the entropy of its batch average
    (log(p + 1e-5)), from squared distances [N, K]; as the JAX `_entropy_loss_direct`."""
    log_probs = F.log_softmax(-distances / temperature, dim=-1)
    probs = log_probs.exp()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    avg_probs = probs.mean(0)
    avg_entropy = -(avg_probs * torch.log(avg_probs + AVG_ENTROPY_EPS)).sum()
    return sample_entropy - avg_entropy


class QuantizerOutput(NamedTuple):
    codes: torch.Tensor  # [N, d] straight-through codes (value q, gradient to z)
    indices: torch.Tensor  # int64 [N]
    losses: dict[str, torch.Tensor]  # unweighted "codebook", "commitment", "entropy"


class VectorQuantizer(nn.Module):
    """One sub-codebook: l2-normalized z and rows, nearest row by matmul + argmin, no EMA."""

    def __init__(self, codebook_size: int, code_dim: int, *, l2_normalize: bool,
                 entropy_temperature: float):
        super().__init__()
        self.l2_normalize = l2_normalize
        self.entropy_temperature = entropy_temperature
        self.embedding = nn.Embedding(codebook_size, code_dim)
        with torch.no_grad():  # uniform(-1/K, 1/K), then unit rows
            self.embedding.weight.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
            if l2_normalize:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # In the official state dict; never read or updated by the step (nor by the JAX one).
        self.register_buffer("codebook_used", torch.from_numpy(usage_buffer(codebook_size)))

    def forward(self, z: torch.Tensor, with_entropy: bool) -> QuantizerOutput:
        """z [N, d] float32 -> codes, indices and the losses (entropy 0 unless asked)."""
        codebook = self.embedding.weight
        if self.l2_normalize:  # rows re-normalized at use: trained rows drift off the sphere
            z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
        distances = (z.square().sum(-1, keepdim=True) + codebook.square().sum(-1)
                     - 2.0 * z @ codebook.T)
        indices = distances.detach().argmin(-1)
        quantized = F.embedding(indices, codebook)
        losses = {
            "codebook": F.mse_loss(quantized, z.detach()),
            "commitment": F.mse_loss(quantized.detach(), z),
            "entropy": (entropy_loss(distances, self.entropy_temperature) if with_entropy
                        else z.new_zeros(())),
        }
        return QuantizerOutput(z + (quantized - z).detach(), indices, losses)


# ------------------------------------------------------------------------------------------------
# The tokenizer.


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor  # [B, 3, H, W] float32
    codes: list[torch.Tensor]  # per branch [N, d], straight-through
    indices: torch.Tensor  # int64 [B, h, w, k]
    losses: dict[str, torch.Tensor]  # quantizer terms, each summed over the k sub-codebooks


class Tokenizer(nn.Module):
    """Trunk -> k branch heads -> quant_conv<sfx> -> quantize<sfx> -> concatenated codes (branch
    order) -> post_quant_conv -> decoder. Computes in autocast's dtype if one is active; the
    quantizer always in float32, as the JAX model."""

    def __init__(self, model_config, image_size: int):
        super().__init__()
        m = model_config
        self.branch_names = tuple(m.branches)
        self.encoder = Encoder(m, image_size)
        for branch in self.branch_names:
            suffix = official_suffix(branch)
            self.add_module("quant_conv" + suffix, nn.Conv2d(m.z_channels, m.code_dim, 1))
            self.add_module("quantize" + suffix, VectorQuantizer(
                m.codebook_size, m.code_dim, l2_normalize=m.l2_normalize,
                entropy_temperature=m.entropy_temperature))
        self.post_quant_conv = nn.Conv2d(len(self.branch_names) * m.code_dim, m.z_channels, 1)
        self.decoder = Decoder(m)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images -> per branch the pre-quantization latent [B, d, h, w], float32."""
        return [getattr(self, "quant_conv" + official_suffix(branch))(h).float()
                for branch, h in zip(self.branch_names, self.encoder(images))]

    def forward(self, images: torch.Tensor, *, with_entropy: bool = False) -> TokenizerOutput:
        latents = self.encode(images)
        batch, code_dim, height, width = latents[0].shape
        with torch.autocast(images.device.type, enabled=False):
            outputs = [getattr(self, "quantize" + official_suffix(branch))(
                z.permute(0, 2, 3, 1).reshape(-1, code_dim), with_entropy)
                for branch, z in zip(self.branch_names, latents)]
        codes = [out.codes for out in outputs]
        stacked = torch.cat(codes, -1).view(batch, height, width, -1).permute(0, 3, 1, 2)
        recon = self.decoder(self.post_quant_conv(stacked)).float()
        indices = torch.stack([out.indices for out in outputs], -1).view(batch, height, width, -1)
        losses = {name: sum(out.losses[name] for out in outputs) for name in outputs[0].losses}
        return TokenizerOutput(recon, codes, indices, losses)


def load_official_state_dict(model: Tokenizer, state: dict[str, torch.Tensor]) -> None:
    """Loads an official-format state dict strictly, less the feature-prediction heads."""
    model.load_state_dict({key: value for key, value in state.items()
                           if not _FEAT_PRED_KEY.match(key)}, strict=True)


def build(config) -> Tokenizer:
    """The tokenizer of `config.model` at `config.data.image_size`, PyTorch default init."""
    if config.loss.perceptual_weight > 0:
        raise ValueError("The torch reference has no LPIPS: set loss.perceptual_weight=0.")
    if config.loss.semantic_weight > 0 and any(b in config.teachers
                                               for b in config.model.branches):
        raise ValueError("The torch reference has no teachers: set loss.semantic_weight=0.")
    return Tokenizer(config.model, config.data.image_size)


# ------------------------------------------------------------------------------------------------
# Objective and step.


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (as fqgan_jax.data.pixels); floats pass through."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


def disentangle_loss(codes: list[torch.Tensor]) -> torch.Tensor:
    """Mean over sub-codebook pairs of mean_i (â_i · b̂_i)² (spec §2); 0 for one codebook."""
    if len(codes) < 2:
        return codes[0].new_zeros(())
    units = [F.normalize(c, dim=-1) for c in codes]
    pairs = list(itertools.combinations(units, 2))
    return sum((a * b).sum(-1).square().mean() for a, b in pairs) / len(pairs)


def loss_weights(loss_config) -> dict[str, float]:
    """losses.generator_loss's weights, the quantizer's taken from the JAX quantizer itself."""
    return {"reconstruction": loss_config.reconstruction_weight,
            **FactorizedQuantizer.loss_weights(loss_config),
            "disentangle": loss_config.disentangle_weight}


def _compute_dtype(images: torch.Tensor, dtype: str):
    """bf16 autocast for config.model.dtype="bfloat16" (the JAX model's compute dtype)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(images.device.type, dtype=torch.bfloat16)


def generator_loss(model: Tokenizer, images: torch.Tensor, config
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted total, unweighted terms) for images NCHW, uint8 or in [-1, 1]."""
    images = images_to_float(images)
    with _compute_dtype(images, config.model.dtype):
        out = model(images, with_entropy=config.loss.entropy_weight > 0)
    diff = out.recon - images
    terms = {"reconstruction": (diff.square().mean() if config.loss.reconstruction == "l2"
                                else diff.abs().mean()),
             **out.losses, "disentangle": disentangle_loss(out.codes)}
    weights = loss_weights(config.loss)
    return sum(weights[name] * value for name, value in terms.items()), terms


class GeneratorOptimizer:
    """The JAX step's update (train_state.make_optimizer + train_step): clip by global norm,
    Adam (AdamW when weight_decay > 0), skip the update on a non-finite loss or gradient, then
    the EMA of the params when optimizer.ema_decay > 0. The learning rate is the config's peak:
    a schedule changes no per-step work."""

    def __init__(self, params, opt):
        self.params = [p for p in params if p.requires_grad]
        adam = torch.optim.AdamW if opt.weight_decay > 0 else torch.optim.Adam
        self.adam = adam(self.params, lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps,
                         weight_decay=opt.weight_decay)
        self.clip_norm = opt.grad_clip_norm
        self.ema_decay = opt.ema_decay
        self.ema = [p.detach().clone() for p in self.params] if opt.ema_decay > 0 else None

    def zero_grad(self) -> None:
        self.adam.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor) -> bool:
        """Applies the update unless loss or gradients are non-finite; returns whether it did.
        (The JAX step also checks the updated params, which would need a copy to roll back.)"""
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            return False
        self.adam.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, self.params, 1.0 - self.ema_decay)
        return True


def make_optimizer(model: Tokenizer, config) -> GeneratorOptimizer:
    return GeneratorOptimizer(model.parameters(), config.optimizer)


def train_step(model: Tokenizer, optimizer: GeneratorOptimizer, images: torch.Tensor,
               config) -> torch.Tensor:
    """One generator update on images NCHW (uint8, as the JAX step takes them); the loss."""
    optimizer.zero_grad()
    loss, _ = generator_loss(model, images, config)
    loss.backward()
    optimizer.step(loss)
    return loss.detach()
