"""The config schema, and the checks that run before anything compiles.

Every key a trainer reads is declared here, with its default and meaning, so that no key is
discovered by reading the trainer (STYLE.md: "configs are data"). Files in `configs/` start from
`base_config()` and change a few fields; each holds its own presets (`:ds8`, `:smoke`), so one
file shows a whole experiment. Here are only the schema, loading with its override and preset
name checks, the semantic checks, and `cpu_smoke()`, the data/train/eval sizes that every smoke
preset shares. Values that derive from other keys (k, the latent grid, the per-device batch) are
computed in code so that command-line overrides flow through.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys

import ml_collections


class ConfigError(ValueError):
    """A config, preset or command-line override that cannot work."""


def base_config() -> ml_collections.ConfigDict:
    """The full schema. Defaults are the official FQGAN recipe (spec fqgan.md §4.3)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Tokenizer architecture (spec fqgan.md §1). k = len(branches).
    config.model = ml_collections.ConfigDict(dict(
        # Which quantizer sits between encoder and decoder (fqgan_jax/quantizers/registry.py):
        # "vq" FQGAN's factorized VQ (LlamaGen's when k = 1), "lc" VQGAN-LC's projected frozen
        # codebook, "fvq" FVQ's VQBridge-mapped codebook, "lfq" Open-MAGVIT2's lookup-free
        # quantizer. lc, fvq and lfq take one branch (k = 1); their settings are below.
        quantizer="vq",
        branches=("vis", "sem"),  # sub-codebook names, in decoder concatenation order
        ch=128,
        ch_mult=(1, 1, 2, 2, 4),  # ds16; (1, 2, 2, 4) is ds8
        num_res_blocks=2,  # per encoder level; the decoder uses one more
        z_channels=256,
        dropout=0.0,
        adapter_layers=6,  # FactorizedAdapter depth per branch; 0 = none (LlamaGen)
        adapter_heads=8,
        adapter_mlp_ratio=4.0,
        codebook_size=16384,
        code_dim=8,
        l2_normalize=True,
        entropy_temperature=0.01,
        search_memory_mb=256,  # nearest-neighbour search never builds a bigger N x K block
        # (per device with shard_codebook; else of the global batch, which XLA then splits)
        shard_codebook=False,  # search codebook rows split over the mesh's fsdp axis (large K)
        remat=False,  # recompute encoder/decoder ResnetBlocks in the backward pass (less memory)
        dtype="bfloat16",  # compute dtype; params and the quantizer stay float32
    ))
    # VQGAN-LC (spec large_codebooks.md §A): a K x feature_dim codebook of clustered features,
    # written by `python -m fqgan_jax.tools.init_codebook`, seen through a trained projector.
    config.model.lc = ml_collections.ConfigDict(dict(
        codebook_path="",  # .npy [codebook_size, feature_dim] from tools.init_codebook
        feature_dim=768,  # CLIP ViT-L/14 patch features after ln_post and the projection
        projector="linear",  # "linear" (official default) | "mlp" (feature_dim -> hidden -> d)
        mlp_hidden=256,
        # Official tuning_codebook: 0 the file's codebook, frozen (paper); 1 the file's, trained;
        # -1 random uniform(+-1/K), trained; -2 random, frozen.
        tuning_codebook=0,
        codebook_ratio=0.33,  # the projector term's weight relative to the commitment term; the
        # pair is scaled by loss.codebook_weight (LC: rate_q = 0.1)
        # tools.init_codebook: features of `init_encoder` over the training data, pooled
        # init_pool x init_pool, clustered by k-means per class (k = codebook_size / classes,
        # the official recipe) or over all features at once ("global", for unlabeled data).
        init_encoder="clip_vit_l14",  # a teacher kind (fqgan_jax/frozen/teachers.py)
        init_encoder_path="",  # "" = the weights dir, as teachers
        init_pool=4,
        init_clustering="per_class",  # "per_class" | "global"
        init_iterations=20,  # Lloyd iterations (full passes over the features)
        init_max_images=0,  # 0 = the whole training split
        init_batch_size=64,  # images per feature-extraction batch (global)
    ))
    # FVQ (spec large_codebooks.md §B): a raw codebook C mapped through VQBridge each step.
    config.model.fvq = ml_collections.ConfigDict(dict(
        group_size=16,  # codes compressed into one bridge token (official 4 x 4 at 16k, 8 x 8
        # at 65k and 262k); any codebook_size: the last group is zero-padded
        width=256,  # bridge token width D
        depth=2,
        heads=4,
        mlp_ratio=2.0,
    ))
    # Open-MAGVIT2 LFQ (spec large_codebooks.md §C): code_dim sign bits, codebook_size = 2^bits.
    config.model.lfq = ml_collections.ConfigDict(dict(
        entropy_temperature=0.01,
        sample_entropy_weight=1.0,  # per-token entropy (minimized)
        batch_entropy_weight=1.0,  # entropy of the batch-mean distribution (maximized)
        entropy_group_bits=9,  # the 2^bits distribution is computed as groups of this many bits
        batch_entropy_scope="shard",  # "shard": each device's tokens, as the official;
        # "global": all tokens of the step
    ))

    # Generator objective (spec fqgan.md §4.1).
    config.loss = ml_collections.ConfigDict(dict(
        reconstruction="l2",  # "l2" (official) or "l1"
        reconstruction_weight=1.0,
        perceptual_weight=1.0,  # LPIPS-VGG16; 0 turns it off
        lpips_weights="",  # converted file; "" = $FQGAN_JAX_WEIGHTS_DIR or ~/.cache/fqgan_jax
        lpips_required=True,  # False: run without LPIPS (and log it) when the file is missing
        lpips_dropout=False,  # True: the official Dropout(0.5) in the LPIPS heads (spec §4.1)
        codebook_weight=1.0,
        commitment_beta=0.25,
        entropy_weight=0.03,
        disentangle_weight=0.1,  # λ of spec §2; averaged over sub-codebook pairs
        semantic_weight=0.5,  # InfoNCE per taught branch (spec §3.3); 0 = no teachers at all
        infonce_negatives="shard",  # "shard": each device's batch, as the official per-GPU
        # loss; "global": the whole batch
        infonce_temperature=1.0,  # official: 1 (plain cosine logits)
    ))

    # Frozen teachers of representation learning, one per taught branch (spec fqgan.md §3.1):
    # config.teachers.<branch> = teacher(kind, path). Empty here; configs/dual.py and triple.py
    # add theirs. Kinds are in fqgan_jax/frozen/teachers.py; path "" looks in the weights dir.
    config.teachers = ml_collections.ConfigDict()

    # PatchGAN and its losses (spec fqgan.md §4.1-4.2). Steps count updates from 1, as the
    # official global_step = step + 1.
    config.gan = ml_collections.ConfigDict(dict(
        weight=0.5,  # generator's GAN weight (x the adaptive weight if on); 0 = no GAN at all
        disc_loss_weight=0.5,  # factor on the discriminator loss (official: disc_weight)
        start=20_000,  # first step whose generator loss includes the GAN term
        ramp_steps=0,  # > 0: the generator's GAN weight grows linearly over this many steps
        # from `start` (0 = the official jump to the full weight)
        disc_warmup_steps=0,  # D trains alone from step start - disc_warmup_steps
        generator_loss="hinge",  # "hinge" | "non_saturating" | "non_saturating_per_image"
        adaptive_weight=False,  # taming/VQGAN-LC: |grad nll| / |grad gan| at decoder.conv_out
        adaptive_weight_max=1e4,
        lecam_weight=0.0,  # Open-MAGVIT2: 0.05
        lecam_decay=0.999,
        # True: the official D optimizer, stepped (with a zero loss) from step 1, so its Adam
        # step count is the global step and its first real updates are damped (README
        # "Departures"); False: D's Adam starts fresh when D starts training.
        official_disc_adam_count=False,
        ndf=64,
        n_layers=3,  # VQGAN-LC: 2
    ))
    config.gan.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=2e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
        schedule="constant", warmup_steps=0, warmup_init_ratio=0.0, min_lr_ratio=0.0,
        annealing_plateau=0.3, annealing_shape="linear"))

    # Adam(0.9, 0.95), lr 2e-4, clip 1.0, constant (spec fqgan.md §4.3).
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=2e-4,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.0,  # official parses 0.05 but never passes it to Adam
        grad_clip_norm=1.0,
        # "constant" | "warmup_cosine" | "annealing" (FVQ's learning annealing, spec
        # large_codebooks.md §B.5: full rate for `annealing_plateau` of the post-warm-up steps,
        # then a linear or cosine decay to min_lr_ratio; fqgan_jax/training/schedules.py)
        schedule="constant",
        warmup_steps=0,
        warmup_init_ratio=0.0,  # the warm-up starts at this fraction of learning_rate (FVQ 0.005)
        min_lr_ratio=0.0,  # the decay's floor, as a fraction of learning_rate
        annealing_plateau=0.3,
        annealing_shape="linear",  # "linear" | "cos"
        ema_decay=0.0,  # 0 disables the EMA copy of the params
    ))

    config.train = ml_collections.ConfigDict(dict(
        batch_size=256,  # global, across all devices and hosts
        num_steps=200_000,  # 40 epochs of ImageNet at 256 (spec §4.3)
        log_every=100,
        checkpoint_every=5000,
        keep_checkpoints=3,
        eval_every=10_000,
        image_every=5000,  # reconstruction grids (TensorBoard + PNG)
        max_nonfinite_steps=20,  # consecutive skipped updates before the run stops
        usage_window_steps=100,  # running usage: codes assigned within this many steps
        profile_steps=0,  # > 0: a jax.profiler trace of that many steps in WORKDIR/profile
        profile_first_step=10,  # 1-based; later than 1 keeps compilation out of the trace
        # Fine-tuning: a workdir (its latest checkpoint) or one step folder of it whose model
        # (and discriminator, when both have one) starts this run, with fresh optimizers at step
        # 0. Read only when this run's workdir has no checkpoint yet. "" = from scratch.
        init_from="",
    ))

    config.data = ml_collections.ConfigDict(dict(
        source="tfds",  # "tfds" | "folder" | "photos"
        tfds_name="imagenet2012",
        tfds_data_dir="",  # "" = TFDS default
        train_split="train",
        eval_split="validation",
        train_dir="",  # for source="folder": nested class folders of jpg/png/webp
        eval_dir="",
        image_size=256,
        augment="adm",  # "adm": official random_crop_arr; "crop": random resized crop
        crop_scale=(0.8, 1.0),
        random_flip=True,
        num_workers=8,  # grain worker processes; 0 = in-process
        read_threads=8,  # per process or worker: train batches / eval images read at once
        prefetch_batches=2,  # train batches buffered per process or worker (host memory)
        prefetch_buffer=64,  # eval images buffered
    ))

    config.eval = ml_collections.ConfigDict(dict(
        batch_size=64,  # global
        num_images=0,  # 0 = the whole eval split
        grid_images=8,
        ssim_data_range=1.0,  # the official code used 2.0 on [0, 1] images (spec §5.1)
        legacy_uint8_offset=False,  # True: official clamp(127.5 x + 128) conversion
        dtype="float32",  # eval and load_tokenizer compute dtype, as the official evaluation;
        # training computes in model.dtype (bf16 moved 5-7% of code indices on the same weights)
        # FQGAN Figures 3-4 (fqgan_jax/eval/codebook_analysis.py), written with every eval:
        single_codebook_images=8,  # rows of the original | all | only-i grid; 0 = none
        single_codebook_fill="zeros",  # what replaces the other sub-codes: "zeros" | "mean"
        tsne_points=2000,  # codebook entries per sub-codebook in the t-SNE plot; 0 = no plot
        tsne_used_only=False,  # True: only codes used on the eval set
        # rFID and IS (fqgan_jax/eval/inception_metrics.py; README "Evaluation protocol"):
        inception_weights="",  # converted FID Inception; "" = the weights dir, and if it is not
        # there, eval runs without rFID / IS and says so
        fid_reference="",  # "" = vs the eval originals (FQGAN rFID); or a mu/sigma .npz
        fid_preprocess="pytorch_fid",  # resize to 299: "pytorch_fid" | "tf1" (ADM evaluator)
        fid_method="sqrtm",  # "sqrtm": pytorch-fid's scipy sqrtm; "eigh": same trace, ~10x faster
        is_splits=10,
        progress=True,  # a progress bar over the eval batches (process 0)
    ))

    # Device mesh; -1 takes the remaining devices. shard_frozen splits each big frozen weight
    # (teachers, LPIPS) over the devices instead of keeping a full copy on each.
    config.mesh = ml_collections.ConfigDict(dict(
        shape=(-1, 1),  # (data, fsdp); e.g. (-1, 8) shards the state over groups of 8 devices
        axes=("data", "fsdp"),
        # Train-state leaves: ((path regex, spec), ...), first match wins, spec = one mesh axis
        # name or None per dimension, () = replicated; unmatched leaves shard their largest
        # dimension over `fsdp` (fqgan_jax/sharding.py). Paths look like
        # "params/quantize/codebook", "opt_state/0/mu/decoder/conv_in/kernel".
        rules=(),
        fsdp_min_size=2**14,  # leaves with fewer elements stay replicated
        shard_frozen=False,  # teachers / LPIPS / Inception: split over all devices, not copied
    ))
    return config


