"""Tests of the PatchGAN discriminator: official names/counts, shapes, init, BatchNorm semantics,
parity with a NumPy re-implementation of torch's NCHW forward, and global-batch statistics under
a sharded jit.

Only two runs touch the full-size model (one init, one batch-1 256x256 forward); everything else
uses ndf 8 on 32x32 images.
"""

from __future__ import annotations

import functools
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fqgan_jax.models.discriminator import PatchDiscriminator, official_key_to_path

OFFICIAL_KEYS = pathlib.Path("/work/shared/spec/official_keys_tokenizer.tsv")
SECTION = "PatchGAN NLayerDiscriminator(3,64,3)"
OFFICIAL_PARAMS = 2_765_633  # spec fqgan.md §4.2 and the TSV header
TINY = dict(in_channels=3, ndf=8, n_layers=3)


# Op-by-op (eager) execution compiles every op on this 2-core CPU; jitting construction and
# forwards compiles each program once, which keeps the file within seconds.
@functools.lru_cache(maxsize=None)
def _jitted_constructor(seed: int, config: tuple) -> callable:
    return nnx.jit(lambda: PatchDiscriminator(**dict(config), rngs=nnx.Rngs(seed)))


def tiny_model(seed=0, **overrides) -> PatchDiscriminator:
    """A fresh model each call (tests mutate its batch stats); compiled once per config."""
    return _jitted_constructor(seed, tuple(sorted({**TINY, **overrides}.items())))()


@functools.partial(nnx.jit, static_argnames="train")
def run(model: PatchDiscriminator, x: jax.Array, train: bool) -> jax.Array:
    """model(x, train=train) under jit; nnx.jit writes the updated batch stats back."""
    return model(x, train=train)


def images(batch=4, size=32, seed=1) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1, maxval=1)


def flat(model, kind=nnx.Variable) -> dict[tuple, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(model, kind)))


def count(model, kind) -> int:
    return sum(math.prod(v.shape) for v in flat(model, kind).values())


def official_rows() -> tuple[list[tuple[str, str, tuple]], int]:
    """(key, param|buffer, torch shape) rows of the discriminator block, and its param total."""
    rows, total, inside = [], None, False
    for line in OFFICIAL_KEYS.read_text().splitlines():
        if line.startswith("###"):
            inside = line.startswith(f"### {SECTION}:")
            if inside:
                total = int(re.search(r"([\d,]+) params", line).group(1).replace(",", ""))
        elif inside and line.strip():
            key, kind, shape = line.split("\t")
            rows.append((key, kind, tuple(int(s) for s in re.findall(r"\d+", shape))))
    assert len(rows) == 22, "the TSV block lists 22 entries"
    return rows, total


def torch_layout(value: np.ndarray) -> np.ndarray:
    """What a converter inverts: our HWIO conv kernels are torch's OIHW."""
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value


TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
              "var": "running_var"}


def torch_state_dict(model) -> dict[str, np.ndarray]:
    """Our variables under their official names and layout, in float64; the names round-trip
    through `official_key_to_path`."""
    state = {}
    for path, variable in flat(model).items():
        key = f"main.{path[1]}.{TORCH_LEAF[path[2]]}"
        assert official_key_to_path(key) == path
        state[key] = np.float64(torch_layout(np.asarray(variable[...])))
    return state


@pytest.fixture(scope="module")
def full_model() -> PatchDiscriminator:
    return nnx.jit(lambda: PatchDiscriminator(rngs=nnx.Rngs(0)))()


def test_full_size_parameter_count():
    model = nnx.eval_shape(lambda: PatchDiscriminator(rngs=nnx.Rngs(0)))
    assert count(model, nnx.Param) == OFFICIAL_PARAMS
    assert count(model, nnx.BatchStat) == 2 * (128 + 256 + 512)  # running mean + var


def test_every_official_key_maps_to_a_variable_of_its_size():
    model = nnx.eval_shape(lambda: PatchDiscriminator(rngs=nnx.Rngs(0)))
    variables = flat(model)
    rows, official_total = official_rows()
    filled = []
    for key, kind, torch_shape in rows:
        path = official_key_to_path(key)
        if key.endswith("num_batches_tracked"):
            assert path is None
            continue
        assert path in variables, f"{key} -> {path} is not a variable"
        expected_type = nnx.Param if kind == "param" else nnx.BatchStat
        assert isinstance(variables[path], expected_type), key
        ours = variables[path].shape
        expected = torch_shape[2:] + torch_shape[1::-1] if len(torch_shape) == 4 else torch_shape
        assert ours == expected, (key, ours, torch_shape)
        filled.append(path)
    # A bijection: every variable of ours is the image of exactly one official key.
    assert sorted(filled, key=str) == sorted(variables, key=str)
    assert count(model, nnx.Param) == official_total


