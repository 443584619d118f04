"""LPIPS-VGG16: parity with the `lpips` package through the converter and the weights file,
gradients, dropout, and the error messages for bad files.

No ImageNet VGG16 is downloaded: the reference is lpips.LPIPS(pnet_rand=True), i.e. a randomly
initialised VGG16 trunk with the real v0.1 heads, which exercises every layer just the same.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_reference import lpips_reference

from fqgan_jax.frozen import lpips, weights
from fqgan_jax.tools import convert


@pytest.fixture(scope="module")
def torch_lpips():
    torch.manual_seed(0)
    return lpips_reference(pnet_rand=True).eval()


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory, torch_lpips):
    """Our .npz, converted from the reference's trunk saved as torchvision's vgg16 state dict
    (lpips's slices keep the `features` indices) and the lpips package's own heads file."""
    directory = tmp_path_factory.mktemp("lpips")
    features = {f"features.{key.split('.', 1)[1]}": value
                for key, value in torch_lpips.net.state_dict().items()}  # slice1.0.weight -> ...
    torch.save(features, directory / "vgg16.pth")
    out = directory / "lpips_vgg16.npz"
    assert convert.main(["lpips", f"--vgg16={directory / 'vgg16.pth'}", f"--out={out}"]) == 0
    return str(out)


@pytest.fixture(scope="module")
def distance(weights_path):
    """A jitted (images, recon) -> [B] of the converted float32 model."""
    return jitted(lpips.load_lpips(weights_path))


def jitted(model: lpips.LPIPS):
    graphdef, params = nnx.split(model)

    @jax.jit
    def fn(params, images, recon, dropout_rng=None):
        return nnx.merge(graphdef, params)(images, recon, dropout_rng=dropout_rng)

    return lambda *args, **kwargs: fn(params, *args, **kwargs)


def image_pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.uniform(-1, 1, shape).astype(np.float32) for _ in range(2))


def to_torch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("shape", [(4, 64, 64, 3), (2, 48, 40, 3)])
def test_matches_lpips_package(distance, torch_lpips, shape):
    images, recon = image_pair(shape)
    ours = np.asarray(distance(images, recon))
    with torch.no_grad():
        theirs = torch_lpips(to_torch(images), to_torch(recon)).numpy()
    assert ours.shape == (shape[0],) and ours.dtype == np.float32
    assert theirs.shape == (shape[0], 1, 1, 1)
    np.testing.assert_allclose(ours, theirs.reshape(-1), rtol=0, atol=1e-5)


def test_gradient_matches_lpips_package(distance, torch_lpips):
    images, recon = image_pair((2, 48, 40, 3), seed=1)
    ours = np.asarray(jax.grad(lambda r: jnp.sum(distance(images, r)))(recon))
    recon_torch = to_torch(recon).requires_grad_()
    torch_lpips(to_torch(images), recon_torch).sum().backward()
    theirs = recon_torch.grad.numpy().transpose(0, 2, 3, 1)
    scale = np.abs(theirs).max()
    assert scale > 0
    # Float32 rounding may put a pre-activation within ~1e-7 of 0 on the other side of its ReLU
    # (or flip a near-tie in a max-pool): the gradient then differs, by up to ~2% of its scale,
    # in that unit's receptive field only. So: nearly all entries agree tightly, and the whole
    # field closely. (Here, on x86 CPU: all entries within 5e-6 of the scale; no flip.)
    close = np.abs(ours - theirs) <= 1e-4 * np.abs(theirs) + 1e-5 * scale
    assert close.mean() >= 0.99
    assert np.linalg.norm(ours - theirs) <= 1e-2 * np.linalg.norm(theirs)


def test_converter_reads_an_lpips_state_dict(tmp_path, torch_lpips, weights_path):
    """The full lpips.LPIPS state dict (`net.slice*`, `lin*`, the `lins.*` aliases and the
    scaling constants) converts to the very same file, heads included."""
    torch.save(torch_lpips.state_dict(), tmp_path / "lpips_full.pth")
    out = tmp_path / "from_full.npz"
    assert convert.main(["lpips", f"--vgg16={tmp_path / 'lpips_full.pth'}", f"--out={out}"]) == 0
    with np.load(out) as got, np.load(weights_path) as want:
        assert sorted(got.files) == sorted(want.files)
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_identical_images_and_symmetry(distance):
    images, recon = image_pair((2, 32, 32, 3), seed=2)
    assert np.abs(np.asarray(distance(images, images))).max() < 1e-7
    np.testing.assert_allclose(distance(images, recon), distance(recon, images), atol=1e-6)


def test_dropout_is_keyed(distance):
    images, recon = image_pair((2, 32, 32, 3), seed=3)
    eval_mode = np.asarray(distance(images, recon))
    first = np.asarray(distance(images, recon, dropout_rng=jax.random.key(1)))
    again = np.asarray(distance(images, recon, dropout_rng=jax.random.key(1)))
    other = np.asarray(distance(images, recon, dropout_rng=jax.random.key(2)))
    np.testing.assert_array_equal(first, again)
    assert np.all(first != eval_mode) and np.all(first != other)
    assert np.all(first > 0)


def test_bfloat16_close_to_float32(weights_path, distance):
    images, recon = image_pair((2, 32, 32, 3), seed=4)
    bf16 = np.asarray(jitted(lpips.load_lpips(weights_path, dtype="bfloat16"))(images, recon))
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, distance(images, recon), rtol=2e-2)


def test_gradient_is_finite_where_all_features_are_zero():
    """Where lpips's normalize_tensor backpropagates NaN (sqrt at 0), ours stays finite."""
    features = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0, 3].set(1.0)  # one unit vector
    grad = jax.grad(lambda f: jnp.sum(lpips.normalize_channels(f) * jnp.arange(8.0)))(features)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(lpips.normalize_channels(features), features)