def teacher(kind: str, path: str = "") -> ml_collections.ConfigDict:
    """One `config.teachers.<branch>` entry: a kind of fqgan_jax/frozen/teachers.py and where its
    Hugging Face snapshot is ("" = $FQGAN_JAX_WEIGHTS_DIR/<repo name>, else ~/.cache/fqgan_jax)."""
    return ml_collections.ConfigDict(dict(kind=kind, path=path))


def taught_branches(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{branch: teacher kind} of the branches trained against a teacher, in branch order; empty
    when config.loss.semantic_weight is 0 (then no head is built and no teacher loaded)."""
    if config.loss.semantic_weight <= 0:
        return {}
    return {b: config.teachers[b].kind for b in config.model.branches if b in config.teachers}


def has_discriminator(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains a discriminator (and the generator a GAN term): gan.weight > 0."""
    return config.gan.weight > 0


# ------------------------------------------------------------------------------------------------
# Loading config files and checking overrides.


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` the way `config_flags` does, with clear errors."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(
            f"Config file {path!r} does not exist. Pass --config=configs/dual.py "
            "(or vqgan.py, triple.py), optionally with a preset: configs/dual.py:smoke.")
    module_spec = importlib.util.spec_from_file_location("_fqgan_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """Rebuilds a config saved as JSON (a run's config.json) on top of the current schema."""
    config = base_config()
    for branch, entry in saved.get("teachers", {}).items():  # keyed by branch: not in the schema
        config.teachers[branch] = teacher(**entry)
    for key in flat_keys(config):
        section, _, name = key.rpartition(".")
        value = saved
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            target = _get(config, section) if section else config
            target[name] = tuple(value) if isinstance(value, list) else value
    return config


def single_device_mesh() -> ml_collections.ConfigDict:
    mesh = base_config().mesh
    mesh.shape = (1, 1)
    return mesh


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += flat_keys(value, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def unknown_key_message(key: str, known: list[str]) -> str:
    """Names the bad key and the close matches, including ones in another section."""
    leaf_matches = [k for k in known if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    matches = leaf_matches + difflib.get_close_matches(key, known, n=5, cutoff=0.6)
    matches = list(dict.fromkeys(matches))[:5]
    hint = f" Did you mean: {', '.join('config.' + m for m in matches)}?" if matches else ""
    return f"Unknown config key 'config.{key}'.{hint} See fqgan_jax/config_lib.py for all keys."


def check_overrides(argv: list[str]) -> None:
    """Fails fast, with close matches, on `--config.<key>` overrides that the config lacks."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return
    known = flat_keys(load_config_file(spec))
    for arg in argv:
        match = re.match(r"--config\.([\w.]+)(=|$)", arg)
        if match and match.group(1) not in known:
            raise ConfigError(unknown_key_message(match.group(1), known))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for a command with `--config` (app.run's flags_parser), after
    checking `--config.*` keys, so a typo fails with close matches, not a traceback."""
    from absl import flags  # noqa: PLC0415 (the schema itself needs no absl)

    try:
        check_overrides(argv)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    return flags.FLAGS(argv)


def preset(arg: str | None, presets: tuple[str, ...]) -> str:
    """Validates a `get_config(arg)` preset name."""
    name = arg or ""
    if name not in presets:
        raise ConfigError(
            f"Unknown preset {name!r}. Valid presets: {', '.join(repr(p) for p in presets)}.")
    return name


# ------------------------------------------------------------------------------------------------
# Semantic checks: everything a run needs that can be known before compiling.

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "loss.reconstruction": ("l2", "l1"),
    "model.quantizer": ("vq", "lc", "fvq", "lfq"),
    "model.lc.projector": ("linear", "mlp"),
    "model.lc.init_clustering": ("per_class", "global"),
    "model.lfq.batch_entropy_scope": ("shard", "global"),
    "optimizer.schedule": ("constant", "warmup_cosine", "annealing"),
    "gan.optimizer.schedule": ("constant", "warmup_cosine", "annealing"),
    "optimizer.annealing_shape": ("linear", "cos"),
    "gan.optimizer.annealing_shape": ("linear", "cos"),
    "gan.generator_loss": ("hinge", "non_saturating", "non_saturating_per_image"),
    "data.source": ("tfds", "folder", "photos"),
    "data.augment": ("adm", "crop"),
    "loss.infonce_negatives": ("shard", "global"),
    "eval.single_codebook_fill": ("zeros", "mean"),
    "eval.fid_preprocess": ("pytorch_fid", "tf1"),
    "eval.fid_method": ("sqrtm", "eigh"),
    "eval.dtype": ("float32", "bfloat16"),
}


def _get(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError naming the key and the fix for the first problem found."""
    problems = []
    for key, choices in _CHOICES.items():
        if _get(config, key) not in choices:
            problems.append(f"config.{key}={_get(config, key)!r} must be one of {choices}.")
    problems += _model_problems(config.model, config.data.image_size)
    problems += _batch_problems(config, num_devices)
    low, high = config.data.crop_scale
    if not 0 < low <= high <= 1:
        problems.append(f"config.data.crop_scale={config.data.crop_scale} must satisfy "
                        "0 < min <= max <= 1.")
    for key in ("train.num_steps", "train.log_every", "train.checkpoint_every",
                "train.eval_every", "train.image_every", "train.max_nonfinite_steps",
                "train.usage_window_steps", "train.keep_checkpoints", "eval.is_splits",
                "train.profile_first_step"):
        if _get(config, key) <= 0:
            problems.append(f"config.{key} must be positive, got {_get(config, key)}.")
    for key in ("data.num_workers", "data.prefetch_batches", "data.prefetch_buffer"):
        if _get(config, key) < 0:
            problems.append(f"config.{key} must be >= 0, got {_get(config, key)}.")
    if config.data.read_threads < 1:
        problems.append(f"config.data.read_threads must be positive, got "
                        f"{config.data.read_threads}.")
    for key, value in config.loss.items():
        if isinstance(value, float) and value < 0:
            problems.append(f"config.loss.{key} must be >= 0, got {value}.")
    if config.eval.num_images < 0:
        problems.append(f"config.eval.num_images={config.eval.num_images} must be >= 0 "
                        "(0 = the whole eval split).")
    if not 0 <= config.optimizer.ema_decay < 1:
        problems.append("config.optimizer.ema_decay must be in [0, 1).")
    problems += _gan_problems(config.gan)
    problems += _teacher_problems(config, num_devices)
    problems += _mesh_problems(config.mesh, num_devices, config.model)
    if problems:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def _model_problems(model, image_size):
    problems = []
    branches = tuple(model.branches)
    if not branches or len(set(branches)) != len(branches):
        problems.append(f"config.model.branches={branches} must be non-empty and unique.")
    if not all(re.fullmatch(r"[a-z_][a-z0-9_]*", b) for b in branches):
        problems.append("config.model.branches must be lower-case identifiers.")
    factor = 2 ** (len(model.ch_mult) - 1)
    if image_size % factor:
        problems.append(f"config.data.image_size={image_size} is not divisible by the "
                        f"downsampling factor {factor} of ch_mult={tuple(model.ch_mult)}.")
    widths = [model.ch * m for m in model.ch_mult] + [model.z_channels]
    if any(w % 32 for w in widths):
        problems.append(f"GroupNorm(32) needs channel counts divisible by 32; model.ch="
                        f"{model.ch}, ch_mult={tuple(model.ch_mult)} and z_channels="
                        f"{model.z_channels} give {widths}.")
    if model.adapter_layers and (model.ch * model.ch_mult[-1]) % model.adapter_heads:
        problems.append(f"Adapter width {model.ch * model.ch_mult[-1]} is not divisible by "
                        f"config.model.adapter_heads={model.adapter_heads}.")
    if model.codebook_size < 2 or model.code_dim < 1:
        problems.append("config.model.codebook_size must be >= 2 and code_dim >= 1.")
    return problems + _quantizer_problems(model)


def _quantizer_problems(model):
    """What each non-default quantizer needs (the modules check shapes again when built)."""
    name = model.quantizer
    if name == "vq":
        return []
    problems = []
    if len(tuple(model.branches)) != 1:
        problems.append(f"config.model.quantizer={name!r} quantizes one latent: set "
                        f"config.model.branches to one name (e.g. ('vq',)), not "
                        f"{tuple(model.branches)}.")
    if name == "lfq" and model.codebook_size != 2 ** model.code_dim:
        problems.append(f"LFQ's codes are code_dim={model.code_dim} sign bits, so "
                        f"config.model.codebook_size must be 2**{model.code_dim} = "
                        f"{2 ** model.code_dim}, got {model.codebook_size}.")
    if name == "lfq" and model.lfq.entropy_group_bits < 1:
        problems.append("config.model.lfq.entropy_group_bits must be >= 1.")
    if name == "lc":
        lc = model.lc
        if lc.tuning_codebook not in (0, 1, -1, -2):
            problems.append(f"config.model.lc.tuning_codebook={lc.tuning_codebook} must be 0 "
                            "(file, frozen), 1 (file, trained), -1 (random, trained) or -2 "
                            "(random, frozen).")
        elif lc.tuning_codebook >= 0 and not lc.codebook_path:
            problems.append("config.model.lc.codebook_path is empty, but tuning_codebook="
                            f"{lc.tuning_codebook} starts from a clustered codebook. Make one "
                            "with `python -m fqgan_jax.tools.init_codebook --config=<this "
                            "config> --output=codebook.npy` and pass "
                            "--config.model.lc.codebook_path=codebook.npy.")
        if lc.init_pool < 1 or lc.init_iterations < 1 or lc.init_batch_size < 1:
            problems.append("config.model.lc.init_pool, init_iterations and init_batch_size "
                            "must be >= 1.")
    if name == "fvq":
        fvq = model.fvq
        if min(fvq.group_size, fvq.width, fvq.depth, fvq.heads) < 1 or fvq.width % fvq.heads:
            problems.append(f"config.model.fvq needs positive group_size, width, depth and heads "
                            f"with width divisible by heads; got group_size={fvq.group_size}, "
                            f"width={fvq.width}, depth={fvq.depth}, heads={fvq.heads}.")
    return problems