def test_official_key_names():
    assert official_key_to_path("main.0.weight") == ("main", 0, "kernel")
    assert official_key_to_path("main.9.weight") == ("main", 9, "scale")
    assert official_key_to_path("main.11.weight") == ("main", 11, "kernel")
    assert official_key_to_path("main.6.running_var") == ("main", 6, "var")
    with pytest.raises(ValueError, match="Not a PatchGAN"):
        official_key_to_path("discriminator.main.0.weight")


def test_full_size_init_distributions(full_model):
    """Conv weights N(0, 0.02), BN scale N(1, 0.02) and bias 0 (spec fqgan.md §4.2); conv biases
    keep PyTorch's default U(±1/sqrt(fan_in)); running stats start at (0, 1)."""
    model = full_model
    kernel = np.asarray(model.main[8].kernel[...])
    assert abs(kernel.mean()) < 1e-3 and kernel.std() == pytest.approx(0.02, rel=0.01)
    scale = np.asarray(model.main[9].scale[...])
    assert scale.mean() == pytest.approx(1.0, abs=4e-3)
    assert scale.std() == pytest.approx(0.02, rel=0.2)
    assert not np.any(model.main[9].bias[...])
    assert not np.any(model.main[9].mean[...]) and np.all(model.main[9].var[...] == 1)
    bias, bound = np.asarray(model.main[0].bias[...]), (3 * 16) ** -0.5
    assert np.all(np.abs(bias) <= bound) and bias.std() > bound / 4


def test_full_size_256_input_gives_30x30_float32_logits(full_model):
    logits = run(full_model, images(batch=1, size=256), train=False)
    assert logits.shape == (1, 30, 30, 1) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_two_layer_variant_shapes():
    """VQGAN-LC's n_layers=2 (spec large_codebooks.md §A.5): one fewer stride-2 block."""
    model = nnx.eval_shape(lambda: PatchDiscriminator(n_layers=2, rngs=nnx.Rngs(0)))
    assert sorted({path[1] for path in flat(model)}) == [0, 2, 3, 5, 6, 8]
    assert model.main[5].kernel.shape == (4, 4, 128, 256)
    out = nnx.eval_shape(lambda m, x: m(x, train=True), model,
                         jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32))
    assert out.shape == (2, 62, 62, 1)  # 256 -> 128 -> 64 -> 63 -> 62


