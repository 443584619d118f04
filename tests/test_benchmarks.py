"""benchmarks/train_step.py: its usage errors, one line each, before anything compiles. (A full
run costs ~25 s of compile here, which the suite has no room for; its measured output is in the
script's docstring and the README.)"""

import os

import pytest
from conftest import REPO, load_benchmark


def _benchmark():
    return load_benchmark("train_step")


TINY = ["--config=" + os.path.join(REPO, "configs/dual.py:smoke"), "--devices=1", "--mesh=1,1",
        "--set=model.ch=32", "--set=model.ch_mult=(1, 2)", "--set=model.z_channels=32",
        "--set=model.adapter_layers=0", "--set=model.codebook_size=64",
        "--set=data.image_size=32", "--set=train.batch_size=2", "--set=loss.semantic_weight=0.0",
        "--set=gan.weight=0.0"]  # no GAN, no teacher, no adapter: a ~10 s compile


def test_train_step_benchmark_rejects_bad_settings(capsys):
    benchmark = _benchmark()
    for bad in (["--set=model.chh=32"], ["--mesh=3,1"], ["--phase=gan"]):
        with pytest.raises(SystemExit) as error:
            benchmark.main(TINY + bad)
        assert error.value.code == 2
        assert capsys.readouterr().err.count("\n") == 1  # one line