def _gan_problems(gan):
    problems = []
    for key in ("weight", "disc_loss_weight", "lecam_weight", "adaptive_weight_max"):
        if gan[key] < 0:
            problems.append(f"config.gan.{key} must be >= 0, got {gan[key]}.")
    if gan.start < 0 or not 0 <= gan.disc_warmup_steps <= gan.start:
        problems.append(f"config.gan.disc_warmup_steps={gan.disc_warmup_steps} must be in "
                        f"[0, config.gan.start={gan.start}]: D warms up before the generator "
                        "sees its loss.")
    if gan.ramp_steps < 0:
        problems.append(f"config.gan.ramp_steps must be >= 0, got {gan.ramp_steps}.")
    if not 0 <= gan.lecam_decay < 1:
        problems.append("config.gan.lecam_decay must be in [0, 1).")
    if gan.n_layers < 1 or gan.ndf < 1:
        problems.append("config.gan.n_layers and config.gan.ndf must be >= 1.")
    return problems


def _teacher_problems(config, num_devices):
    from fqgan_jax.frozen import teachers  # noqa: PLC0415 (the registry imports the models)

    problems = []
    for branch, entry in config.teachers.items():
        where = f"config.teachers.{branch}"
        if set(entry.keys()) != {"kind", "path"}:
            problems.append(f"{where} must be config_lib.teacher(kind, path), got keys "
                            f"{sorted(entry.keys())}.")
            continue
        if branch not in config.model.branches:
            problems.append(f"{where}: {branch!r} is not one of config.model.branches="
                            f"{tuple(config.model.branches)}.")
        if entry.kind not in teachers.KINDS:
            problems.append(f"{where}.kind={entry.kind!r} is unknown; kinds: "
                            f"{', '.join(sorted(teachers.KINDS))}.")
        elif teachers.kind(entry.kind).is_random and entry.path:
            problems.append(f"{where}.kind={entry.kind!r} is a random-init tower and takes no "
                            f"weights; clear {where}.path or pick a pretrained kind.")
    if config.loss.infonce_temperature <= 0:
        problems.append("config.loss.infonce_temperature must be > 0.")
    per_device = config.train.batch_size // max(num_devices, 1)
    if taught_branches(config) and config.loss.infonce_negatives == "shard" and per_device < 2:
        problems.append(f"config.loss.infonce_negatives='shard' needs at least 2 images per "
                        f"device for negatives; train.batch_size={config.train.batch_size} on "
                        f"{num_devices} devices gives {per_device}. Raise the batch or use "
                        "'global'.")
    return problems


