"""Official PyTorch tokenizer checkpoints in and out (fqgan_jax/tools/official.py, `convert
official` / `convert export`).

- Every official layout of the spec's key listing (Dual / Triple / LlamaGen at VQ-16 and VQ-8,
  with the PatchGAN) goes in and comes back out bit for bit, codebook_used and
  num_batches_tracked aside (written as zeros).
- A file imported by the CLI is a workdir like a run's: load_tokenizer gives the numbers of the
  same params loaded directly, --mode=eval runs on it, --mode=train restores it at step 0 with
  its data position, and `export` writes the file back.
- Every refusal names its fix, and nothing is written before the checks pass.

Full-size layouts are random state dicts built from the listing's names and shapes, converted in
memory (no full-size program is compiled); the workdir tests use a tiny Dual model.
"""

import argparse
import ast
import pathlib
import shutil
import types

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import fqgan_jax
from fqgan_jax import architecture, checkpointing, config_lib, inference
from fqgan_jax.eval import evaluate
from fqgan_jax.frozen import weights
from fqgan_jax.frozen.weights import PretrainedError
from fqgan_jax.models import official_key_to_path
from fqgan_jax.tools import convert, official, official_format
from fqgan_jax.training import loop
from fqgan_jax.training.build import build_run

REPO = pathlib.Path(__file__).resolve().parent.parent
OFFICIAL_KEYS = pathlib.Path("/work/shared/spec/official_keys_tokenizer.tsv")
DISCRIMINATOR = "PatchGAN NLayerDiscriminator(3,64,3)"
LAYOUT_CONFIGS = {  # TSV section -> the config file that builds that architecture
    "llamagen_vq_model VQ-16": "configs/vqgan.py",
    "llamagen_vq_model VQ-8": "configs/vqgan.py:ds8",
    "vq_model_dual VQ-16": "configs/dual.py",
    "vq_model_dual VQ-8": "configs/dual.py:ds8",
    "vq_model_triple VQ-16": "configs/triple.py",
    "vq_model_triple VQ-8": "configs/triple.py:ds8",
}
ZEROED = ("codebook_used", "num_batches_tracked")  # buffers the export writes as zeros

# A tiny Dual (2 x 64 codes of 8, the random tiny CLIP teaching `sem`, ndf-16 PatchGAN, EMA on),
# as command-line overrides of the smoke preset: the CLI parses them as fqgan_jax.main does.
TINY_SPEC = "configs/dual.py:smoke"
TINY_FLAGS = [
    "--config.model.ch_mult=1,2", "--config.model.z_channels=32", "--config.model.adapter_heads=2",
    "--config.model.codebook_size=64", "--config.data.image_size=32",
    "--config.data.num_workers=0", "--config.data.read_threads=1",
    "--config.data.prefetch_buffer=2", "--config.train.batch_size=8",
    "--config.eval.batch_size=8", "--config.eval.num_images=8",
    "--config.eval.single_codebook_images=0", "--config.eval.tsne_points=0",
    "--config.gan.ndf=16", "--config.loss.perceptual_weight=0",
    "--config.loss.infonce_negatives=global", "--config.optimizer.ema_decay=0.999"]


def config_file(spec: str):
    return config_lib.load_config_file(str(REPO / spec))


def official_section(title: str) -> dict[str, tuple]:
    """{key: torch shape} of one section of the spec's listing."""
    if not OFFICIAL_KEYS.is_file():
        pytest.skip(f"{OFFICIAL_KEYS} (the spec's key listing) is not on this machine")
    rows, inside = {}, False
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if line.startswith("###"):
            inside = line.startswith(f"### {title}:")
        elif inside and line.strip():
            key, _, shape = line.split("\t")
            rows[key] = tuple(ast.literal_eval(shape))
    assert rows, f"section {title!r} not found"
    return rows