def test_graphdef_is_static():
    """Two modules built alike have equal, hashable graphdefs (jit caches on them)."""
    first, _ = lpips.abstract_params()
    second, _ = lpips.abstract_params()
    assert first == second and hash(first) == hash(second)


@pytest.mark.parametrize("key, path", [
    ("features.0.weight", ("vgg", 0, "kernel")),
    ("features.28.bias", ("vgg", 28, "bias")),
    ("net.slice5.28.weight", ("vgg", 28, "kernel")),
    ("lin3.model.1.weight", ("lins", 3, "kernel")),
    ("lin3.model.0.weight", ("lins", 3, "kernel")),
    ("lins.3.model.1.weight", None),
    ("classifier.6.weight", None),
    ("scaling_layer.shift", None),
])
def test_official_key_to_path(key, path):
    assert lpips.official_key_to_path(key) == path


@pytest.mark.parametrize("key", ["features.1.weight", "features.1.running_mean", "fc.weight"])
def test_official_key_to_path_rejects(key):
    with pytest.raises(ValueError, match="features index 1|Not a VGG16"):
        lpips.official_key_to_path(key)


# Bad weights files.


def zero_params(**replace) -> nnx.State:
    """LPIPS-shaped zeros, with `replace` ({'/'-joined key: array or None}) swapped in, added
    or (None) removed."""
    _, abstract = lpips.abstract_params()
    flat = {path: leaf.replace(np.zeros(leaf.shape, np.float32))
            for path, leaf in nnx.to_flat_state(abstract)}
    for key, array in replace.items():
        path = tuple(int(part) if part.isdigit() else part for part in key.split("/"))
        if array is None:
            del flat[path]
        else:
            flat[path] = nnx.Param(array)
    return nnx.from_flat_state(flat)


def test_save_is_atomic_and_loads(tmp_path):
    path = tmp_path / "sub" / "weights.npz"
    weights.save(str(path), zero_params(), kind=lpips.WEIGHTS_KIND)
    assert os.listdir(path.parent) == ["weights.npz"]  # no temporary file left behind
    model = lpips.load_lpips(str(path))
    assert model.vgg[28].kernel.shape == (3, 3, 512, 512)