def torch_reference_forward(weights: dict[str, np.ndarray], x_nchw: np.ndarray, n_layers: int):
    """taming's NLayerDiscriminator in train mode, NCHW, in float64 NumPy from torch-layout
    weights; returns the logits and, per BN index, torch's updated (running_mean, running_var)
    and the number of values each statistic averaged."""

    def conv(x, index, stride):
        w = weights[f"main.{index}.weight"]
        x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        win = np.lib.stride_tricks.sliding_window_view(x, (4, 4), axis=(2, 3))
        out = np.einsum("bchwij,ocij->bohw", win[:, :, ::stride, ::stride], w)
        bias = weights.get(f"main.{index}.bias")  # only the first and the last conv have one
        return out if bias is None else out + bias[None, :, None, None]

    def leaky(x):
        return np.where(x >= 0, x, 0.2 * x)

    x, stats = leaky(conv(x_nchw, 0, 2)), {}
    for n in range(1, n_layers + 1):
        c, bn = 2 + 3 * (n - 1), 3 + 3 * (n - 1)
        h = conv(x, c, 2 if n < n_layers else 1)
        mean, var = h.mean(axis=(0, 2, 3)), h.var(axis=(0, 2, 3))
        num = h.size // h.shape[1]
        stats[bn] = (0.1 * mean, 0.9 + 0.1 * var * num / (num - 1), num)  # unbiased running var
        h = (h - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
        x = leaky(h * weights[f"main.{bn}.weight"][None, :, None, None]
                  + weights[f"main.{bn}.bias"][None, :, None, None])
    return conv(x, 2 + 3 * n_layers, 1), stats


@pytest.mark.parametrize("n_layers", [3, 2])
def test_matches_torch_semantics_from_converted_weights(n_layers):
    """Our NHWC forward == a float64 NCHW re-implementation of the official module, fed our
    weights under the names `official_key_to_path` inverts, laid out OIHW: the architecture,
    BatchNorm's train-mode semantics and the converter table are checked together."""
    model = tiny_model(n_layers=n_layers)
    weights = torch_state_dict(model)
    x = np.asarray(images(batch=3, size=32), np.float64)
    expected, stats = torch_reference_forward(weights, x.transpose(0, 3, 1, 2), n_layers)
    logits = run(model, jnp.asarray(x, jnp.float32), train=True)
    np.testing.assert_allclose(logits, expected.transpose(0, 2, 3, 1), atol=2e-5, rtol=1e-4)
    for bn, (torch_mean, torch_var, num) in stats.items():
        np.testing.assert_allclose(model.main[bn].mean[...], torch_mean, atol=1e-6)
        # Documented deviation: Flax tracks the biased batch variance, torch the unbiased one.
        biased_var = 0.9 + (torch_var - 0.9) * (num - 1) / num
        np.testing.assert_allclose(model.main[bn].var[...], biased_var, rtol=1e-5)
        assert np.all(np.abs(model.main[bn].var[...] / torch_var - 1) <= 1 / (num - 1))


def test_train_mode_updates_running_stats_and_eval_mode_uses_them():
    model = tiny_model()
    batch = images(batch=4)
    before = nnx.clone(nnx.state(model, nnx.BatchStat))
    train_logits = run(model, batch, train=True)
    after_train = nnx.clone(nnx.state(model, nnx.BatchStat))
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after_train)):
        assert not np.allclose(old, new)
    # Eval: running stats untouched, and each image's logits independent of its batch mates.
    eval_logits = run(model, batch, train=False)
    for old, new in zip(jax.tree.leaves(after_train), jax.tree.leaves(nnx.state(model,
                                                                                 nnx.BatchStat))):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_allclose(run(model, batch[:1], train=False), eval_logits[:1], atol=1e-5)
    assert not np.allclose(run(nnx.clone(model), batch[:1], train=True), train_logits[:1],
                           atol=1e-3)
    # Eval normalises with exactly the running stats: first BN by hand.
    bn = model.main[3]
    h = model.main[2](model.main[1](model.main[0](batch)))
    expected = (h - bn.mean[...]) / jnp.sqrt(bn.var[...] + 1e-5) * bn.scale[...] + bn.bias[...]
    np.testing.assert_allclose(bn(h, use_running_average=True), expected, atol=1e-5)


def test_gradients_reach_every_parameter_and_no_batch_stat():
    model = tiny_model()

    def loss(module, x):
        return jnp.mean(module(x, train=True) ** 2)

    grads = nnx.jit(nnx.grad(loss))(model, images(batch=2))
    assert {path for path, _ in nnx.to_flat_state(grads)} == set(flat(model, nnx.Param))
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_bfloat16_compute_keeps_float32_params_stats_and_logits():
    abstract = nnx.eval_shape(lambda: PatchDiscriminator(**TINY, dtype="bfloat16",
                                                         rngs=nnx.Rngs(0)))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(abstract))} == {jnp.dtype(jnp.float32)}
    # Same weights as the float32 model (saves compiling a second initialiser), bf16 compute.
    reference_model = tiny_model()
    model = nnx.merge(nnx.graphdef(abstract), nnx.clone(nnx.state(reference_model)))
    logits = run(model, images(batch=2), train=True)
    assert logits.dtype == jnp.float32
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    reference = run(reference_model, images(batch=2), train=True)
    assert not np.array_equal(logits, reference)  # bf16 compute did happen
    np.testing.assert_allclose(logits, reference, atol=0.1)


def test_sharded_train_forward_uses_global_batch_statistics():
    """With the batch split over 8 devices, BatchNorm still normalises over the global batch
    (== PyTorch SyncBatchNorm): logits and updated stats equal the single-device run."""
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    model = tiny_model()
    graphdef, state = nnx.split(model)
    batch = images(batch=16)

    def forward(state, batch):
        module = nnx.merge(graphdef, state)
        logits = module(batch, train=True)
        return logits, nnx.state(module, nnx.BatchStat)

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    replicated_state = jax.device_put(state, NamedSharding(mesh, P()))
    assert len(sharded_batch.addressable_shards) == 8
    logits, stats = jax.jit(forward)(replicated_state, sharded_batch)
    ref_logits, ref_stats = jax.jit(forward)(state, batch)  # one device, whole batch
    assert len(logits.sharding.device_set) == 8
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for ours, ref in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats)):
        np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-5)
    # The comparison has teeth: per-device (2-image) statistics would give other logits.
    local_logits, _ = jax.jit(forward)(state, batch[:2])
    assert not np.allclose(local_logits, ref_logits[:2], atol=1e-3)