def _mesh_problems(mesh, num_devices, model):
    from fqgan_jax import sharding  # noqa: PLC0415 (imports jax)

    problems = []
    if len(tuple(mesh.shape)) != len(tuple(mesh.axes)):
        problems.append(f"config.mesh.shape={tuple(mesh.shape)} and config.mesh.axes="
                        f"{tuple(mesh.axes)} must have the same length.")
    else:
        try:
            sizes = dict(zip(mesh.axes, sharding.mesh_shape(mesh.shape, num_devices)))
        except ValueError as error:
            problems.append(str(error))
        else:
            fsdp = sizes.get(sharding.FSDP_AXIS, 1)
            if model.shard_codebook and model.codebook_size % fsdp:
                problems.append(f"config.model.shard_codebook splits the codebook over the "
                                f"{fsdp}-device fsdp axis, but codebook_size="
                                f"{model.codebook_size} does not divide by {fsdp}.")
    for rule in mesh.rules:
        if (len(rule) != 2 or not isinstance(rule[0], str)
                or not all(a is None or a in tuple(mesh.axes) for a in rule[1])):
            problems.append(f"config.mesh.rules entry {rule!r} must be (path regex, spec) with "
                            f"spec made of None and axis names from {tuple(mesh.axes)}.")
            continue
        try:
            re.compile(rule[0])
        except re.error as error:
            problems.append(f"config.mesh.rules: {rule[0]!r} is not a regex ({error}).")
    return problems