def random_state_dict(title: str, seed: int) -> dict[str, np.ndarray]:
    """A state dict of the section's names and shapes with random values, buffers included (a
    used codebook window, a nonzero batch count), as a trained official file has them."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in official_section(title).items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(rng.integers(1, 10**6), np.int64)
        elif key.endswith("codebook_used"):
            state[key] = rng.integers(0, 16384, shape).astype(np.float32)
        elif key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            state[key] = rng.standard_normal(shape, dtype=np.float32)
    return state


def zeros_state_dict(title: str) -> dict[str, np.ndarray]:
    """The section's names and shapes, all zeros: np.zeros pages in lazily, so a full-size dict
    costs nothing until read, and the architecture checks read only shapes."""
    return {key: np.zeros(shape, np.float32) for key, shape in official_section(title).items()}


def assert_same_file(written: dict, original: dict) -> None:
    """The same keys, shapes and dtypes; every value bit-equal, except the zeroed buffers."""
    assert written.keys() == original.keys()
    for key, value in original.items():
        assert written[key].shape == value.shape and written[key].dtype == value.dtype, key
        if key.endswith(ZEROED):
            assert not np.any(written[key]), key
        else:
            np.testing.assert_array_equal(written[key].view(np.uint32), value.view(np.uint32),
                                          err_msg=key)


# ------------------------------------------------------------------------------------------------
# Every official layout, in and out.


# 4-15 s each on 2 busy CPU cores (tracing the full-size model's shapes, ~600 MB of copies);
# the VQ-8 variants, which differ only in level count and table sizes, run with `-m slow`.
@pytest.mark.parametrize("title", [
    pytest.param(title, marks=[pytest.mark.slow] if title.endswith("VQ-8") else [])
    for title in LAYOUT_CONFIGS])
def test_official_layout_round_trips_bit_for_bit(title):
    spec = LAYOUT_CONFIGS[title]
    model, disc = random_state_dict(title, seed=0), random_state_dict(DISCRIMINATOR, seed=1)
    file = {"model": model, "discriminator": disc, "steps": 7}
    imported = official.convert_checkpoint(file, config_file(spec), config_name=spec)
    assert imported.architecture.official_config() == spec
    assert imported.notes == ()  # every head and the discriminator imported, nothing dropped
    disc_params, batch_stats = imported.disc
    exported = official.official_checkpoint(
        {"params": imported.params, "disc": {"params": disc_params, "batch_stats": batch_stats}},
        config_file(spec))
    assert exported.keys() == {"model", "discriminator"}
    assert_same_file(exported["model"], model)
    assert_same_file(exported["discriminator"], disc)
    # codebook_used as the official module registers it: float32 [65536].
    assert all(value.shape == (65536,) for key, value in exported["model"].items()
               if key.endswith("codebook_used"))


def test_every_parameter_path_maps_back_to_its_official_key():
    """path_to_official_key inverts the model's official_key_to_path on a whole Triple VQ-16."""
    branches = ("vis", "sem_mid", "sem_high")
    for key in official_section("vq_model_triple VQ-16"):
        if not key.endswith(("codebook_used", "embedding.weight")):
            path, _ = official_key_to_path(key, branches)
            assert official_format.path_to_official_key(path, branches) == key


# ------------------------------------------------------------------------------------------------
# The CLI on a tiny model: file -> workdir -> file.


def random_variables(config, seed: int):
    """Random tokenizer params and PatchGAN (params, batch_stats) of `config`, from shapes alone
    (no init program to compile). N(0, 0.1): finite activations through the GroupNorms."""
    rng = np.random.default_rng(seed)
    draw = lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32)  # noqa: E731
    params = jax.tree.map(draw, architecture.abstract_model_variables(config)[0])
    disc = nnx.state(nnx.eval_shape(lambda: architecture.create_discriminator(config,
                                                                              nnx.Rngs(0))))
    disc_params, batch_stats = nnx.split_state(jax.tree.map(draw, disc), nnx.Param,
                                               nnx.BatchStat)
    batch_stats = jax.tree.map(lambda v: np.abs(v) + 0.5 if v.ndim else v, batch_stats)
    return params, disc_params, batch_stats


def torch_tensors(state: dict) -> dict:
    return {key: torch.from_numpy(np.array(value)) for key, value in state.items()}


def _record_unpickling():
    """What a hostile pickle would run; a refused file never calls it."""
    UNPICKLED.append(True)


UNPICKLED = []


