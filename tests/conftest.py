"""Test setup, before anything imports jax: 8 simulated CPU devices, a compilation cache, and
parsed absl flags."""

import atexit
import os
import shutil
import tempfile

# Must precede the first jax import anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Many tests compile the same tiny programs (every train run, every subprocess): a persistent
# compilation cache, fresh for each session, compiles each of them once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="fqgan_jax_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
# Each pytest-xdist worker keeps its own folder in it: JAX writes entries in place, and a worker
# reading an entry that the other is still writing finds it truncated.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["PYTEST_XDIST_WORKER"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from absl import flags  # noqa: E402

# grain's mp_prefetch and ml_collections read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module: the benchmarks are scripts, not a package."""
    import importlib.util  # noqa: PLC0415

    path = os.path.join(REPO, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch's 2 OpenMP threads spin at every barrier: on 2 shared cores, a busy neighbour (or
    XLA's own threads) can make one reference forward take 5 s instead of 0.2. One thread costs
    ~0.15 s more per forward and stays steady. Modules of torch parity tests use it."""
    import torch  # noqa: PLC0415

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_config(branches=("vis", "sem"), **overrides):
    """FQGAN at toy size on the bundled photos: every code path, seconds per step on CPU."""
    from fqgan_jax import config_lib

    config = config_lib.load_config_file(os.path.join(REPO, "configs/dual.py:smoke"))
    config.model.update(dict(branches=tuple(branches), ch=32, ch_mult=(1, 2), z_channels=32,
                             adapter_layers=1, adapter_heads=2, codebook_size=64))
    config.data.update(dict(image_size=32, num_workers=0, read_threads=1, prefetch_buffer=2))
    config.train.update(dict(batch_size=8, num_steps=4, log_every=2, checkpoint_every=2,
                             eval_every=4, image_every=2))
    config.eval.update(dict(batch_size=8, num_images=8, grid_images=4))
    # The full GAN from the first step: one compiled program per run (each adversarial phase is
    # its own program); tests/test_adversarial.py covers the phases.
    # LPIPS is off unless a test converts weights for it (tests/test_lpips.py).
    # The fixed weight (the official recipe; the smoke preset's adaptive weight costs a second
    # backward pass and has its own tests in tests/test_adversarial.py).
    config.gan.update(dict(weight=0.5, start=1, disc_warmup_steps=0, ndf=16,
                           adaptive_weight=False))
    config.loss.perceptual_weight = 0.0
    # The teacher's InfoNCE is off too: it adds ~15 s to each compile. tests/test_semantic.py
    # and the shared end-to-end run (`trained_workdir`) turn it on.
    config.loss.semantic_weight = 0.0
    # Likewise the Figure 3-4 analysis at each eval (an extra compile and a t-SNE).
    config.eval.update(dict(single_codebook_images=0, tsne_points=0))
    for key, value in overrides.items():
        *sections, name = key.split(".")
        target = config
        for section in sections:
            target = target[section]
        target[name] = value
    return config


@pytest.fixture
def tiny_config():
    return make_tiny_config


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
    """One tiny 4-step training run with the whole objective (the random tiny CLIP teaching
    `sem`) and a profile of step 2, shared by the tests that inspect its outputs."""
    from fqgan_jax.training import loop

    workdir = tmp_path_factory.mktemp("trained")
    # 8 devices x 1 image: per-device InfoNCE would have no negatives, so the global batch's.
    config = make_tiny_config(**{"loss.semantic_weight": 0.5,
                                 "loss.infonce_negatives": "global",
                                 "eval.single_codebook_images": 8, "eval.tsne_points": 64,
                                 "train.profile_steps": 1, "train.profile_first_step": 2})
    result = loop.train_and_evaluate(config, str(workdir))
    return workdir, result


@pytest.fixture(scope="session")
def fid_inception_torch_state():
    """A random FID Inception state dict with realistic BatchNorm statistics (torch_reference)."""
    from torch_reference import random_fid_inception_state_dict

    return random_fid_inception_state_dict()


@pytest.fixture(scope="session")
def fid_inception_weights(tmp_path_factory, fid_inception_torch_state):
    """That state dict saved as pytorch-fid's .pth and converted by our CLI: the weights file."""
    import torch

    from fqgan_jax.frozen import inception
    from fqgan_jax.tools import convert

    directory = tmp_path_factory.mktemp("inception")
    torch.save(fid_inception_torch_state, directory / "pt_inception.pth")
    out = directory / inception.WEIGHTS_FILENAME
    assert convert.main(["inception", f"--pth={directory / 'pt_inception.pth'}",
                         f"--out={out}"]) == 0
    return str(out)


def make_step(config, devices=None, frozen=None, shape=None):
    """(initial state, train step, mesh) of `build_run(config)` on a (data, fsdp) mesh of
    `shape` (default: all of `devices` on `data`; `devices` default: one); `frozen` defaults to
    what build_run loads for the config (the tiny random teacher)."""
    import math

    import jax

    from fqgan_jax import sharding
    from fqgan_jax.training.build import build_run

    if devices is None:
        devices = jax.devices()[:math.prod(shape) if shape else 1]
    devices = list(devices)
    config.mesh.shape = tuple(shape) if shape else (len(devices), 1)
    run = build_run(config, sharding.make_mesh(config.mesh, devices), frozen=frozen)
    return run.init_state(), run.train_step, run.mesh


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    """With pytest-xdist (`-n 2 --dist loadgroup`): each module's tests stay on one worker, so its
    module-scoped programs compile once, and the modules that read the shared `trained_workdir`
    run together, so it is trained once. (A per-test grouping, tried once, took as long: 18 min
    50 s against 18 min 39 s.)"""
    shared = {item.module.__name__ for item in items if "trained_workdir" in item.fixturenames}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("trained_workdir" if module in shared else module))
