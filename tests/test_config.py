"""Config files, presets, semantic checks and command-line errors."""

import ast
import os
import subprocess
import sys

import pytest
from conftest import REPO

from fqgan_jax import config_lib

CONFIGS = ("vqgan", "dual", "triple")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("preset", ["", "ds8", "smoke"])
def test_every_config_and_preset_passes_checks(name, preset):
    config = config_lib.load_config_file(os.path.join(REPO, f"configs/{name}.py:{preset}"))
    config_lib.check_config(config, num_devices=8)
    # The schema's keys, plus `teachers.<branch>.{kind, path}` (keyed by branch, so per file).
    keys = config_lib.flat_keys(config)
    teacher_keys = [k for k in keys if k.startswith("teachers.")]
    assert [k for k in keys if k not in teacher_keys] == config_lib.flat_keys(
        config_lib.base_config())
    assert teacher_keys == [f"teachers.{b}.{leaf}" for b in config.teachers
                            for leaf in ("kind", "path")]


def test_configs_name_the_papers_teachers():
    """spec fqgan.md §3.1; the smoke presets swap in random towers of the same family."""
    load = lambda s: config_lib.taught_branches(  # noqa: E731
        config_lib.load_config_file(os.path.join(REPO, s)))
    assert load("configs/dual.py") == {"sem": "clip_vit_l14"}
    assert load("configs/triple.py") == {"sem_mid": "dinov2_s14", "sem_high": "clip_vit_b16"}
    assert load("configs/triple.py:smoke") == {"sem_mid": "dinov2_tiny", "sem_high": "clip_tiny"}
    assert load("configs/vqgan.py") == {}


def test_configs_set_their_codebook_layout():
    load = lambda s: config_lib.load_config_file(os.path.join(REPO, s))  # noqa: E731
    assert load("configs/vqgan.py").model.branches == ("vq",)
    assert load("configs/vqgan.py").model.adapter_layers == 0
    assert load("configs/dual.py").model.branches == ("vis", "sem")
    assert load("configs/triple.py").model.branches == ("vis", "sem_mid", "sem_high")
    assert load("configs/dual.py:ds8").model.ch_mult == (1, 2, 2, 4)
    assert load("configs/dual.py:smoke").data.source == "photos"


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_file_holds_its_presets(name):
    """A reader sees the whole experiment in one file: get_config itself says what `:ds8` and
    `:smoke` change, and its docstring gives their commands; config_lib applies no preset."""
    assert not hasattr(config_lib, "apply_preset")
    path = os.path.join(REPO, f"configs/{name}.py")
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source)
    get_config = next(node for node in tree.body
                      if isinstance(node, ast.FunctionDef) and node.name == "get_config")
    body = ast.get_source_segment(source, get_config)
    for preset in ("ds8", "smoke"):
        assert f'preset == "{preset}"' in body
        assert f"--config=configs/{name}.py:{preset}" in ast.get_docstring(tree)
    assert "ch_mult" in body and "codebook_size" in body  # the model sizes, in the file
    load = lambda p: config_lib.load_config_file(f"{path}:{p}")  # noqa: E731
    full, ds8, smoke = load(""), load("ds8"), load("smoke")
    assert ds8.model.ch_mult == (1, 2, 2, 4) != full.model.ch_mult
    assert smoke.data.source == "photos" != full.data.source


def test_unknown_preset_names_valid_ones():
    with pytest.raises(config_lib.ConfigError, match="Valid presets: '', 'ds8', 'smoke'"):
        config_lib.load_config_file(os.path.join(REPO, "configs/dual.py:smok"))


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config_file("configs/nope.py")


@pytest.mark.parametrize("override, suggestion", [
    ("--config.model.codebok_size=3", "config.model.codebook_size"),
    ("--config.codebook_size=3", "config.model.codebook_size"),  # right key, wrong section
    ("--config.train.batchsize=4", "config.train.batch_size"),
])
def test_unknown_override_suggests_close_matches(override, suggestion):
    argv = ["main", f"--config={REPO}/configs/dual.py:smoke", override]
    with pytest.raises(config_lib.ConfigError, match="Did you mean") as error:
        config_lib.check_overrides(argv)
    assert suggestion in str(error.value)


@pytest.mark.parametrize("key, value, message", [
    ("train.batch_size", 12, "multiple of the 8 devices"),
    ("data.image_size", 66, "not divisible by the downsampling factor"),
    ("model.dtype", "float16", "must be one of"),
    ("model.branches", ("vis", "vis"), "non-empty and unique"),
    ("model.ch", 48, "GroupNorm"),
    ("data.crop_scale", (0.9, 0.5), "crop_scale"),
    ("loss.entropy_weight", -1.0, "must be >= 0"),
    ("data.source", "imagenet", "must be one of"),
    ("mesh.shape", (3, -1), "does not divide 8 devices"),
    ("mesh.shape", (-1,), "must have the same length"),
    ("mesh.rules", ((r"params/.*", ("model", None)),), "axis names from"),
    ("mesh.rules", ((r"params/(", ()),), "is not a regex"),
    ("eval.num_images", -1, "must be >= 0"),
    ("eval.fid_preprocess", "tf2", "must be one of"),
    ("data.prefetch_batches", -1, "data.prefetch_batches must be >= 0"),
    ("data.read_threads", 0, "data.read_threads must be positive"),
])
def test_check_config_names_the_problem(key, value, message):
    config = config_lib.load_config_file(os.path.join(REPO, "configs/dual.py:smoke"))
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.check_config(config, num_devices=8)


def test_sharded_codebook_must_split_evenly():
    config = config_lib.load_config_file(os.path.join(REPO, "configs/dual.py:smoke"))
    config.model.update(dict(shard_codebook=True, codebook_size=1020))
    config.mesh.shape = (1, 8)
    with pytest.raises(config_lib.ConfigError, match="codebook_size=1020 does not divide by 8"):
        config_lib.check_config(config, num_devices=8)
    config.model.codebook_size = 1024
    config_lib.check_config(config, num_devices=8)


def _run_main(*args, timeout=120):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "fqgan_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_cli_typo_fails_fast_without_traceback(tmp_path):
    result = _run_main("--config=configs/dual.py:smoke", f"--workdir={tmp_path}",
                       "--config.model.codebok_size=3")
    assert result.returncode != 0
    assert "Did you mean: config.model.codebook_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_data_folder_fails_before_compiling(tmp_path):
    result = _run_main("--config=configs/dual.py:smoke", f"--workdir={tmp_path}",
                       "--config.data.source=folder", "--config.data.train_dir=/no/such/dir")
    assert result.returncode != 0
    assert "/no/such/dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_saved_config_round_trips():
    config = config_lib.load_config_file(os.path.join(REPO, "configs/triple.py:smoke"))
    import json
    restored = config_lib.config_from_dict(json.loads(config.to_json()))
    assert restored.to_dict() == config.to_dict()
