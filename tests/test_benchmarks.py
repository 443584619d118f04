"""benchmarks/train_step.py on one CPU device at toy size: its numbers and its usage errors."""

import importlib.util
import os

import pytest
from conftest import REPO


def _benchmark():
    path = os.path.join(REPO, "benchmarks", "train_step.py")
    spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--config=" + os.path.join(REPO, "configs/dual.py:smoke"), "--devices=1", "--mesh=1,1",
        "--set=model.ch=32", "--set=model.ch_mult=(1, 2)", "--set=model.z_channels=32",
        "--set=model.adapter_layers=0", "--set=model.codebook_size=64",
        "--set=data.image_size=32", "--set=train.batch_size=2", "--set=loss.semantic_weight=0.0",
        "--set=gan.weight=0.0"]  # no GAN, no teacher, no adapter: a ~10 s compile


def test_train_step_benchmark(capsys):
    benchmark = _benchmark()
    for bad in (["--set=model.chh=32"], ["--mesh=3,1"], ["--phase=gan"]):
        with pytest.raises(SystemExit) as error:
            benchmark.main(TINY + bad)
        assert error.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1  # one line

    result = benchmark.main(TINY + ["--steps=2", "--warmup=0", "--json"])
    assert result["phase"] == "no_gan" and result["mesh"] == [1, 1]
    assert result["step_time_median_s"] > 0 and result["images_per_s"] > 0
    assert len(result["step_times_s"]) == 2
    assert result["temp_bytes"] > 0 and result["flops_per_device"] > 0
    assert result["mfu"] is None and "peak_bytes_in_use" in result  # CPU: no MFU
    assert result["skipped_updates"] == 0