class Hook:
    """A custom object in a checkpoint: unpickling it calls _record_unpickling."""

    def __reduce__(self):
        return _record_unpickling, ()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An official-layout training checkpoint of the tiny Dual, written as FQGAN's trainer does
    (with optimizer states, steps and its argparse args), imported by the CLI."""
    directory = tmp_path_factory.mktemp("official")
    config = convert.load_config(str(REPO / TINY_SPEC), TINY_FLAGS)
    branches = tuple(config.model.branches)
    params, disc_params, batch_stats = random_variables(config, seed=3)
    ema_params = jax.tree.map(lambda v: v + 1, params)
    model = official_format.tokenizer_state_dict(params, branches)
    model["quantize_vis.codebook_used"][:10] = 5.0  # a used window, as a trained file has
    disc = official_format.discriminator_state_dict(disc_params, batch_stats)
    ckpt = directory / "fqgan_tiny.pt"
    torch.save({"model": torch_tensors(model), "discriminator": torch_tensors(disc),
                "ema": torch_tensors(official_format.tokenizer_state_dict(ema_params, branches)),
                "optimizer": {"state": {0: {"step": torch.tensor(3.0)}},
                              "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.95)}]},
                "steps": 1234, "args": argparse.Namespace(vq_model="VQ-16", ema=True)}, ckpt)
    workdir = directory / "workdir"
    assert convert.main(["official", f"--ckpt={ckpt}", f"--config={REPO / TINY_SPEC}",
                         f"--workdir={workdir}", *TINY_FLAGS]) == 0
    return types.SimpleNamespace(config=config, params=params, ema_params=ema_params,
                                 model=model, disc=disc, ckpt=ckpt, workdir=workdir,
                                 directory=directory)


def test_import_writes_a_step_0_workdir_that_training_resumes(tiny):
    """What --mode=train does first: the config matches, and the whole TrainState restores at
    step 0 with the data position 0, the imported weights and fresh optimizer moments."""
    assert sorted(p.name for p in tiny.workdir.iterdir()) == ["checkpoints", "config.json"]
    checkpointing.check_config_matches(str(tiny.workdir), tiny.config)
    run = build_run(tiny.config, frozen={})
    iterator = loop.train_iterator(run.config)
    checkpointer = checkpointing.Checkpointer(str(tiny.workdir / "checkpoints"))
    try:
        assert checkpointer.latest_step() == 0
        state, meta = checkpointer.restore(0, run.state_target, iterator)
    finally:
        checkpointer.close()
        if hasattr(iterator, "close"):
            iterator.close()
    assert meta == {"num_skipped_images": 0, "num_converted_images": 0,
                    "data": {"global_next_index": 0}}
    assert int(state.step) == 0 and int(state.nonfinite_total) == 0
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    same(jax.device_get(state.params), tiny.params)
    same(jax.device_get(state.ema_params), tiny.params)  # the EMA starts at the weights
    assert not any(np.any(leaf) for leaf in jax.tree.leaves(state.opt_state))
    assert_same_file(official_format.discriminator_state_dict(state.disc.params,
                                                       state.disc.batch_stats), tiny.disc)


def test_load_tokenizer_gives_the_numbers_of_the_same_params(tiny):
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
    imported = fqgan_jax.load_tokenizer(str(tiny.workdir))
    direct = inference.Tokenizer(tiny.config, tiny.params,
                                 architecture.abstract_model_variables(tiny.config)[1])
    codes = imported.encode(images)
    np.testing.assert_array_equal(codes, direct.encode(images))
    assert len(np.unique(codes)) > 1  # random weights still spread over the codebook
    np.testing.assert_array_equal(imported.decode(codes), direct.decode(codes))


def test_eval_mode_runs_on_the_imported_workdir(tiny):
    result = evaluate.evaluate_workdir(tiny.config, str(tiny.workdir))
    assert result["step"] == 0 and np.isfinite(result["psnr"])
    assert (tiny.workdir / "eval" / "0.json").is_file()


def test_export_writes_the_file_back(tiny, capsys):
    out = tiny.directory / "exported.pt"
    assert convert.main(["export", f"--workdir={tiny.workdir}", f"--out={out}"]) == 0
    assert f"Wrote {out}: 'model' (" in capsys.readouterr().out
    written = weights.read_torch_checkpoint(str(out))
    assert written.keys() == {"model", "ema", "discriminator"}
    assert_same_file(written["model"], tiny.model)
    assert_same_file(written["ema"], tiny.model)  # imported as params, so EMA = params
    assert_same_file(written["discriminator"], tiny.disc)
    # A step folder names the step; a folder without a run is refused.
    step_folder = tiny.workdir / "checkpoints" / "0"
    assert convert.main(["export", f"--workdir={step_folder}", f"--out={out}"]) == 0
    assert_same_file(weights.read_torch_checkpoint(str(out))["model"], tiny.model)
    assert convert.main(["export", f"--workdir={tiny.directory}", f"--out={out}"]) == 2
    assert "is not a fqgan_jax workdir" in capsys.readouterr().err


def test_use_ema_imports_the_ema_weights(tiny):
    file = weights.read_torch_checkpoint(str(tiny.ckpt))
    imported = official.convert_checkpoint(file, tiny.config, use_ema=True)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(imported.params),
                 tiny.ema_params)
    del file["ema"]
    with pytest.raises(PretrainedError, match="no 'ema' state dict.*Drop --use_ema"):
        official.convert_checkpoint(file, tiny.config, use_ema=True)


def test_a_bare_or_prefixed_state_dict_is_accepted(tiny):
    bare = {f"module.{key}": value for key, value in tiny.model.items()}  # saved from DDP
    state, disc, entry = official.select_state_dicts(bare)
    assert state.keys() == tiny.model.keys() and disc is None and entry == "the bare state dict"


# ------------------------------------------------------------------------------------------------
# Refusals, each naming its fix; nothing is written before the checks pass.


def test_llamagen_file_with_the_dual_config_names_the_vqgan_config():
    with pytest.raises(PretrainedError) as error:
        official.convert_checkpoint({"model": zeros_state_dict("llamagen_vq_model VQ-16")},
                                    config_file("configs/dual.py"), config_name="configs/dual.py")
    message = str(error.value)
    assert ("this is a LlamaGen VQ (1 codebook) checkpoint, but --config=configs/dual.py "
            "expects FQGAN-Dual (vis, sem)") in message
    assert "Fix: use --config=configs/vqgan.py," in message


@pytest.mark.parametrize("title, spec, fix", [
    ("vq_model_dual VQ-8", "configs/dual.py", "configs/dual.py:ds8"),
    ("vq_model_triple VQ-16", "configs/triple.py:ds8", "configs/triple.py,"),
    ("llamagen_vq_model VQ-8", "configs/vqgan.py", "configs/vqgan.py:ds8"),
])
def test_downsampling_mismatch_names_the_preset(title, spec, fix):
    with pytest.raises(PretrainedError, match=r"the file is ds(8|16) \(ch_mult") as error:
        official.convert_checkpoint({"model": zeros_state_dict(title)}, config_file(spec),
                                    config_name=spec)
    assert f"Fix: use --config={fix}" in str(error.value)


def test_cli_refuses_a_layout_mismatch_before_writing(tmp_path, capsys):
    """A tiny (non-official) LlamaGen-layout file given the Dual config: the fix is named, and
    nothing is written; the vqgan config then imports it."""
    vq_config = convert.load_config(str(REPO / "configs/vqgan.py:smoke"), TINY_FLAGS)
    params, _, _ = random_variables(vq_config, seed=4)
    ckpt = tmp_path / "vq.pt"
    state_dict = official_format.tokenizer_state_dict(params, ("vq",))
    torch.save({"model": torch_tensors(state_dict)}, ckpt)
    workdir = tmp_path / "workdir"
    argv = ["official", f"--ckpt={ckpt}", f"--workdir={workdir}", *TINY_FLAGS]
    assert convert.main(argv + [f"--config={REPO / TINY_SPEC}"]) == 2
    message = capsys.readouterr().err
    assert "this is a LlamaGen VQ (1 codebook) checkpoint, but --config=" in message
    assert "config.model.adapter_layers is 1, the file has 0" in message
    assert ("Fix: add --config.model.branches=\"('vq',)\" --config.model.adapter_layers=0"
            in message)
    assert not workdir.exists()
    imported = official.convert_checkpoint(weights.read_torch_checkpoint(str(ckpt)), vq_config)
    assert imported.notes == ("The checkpoint has no discriminator: GAN training starts from a "
                              "fresh one (config.seed).",)


def test_truncated_file_is_named_as_such(tiny, tmp_path, capsys):
    data = tiny.ckpt.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    workdir = tmp_path / "workdir"
    assert convert.main(["official", f"--ckpt={truncated}", f"--config={REPO / TINY_SPEC}",
                         f"--workdir={workdir}", *TINY_FLAGS]) == 2
    message = capsys.readouterr().err
    assert "is truncated or corrupt" in message and "Download or copy it again" in message
    assert not workdir.exists()


def test_a_pickle_with_custom_objects_is_refused_unrun(tiny, tmp_path):
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": torch_tensors(tiny.model), "hook": Hook()}, hostile)
    with pytest.raises(PretrainedError) as error:
        official.import_checkpoint(str(hostile), tiny.config, str(tmp_path / "workdir"))
    message = str(error.value)
    assert "was refused for safety" in message and "_record_unpickling" in message
    assert "re-save just its weights" in message
    assert UNPICKLED == []  # the object's code never ran
    assert not (tmp_path / "workdir").exists()


def test_missing_and_unexpected_keys_are_named(tiny):
    state = dict(tiny.model)
    del state["decoder.conv_out.bias"]
    state["decoder.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(PretrainedError) as error:
        official.convert_checkpoint({"model": state}, tiny.config)
    message = str(error.value)
    assert "1 missing: decoder.conv_out.bias" in message
    assert "1 unexpected: decoder.extra.weight" in message


def test_an_existing_workdir_is_never_overwritten(tiny, capsys):
    before = sorted(p.name for p in tiny.workdir.rglob("*"))
    assert convert.main(["official", f"--ckpt={tiny.ckpt}", f"--config={REPO / TINY_SPEC}",
                         f"--workdir={tiny.workdir}", *TINY_FLAGS]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tiny.workdir.rglob("*")) == before


def test_feature_heads_the_config_does_not_train_are_dropped_with_a_note(tiny):
    config = convert.load_config(str(REPO / TINY_SPEC),
                                 TINY_FLAGS + ["--config.loss.semantic_weight=0"])
    imported = official.convert_checkpoint({"model": tiny.model}, config)
    assert "feat_pred_heads" not in imported.params
    assert any("Dropped the feature-prediction head of 'sem'" in note
               for note in imported.notes)


def test_feature_heads_the_file_lacks_or_sizes_otherwise_are_refused(tiny):
    headless = {key: value for key, value in tiny.model.items()
                if not key.startswith("feat_pred_head.")}
    with pytest.raises(PretrainedError, match=r"has none \(feat_pred_head\.\*\); train without "
                       r"representation learning \(--config\.loss\.semantic_weight=0\)"):
        official.convert_checkpoint({"model": headless}, tiny.config)
    config = convert.load_config(str(REPO / TINY_SPEC),
                                 TINY_FLAGS + ["--config.teachers.sem.kind=dinov2_tiny"])
    with pytest.raises(PretrainedError, match=r"head has width 64, but the config's teacher "
                       r"dinov2_tiny has width 48; set --config\.teachers\.sem\.kind=clip_tiny"):
        official.convert_checkpoint({"model": tiny.model}, config)


def test_discriminator_policy(tiny):
    no_gan = convert.load_config(str(REPO / TINY_SPEC), TINY_FLAGS + ["--config.gan.weight=0"])
    imported = official.convert_checkpoint({"model": tiny.model, "discriminator": tiny.disc},
                                           no_gan)
    assert imported.disc is None and "Dropped the checkpoint's discriminator" in imported.notes[0]
    wider = convert.load_config(str(REPO / TINY_SPEC), TINY_FLAGS + ["--config.gan.ndf=32"])
    with pytest.raises(PretrainedError, match=r"ndf 16, the config 32; set --config\.gan\.ndf=16"):
        official.convert_checkpoint({"model": tiny.model, "discriminator": tiny.disc}, wider)


def test_fvq_export_fits_the_llamagen_path_with_code_dim_256():
    """FVQ writes its materialized codebook into LlamaGen's layout with d = 256."""
    state = zeros_state_dict("llamagen_vq_model VQ-16")
    state["quantize.embedding.weight"] = np.zeros((16384, 256), np.float32)
    state["quant_conv.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    state["quant_conv.bias"] = np.zeros((256,), np.float32)
    state["post_quant_conv.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    config = config_file("configs/vqgan.py")
    with pytest.raises(PretrainedError, match=r"Fix: add --config\.model\.code_dim=256\."):
        official.convert_checkpoint(state, config)
    config.model.code_dim = 256
    imported = official.convert_checkpoint(state, config)
    assert imported.params["quantize"]["codebook"].shape == (1, 16384, 256)
    assert "--config.model.l2_normalize=False" in imported.notes[-1]


def test_there_is_one_torch_load_and_it_is_weights_only():
    calls = []
    for path in (REPO / "fqgan_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch":
                calls.append((path.name, {k.arg: ast.literal_eval(k.value)
                                          for k in node.keywords if k.arg == "weights_only"}))
    assert calls == [("weights.py", {"weights_only": True})]


@pytest.mark.slow  # compiles the tiny model's train step
def test_training_continues_from_the_imported_weights(tiny, tmp_path):
    """--mode=train on (a copy of) the imported workdir: the step-1 weights (the EMA's) are
    within one Adam step (lr 1e-3) of the imported ones, not a fresh init."""
    workdir = tmp_path / "workdir"
    shutil.copytree(tiny.workdir, workdir)
    config = convert.load_config(str(REPO / TINY_SPEC),
                                 TINY_FLAGS + ["--config.train.num_steps=1"])
    loop.train_and_evaluate(config, str(workdir))
    params, _, step = checkpointing.restore_model(str(workdir), config, build_run(
        config, frozen={}).mesh)
    assert step == 1
    change = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), jax.device_get(params),
                          tiny.params)
    assert 0 < max(jax.tree.leaves(change)) < 2e-3