def _batch_problems(config, num_devices):
    problems = []
    for key in ("train.batch_size", "eval.batch_size"):
        size = _get(config, key)
        if size <= 0 or size % num_devices:
            problems.append(f"config.{key}={size} must be a positive multiple of the "
                            f"{num_devices} devices the batch is sharded over.")
    return problems


# ------------------------------------------------------------------------------------------------
# The CPU-size settings every `:smoke` preset shares. The presets themselves, with the model size
# and teachers they change, are in each file of configs/.


def cpu_smoke(config: ml_collections.ConfigDict) -> None:
    """The CPU-size data/train/eval settings shared by every :smoke preset: 200 steps of 16 crops
    of the scikit-image photos, minutes on a 2-core CPU. Same code paths, CPU-sized numbers."""
    config.optimizer.learning_rate = 1e-3
    # LPIPS only if its converted weights are there. The whole adversarial path runs: D alone
    # from step 100, the generator sees it from step 150. A toy model meets the full-size D, so
    # the GAN weight is Open-MAGVIT2's 0.1 (0.5 swamps 200 steps of reconstruction learning),
    # scaled by taming's adaptive weight: with the fixed weight, 50 GAN steps cost 2.2 dB of
    # held-out PSNR against the no-GAN control, with it 0.1 dB (benchmarks/gan_start.py, README
    # "The adversarial phase").
    config.loss.lpips_required = False
    config.gan.update(dict(weight=0.1, start=150, disc_warmup_steps=50, adaptive_weight=True))
    config.train.update(dict(
        batch_size=16, num_steps=200, log_every=25, checkpoint_every=100,
        eval_every=100, image_every=100, usage_window_steps=20))
    config.data.update(dict(
        source="photos", image_size=64, augment="crop", crop_scale=(0.15, 0.6),
        num_workers=2, read_threads=2, prefetch_buffer=8))
    # 32 eval images give rank-deficient covariances, where sqrtm is slow and fragile.
    config.eval.update(dict(batch_size=16, grid_images=8, fid_method="eigh"))