def test_default_path(monkeypatch):
    monkeypatch.setenv("FQGAN_JAX_WEIGHTS_DIR", "/weights")
    assert weights.default_path("x.npz") == "/weights/x.npz"
    monkeypatch.delenv("FQGAN_JAX_WEIGHTS_DIR")
    assert weights.default_path("x.npz") == os.path.expanduser("~/.cache/fqgan_jax/x.npz")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.npz")
    with pytest.raises(weights.PretrainedError) as error:
        lpips.load_lpips(path)
    assert path in str(error.value) and "fqgan_jax.tools.convert lpips" in str(error.value)


def test_wrong_shape(tmp_path):
    path = str(tmp_path / "bad.npz")
    weights.save(path, zero_params(**{"vgg/0/kernel": np.zeros((3, 3, 3, 32))}),
                    kind=lpips.WEIGHTS_KIND)
    with pytest.raises(weights.PretrainedError, match=r"1 key with the wrong shape: "
                       r"vgg/0/kernel \(expected \(3, 3, 3, 64\), found \(3, 3, 3, 32\)\)"):
        lpips.load_lpips(path)


def test_unexpected_and_missing_keys(tmp_path):
    path = str(tmp_path / "bad.npz")
    params = zero_params(**{"vgg/30/kernel": np.zeros((1,)), "lins/4/kernel": None})
    weights.save(path, params, kind=lpips.WEIGHTS_KIND)
    with pytest.raises(weights.PretrainedError,
                       match="1 key missing: lins/4/kernel; 1 key unexpected: vgg/30/kernel"):
        lpips.load_lpips(path)


def test_file_of_another_kind(tmp_path):
    path = str(tmp_path / "inception.npz")
    weights.save(path, zero_params(), kind="inception_v3")
    with pytest.raises(weights.PretrainedError, match="'inception_v3'.*'lpips_vgg16'"):
        lpips.load_lpips(path)


@pytest.mark.parametrize("content, problem", [
    (b"not a zip", "not a readable .npz"),
    (None, "no __meta__"),
])
def test_not_our_format(tmp_path, content, problem):
    path = tmp_path / "odd.npz"
    if content is None:
        np.savez(path, weights=np.zeros(3))
    else:
        path.write_bytes(content)
    with pytest.raises(weights.PretrainedError, match=problem):
        lpips.load_lpips(str(path))


# Converter user errors: one line on stderr, exit status 2.


def test_converter_rejects_a_non_vgg_state_dict(tmp_path, capsys):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)},
               tmp_path / "resnet.pth")
    assert convert.main(["lpips", f"--vgg16={tmp_path / 'resnet.pth'}",
                         f"--out={tmp_path / 'out.npz'}"]) == 2
    err = capsys.readouterr().err
    assert "The --vgg16 file does not fit the VGG16 convs of LPIPS" in err
    assert "2 unexpected: conv1.weight, fc.weight" in err
    assert "torchvision vgg16 state dict" in err and "Traceback" not in err
    assert not (tmp_path / "out.npz").exists()


def test_converter_names_missing_arrays(tmp_path, capsys):
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    assert convert.main(["lpips", f"--vgg16={tmp_path / 'partial.pth'}",
                         f"--out={tmp_path / 'out.npz'}"]) == 2
    err = capsys.readouterr().err
    assert ("--vgg16 file does not fit the VGG16 convs of LPIPS: 25 missing: features.0.bias, "
            "features.2.bias, features.2.weight") in err
    assert "and 20 more. Is it a torchvision vgg16 state dict" in err


def test_converter_missing_input(tmp_path, capsys):
    missing = str(tmp_path / "vgg16-397923af.pth")
    assert convert.main(["lpips", f"--vgg16={missing}", f"--out={tmp_path / 'out.npz'}"]) == 2
    assert f"--vgg16: {missing} does not exist" in capsys.readouterr().err
